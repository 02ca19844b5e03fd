#!/usr/bin/env bash
# The node SIGKILLed in the middle of a loadgen run and started again on the
# same data directory: loadgen reconnects, resends what was never acked
# (same client ids), catches up, and must report 0 lost among SENT-acked
# messages. Writes bench-out/kill9.json. PORT and METRICS_PORT move the
# node off the default ports; NO_BUILD=1 runs the binaries already built.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-10000}
RATE=${RATE:-2000}
[ "${NO_BUILD:-0}" = 1 ] || build
data=$(mktemp -d)
start_gateway "$data"
"$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --connections "$CONNS" --rate "$RATE" --duration 60s --ramp 5000 \
    --drain 15s --report "$OUT/kill9.json" --quiet &
lg=$!
sleep 25
kill -KILL "$GW_PID"
wait "$GW_PID" 2>/dev/null || true
echo "gateway killed with SIGKILL at $(date +%T)"
sleep 1
start_gateway "$data"
echo "gateway restarted at $(date +%T)"
wait "$lg" || status=$?
stop_gateway
rm -rf "$data"
exit "${status:-0}"
