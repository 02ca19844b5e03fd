#!/usr/bin/env bash
# Clock steps (issue 9): one default node whose wall clock alone is stepped
# forward an hour, back, back an hour and forward again, under a loadgen
# run, without touching the machine's clock: the node runs under
# libfaketime (Debian's `faketime` package), which reads the offset from a
# file that benches/scripts/clock_step.py rewrites on its schedule. The
# monotonic clocks stay real (FAKETIME_DONT_FAKE_MONOTONIC), as they do
# when an operator or NTP steps a real clock.
#
#   benches/scripts/clock_step.sh        # CONNS=1000 RATE=300, steps at 15, 30, 45 and 60 s
#
# loadgen must report 0 lost and 0 reordered; the probe's findings
# (sequences, server timestamps, token exp/nbf, the send rate limit) are in
# bench-out/clock-step.probe.json. Needs the websockets package for the
# probe (pip install -r tests/python/requirements.txt).
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-1000}
RATE=${RATE:-300}
FAKETIME_LIB=${FAKETIME_LIB:-/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1}
[ "${NO_BUILD:-0}" = 1 ] || build
[ -f "$FAKETIME_LIB" ] || { apt-get update -q && apt-get install -y -q faketime; }

data=$(mktemp -d)
offset="$data.offset"
echo "+0" >"$offset"
trap 'stop_gateway; rm -rf "$data" "$offset"' EXIT
LD_PRELOAD=$FAKETIME_LIB FAKETIME_TIMESTAMP_FILE=$offset FAKETIME_CACHE_DURATION=1 \
    FAKETIME_DONT_FAKE_MONOTONIC=1 start_gateway "$data"
url="ws://127.0.0.1:$PORT/"
"$LOADGEN" --url "$url" --data-dir "$data" --connections "$CONNS" --rate "$RATE" \
    --duration 80s --drain 15s --report "$OUT/clock-step.json" >"$OUT/clock-step.log" 2>&1 &
lg=$!
sleep $((CONNS / 2000 + 2))
python3 "$ROOT/benches/scripts/clock_step.py" "$offset" "$GATEWAY" "$data" "$url" \
    "$OUT/clock-step.probe.json" || probe=$?
wait "$lg" || status=$?
tail -n 12 "$OUT/clock-step.log"
grep -E 'token|clock' "$OUT/gateway.log" | tail -n 5 || true
exit "${status:-${probe:-0}}"
