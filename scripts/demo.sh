#!/usr/bin/env bash
# The local end-to-end demo: installs the stack if needed, builds the two images as they ship
# (scripts/images.sh), starts OpenBao (TLS) and PostgreSQL, injects a sample Deployment's pod
# through the sidekey-injector image, runs the pod's agent containers from the agent image under
# podman/runc, shows the rendered files (values masked), a lease renewal, and the revocation when
# it stops.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/stack-install.sh
./scripts/images.sh
cargo build -p sidekey-tests --bin demo --locked
exec ./target/debug/demo
