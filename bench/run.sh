#!/usr/bin/env bash
# Runs every benchmark side by side with its reference and rewrites bench/RESULTS.md:
#   - sidekey-agent against `bao agent` (OpenBao Agent) on the same work,
#   - sidekey-injector against a straightforward axum + rustls webhook, under wrk, with three
#     workloads (one annotation set, every review distinct, a mix),
# and then, on the real single-node cluster (scripts/cluster.sh), rewrites bench/RESULTS-cluster.md:
#   - create-to-Ready and memory of the same pod uninjected, injected by Sidekey (init + sidecar,
#     native sidecar, env vars only) and injected with `bao agent` as vault-k8s injects it,
#   - logins and TokenReviews per pod start, the API server's admission latency for the webhook
#     at rest and while 300 pods are created, and store-update-to-app per action.
# `bench/run.sh --only agent|scale|injector|proxy` runs one section of the first report and prints
# it (no cluster). Needs root (nothing else), installs the stack, the cluster and wrk when missing.
# Takes about 25 minutes.
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
./target/release/bench "$@"
if [ $# -eq 0 ]; then
  ./scripts/cluster.sh up >/dev/null
  ./target/release/cluster_bench
fi
