#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), one after another on
# one core, and prints one summary line per target. Needs cargo-fuzz
# (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP=1 lets the stable toolchain
# take the sanitizer flags. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build
for t in $targets; do
    log=$(mktemp)
    status=ok
    # -rss_limit_mb and -malloc_limit_mb turn unbounded allocation into a
    # reported crash; -timeout flags any single input that takes over 10 s.
    cargo fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -malloc_limit_mb=512 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=FAILED
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    if [ "$status" = ok ]; then
        echo "$t: ok, ${runs:-?} executions in ${seconds}s, $cov"
    else
        echo "$t: FAILED after ${runs:-?} executions, $cov"
    fi
    if [ "$status" != ok ]; then grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5; fi
    rm -f "$log"
done
