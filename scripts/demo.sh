#!/usr/bin/env bash
# The local end-to-end demo: installs the stack if needed, builds both binaries, starts OpenBao and
# PostgreSQL, injects a sample Deployment's pod through sidekey-injector over TLS, runs the pod,
# shows the rendered files (values masked), a lease renewal, and the revocation when it stops.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/stack-install.sh
cargo build --workspace --bins --locked
exec ./target/debug/demo
