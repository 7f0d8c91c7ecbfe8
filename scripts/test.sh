#!/usr/bin/env bash
# Runs every test of the workspace against the real stack (OpenBao, PostgreSQL, helm), installing
# the stack first when it is missing. Works on a fresh machine with no input (CI=true).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/stack-install.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The images and the shipped agent binary the tests run (built alone, static, as users get them).
./scripts/images.sh
cargo test --workspace --locked "$@"
# Coverage-guided fuzzing of what a pod author controls, bounded (seconds per target); a crash
# fails the run. Longer campaigns: ./scripts/fuzz.sh 600
./scripts/fuzz.sh "${SIDEKEY_FUZZ_SECONDS:-45}"
