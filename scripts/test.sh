#!/usr/bin/env bash
# Runs every test of the workspace against the real stack (OpenBao, PostgreSQL, helm, a real
# Kubernetes), installing the stack and building the cluster first when they are missing. Works on a fresh machine with no input (CI=true).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/stack-install.sh
# The real single-node Kubernetes the end-to-end tests run on: built from Go modules on a machine's
# first run (about 11 minutes on 2 cores, then cached in ~/.cache/sidekey), started in seconds. It
# keeps running after the tests (./scripts/cluster.sh down stops it).
./scripts/cluster.sh up >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The images and the shipped agent binary the tests run (built alone, static, as users get them).
./scripts/images.sh
# cosign, which the registry test signs with, is built from its Go module on a machine's first
# run (about 10 minutes on 2 cores, then cached in ~/.cache/sidekey): in the background, at low
# priority, while the tests below run.
cosign_log=$(mktemp)
nice -n 10 ./scripts/registry.sh cosign >"$cosign_log" 2>&1 &
cosign_build=$!
cargo test --workspace --locked "$@"
# The end-to-end tests on the real cluster (tests/Cargo.toml keeps them out of the line above):
# linted here, since --all-targets leaves out test targets marked `test = false`, then run with
# many threads, one binary after another (cluster_install changes the one Sidekey install;
# cluster_registry reinstalls it from a real registry, scripts/registry.sh, whose first run on a
# machine builds cosign from its Go module, cached in ~/.cache/sidekey).
cluster_tests=(--test cluster --test cluster_env --test cluster_install)
cargo clippy -p sidekey-tests --locked "${cluster_tests[@]}" --test cluster_registry -- -D warnings
cargo test -p sidekey-tests --locked "${cluster_tests[@]}" -- --test-threads "${SIDEKEY_CLUSTER_TEST_THREADS:-16}"
if ! wait "$cosign_build"; then
  cat "$cosign_log" >&2
  echo "test.sh: building cosign failed" >&2
  exit 1
fi
cargo test -p sidekey-tests --locked --test cluster_registry
# Coverage-guided fuzzing of what a pod author controls, bounded (seconds per target); a crash
# fails the run. Longer campaigns: ./scripts/fuzz.sh 600
./scripts/fuzz.sh "${SIDEKEY_FUZZ_SECONDS:-45}"
