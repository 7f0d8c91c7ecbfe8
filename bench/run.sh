#!/usr/bin/env bash
# Runs every benchmark side by side with its reference and rewrites bench/RESULTS.md:
#   - sidekey-agent against `bao agent` (OpenBao Agent) on the same work,
#   - sidekey-injector against a straightforward axum + rustls webhook, under wrk.
# Needs root (nothing else), installs the stack and wrk when missing. Takes about 6 minutes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
./scripts/stack-install.sh
# wrk drives the injector; GNU time measures each agent's own peak RSS (see bench.rs).
if ! command -v wrk >/dev/null 2>&1 || [ ! -x /usr/bin/time ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk time >/dev/null
fi
cargo build --release --workspace --bins --locked
# The agent as it ships: built on its own and static by scripts/images.sh (the binary the agent
# image carries); the harness runs that file. A workspace build would unify features across
# members and give a different, larger agent.
./scripts/images.sh
cargo bench -p sidekey-injector --bench webhook -- --quick --noplot 2>/dev/null | tee bench/criterion.txt | grep -E "time:|^[a-z]" || true
exec ./target/release/bench "$@"
