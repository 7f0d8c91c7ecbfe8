#!/usr/bin/env bash
# Coverage-guided fuzzing of everything a pod author or a config controls: builds every target in
# fuzz/ and runs each for a bounded time (seconds per target, default 60), failing on any crash,
# out-of-memory (over 2 GiB) or slow input (over 20 s). Installs cargo-fuzz when it is missing.
#
#   scripts/fuzz.sh [seconds]           every target
#   FUZZ_TARGETS="review" scripts/fuzz.sh 600
#
# Only the stable toolchain is needed: the targets are built with `--sanitizer none` (the
# coverage instrumentation cargo-fuzz adds is made of stable -C flags; AddressSanitizer needs
# nightly's -Zsanitizer, and the code fuzzed is safe Rust). Each run starts from the committed
# seeds in fuzz/corpus/<target>/ and grows a copy in fuzz/target/corpus/<target>/; a crash is
# saved in fuzz/artifacts/<target>/ and replayed with
#   cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-60}
targets=${FUZZ_TARGETS:-review go_template handlebars agent_config command}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi

cd "$root/fuzz"
cargo fuzz build --sanitizer none
for target in $targets; do
    work="target/corpus/$target"
    mkdir -p "$work" "artifacts/$target"
    echo "fuzz: $target for ${seconds}s"
    cargo fuzz run --sanitizer none "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1
done
echo "fuzz: no crash in $targets"
