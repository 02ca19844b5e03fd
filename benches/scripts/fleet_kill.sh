#!/usr/bin/env bash
# Fleet mode under load, each kind of process SIGKILLed once mid-run: the
# local fleet (deploy/local-fleet.sh: 3 NATS servers, 2 routers, 2 gateways
# on one SO_REUSEPORT port), a loadgen run across both gateways, and at
# KILL_AT seconds apart a SIGKILL of gateway-1, then of router-1, then of
# nats-0, each restarted RESTART_AFTER seconds later (as its supervisor
# would). loadgen must report 0 lost and 0 reordered among SENT-acked
# messages; the per-second progress lines show when acks and deliveries
# resumed after each kill. Writes bench-out/fleet-kill.{json,log,events}.
# NO_BUILD=1 runs the binaries already built.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-2000}
RATE=${RATE:-500}
KILL_AT=${KILL_AT:-20}
RESTART_AFTER=${RESTART_AFTER:-5}
[ "${NO_BUILD:-0}" = 1 ] || build
export FLEET_DIR=${FLEET_DIR:-$(mktemp -d)}
export COURIER_BIN=$GATEWAY
fleet="$ROOT/deploy/local-fleet.sh"
trap '"$fleet" down >/dev/null 2>&1 || true' EXIT
"$fleet" up
duration=$((KILL_AT * 4))
events="$OUT/fleet-kill.events"
: >"$events"
start=$(date +%s.%N)
"$LOADGEN" --url ws://127.0.0.1:8080/ --data-dir "$FLEET_DIR/gateway-1" --connections "$CONNS" \
    --rate "$RATE" --duration "${duration}s" --drain 20s --report "$OUT/fleet-kill.json" \
    >"$OUT/fleet-kill.log" 2>&1 &
lg=$!
for victim in gateway-1/pid router-1/pid nats-0/nats.pid; do
    sleep "$KILL_AT"
    pid=$(cat "$FLEET_DIR/$victim")
    kill -KILL "$pid"
    echo "$(echo "$(date +%s.%N) - $start" | bc) killed ${victim%%/*} (pid $pid)" | tee -a "$events"
    sleep "$RESTART_AFTER"
    "$fleet" up >/dev/null
    echo "$(echo "$(date +%s.%N) - $start" | bc) restarted ${victim%%/*}" | tee -a "$events"
done
wait "$lg" || status=$?
tail -n 16 "$OUT/fleet-kill.log"
exit "${status:-0}"
