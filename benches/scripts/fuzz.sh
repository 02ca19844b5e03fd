#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time, one after the other, in one
# process each. Not part of the test suite: it needs a nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz --locked`).
#
#   benches/scripts/fuzz.sh [SECONDS_PER_TARGET]    # default 60
#   TARGETS="ws_decoder client_frame" benches/scripts/fuzz.sh 300
#
# The committed seeds in fuzz/corpus/<target>/ are read, never written: what
# a run finds goes to bench-out/fuzz/corpus/<target>/ (kept between runs),
# crash inputs to bench-out/fuzz/artifacts/<target>/. A crash input belongs in
# fuzz/regressions/<target>/, where the suite replays it
# (protocol/tests/fuzz_regressions.rs, gateway/tests/fuzz_regressions.rs).
# One summary line per target is printed and written to bench-out/fuzz/summary.txt.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SECONDS_PER_TARGET=${1:-60}
TARGETS=${TARGETS:-handshake ws_decoder client_frame server_roundtrip}
OUT=${OUT:-$ROOT/bench-out}/fuzz
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
mkdir -p "$OUT"
cd "$ROOT/fuzz"

cargo +nightly fuzz build -O
: >"$OUT/summary.txt"
status=0
for target in $TARGETS; do
    corpus=$OUT/corpus/$target
    artifacts=$OUT/artifacts/$target
    mkdir -p "$corpus" "$artifacts"
    max_len=4096
    [ "$target" = handshake ] && max_len=10000
    log=$OUT/$target.log
    echo "== $target for ${SECONDS_PER_TARGET}s"
    if ! cargo +nightly fuzz run -O "$target" "$corpus" "$ROOT/fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb=1024 -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
        status=1
    fi
    runs=$(grep -oE '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 | awk '{print $2 " runs in " $5 " s"}')
    last=$(grep -E '#[0-9]+.*(cov|ft):' "$log" | tail -1 | grep -oE '(cov|ft|corp): [0-9/a-zA-Z]+' | tr '\n' ' ')
    rate=$(awk '/^stat::average_exec_per_sec:/ {print $2}' "$log")
    crashes=$(find "$artifacts" -type f | wc -l)
    line="$target: ${runs:-no final stats (see $log)} (${rate:-?} exec/s); ${last}; crash inputs: $crashes"
    echo "$line" | tee -a "$OUT/summary.txt"
done
exit $status
