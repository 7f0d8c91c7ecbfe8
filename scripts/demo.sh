#!/usr/bin/env bash
# The end-to-end demo, on a real single-node Kubernetes: installs the test stack if needed, brings
# the cluster up (scripts/cluster.sh: built from Go modules on the first run, about 11 minutes on 2
# cores, then cached), starts a store (OpenBao over TLS, PostgreSQL), runs the README's install
# block command for command (images, the store's kubernetes auth, helm install, an annotated
# Deployment), then shows the injected pod, its files (values masked), a lease renewal and the
# scale-down that revokes everything.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/stack-install.sh
./scripts/cluster.sh up >/dev/null
cargo build -p sidekey-tests --bin demo --locked
exec ./target/debug/demo
