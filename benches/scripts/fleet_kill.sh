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
    at=$(date +%s.%N)
    echo "$(echo "$at - $start" | bc) killed ${victim%%/*} (pid $pid) at $at" | tee -a "$events"
    [ "${victim%%/*}" = router-1 ] && router_killed_at=$at
    sleep "$RESTART_AFTER"
    "$fleet" up >/dev/null
    echo "$(echo "$(date +%s.%N) - $start" | bc) restarted ${victim%%/*}" | tee -a "$events"
done
wait "$lg" || status=$?
tail -n 20 "$OUT/fleet-kill.log"
# When the killed router's partitions were served again: router-2 logs
# "serving partition" (UTC) once each one's replay is done and it takes
# commands, which is when deliveries in those conversations resume.
python3 - "$router_killed_at" "$FLEET_DIR/router-2/log" <<'PY'
import re, sys
from datetime import datetime, timezone
killed = float(sys.argv[1])
after = []
for line in open(sys.argv[2], errors="replace"):
    m = re.match(r"(\S+)Z\s+INFO .*serving partition partition=(\d+).* took_ms=(\d+)", line)
    if not m:
        continue
    at = datetime.fromisoformat(m[1]).replace(tzinfo=timezone.utc).timestamp()
    if at > killed:
        after.append((at - killed, int(m[2]), int(m[3])))
if after:
    ds = sorted(d for d, _, _ in after)
    replay = max(t for _, _, t in after)
    print(f"router-1 killed: {len(after)} partitions served again by router-2 "
          f"{ds[0]:.2f} to {ds[-1]:.2f} s after the kill (longest replay {replay} ms)")
else:
    print("router-1 killed: router-2 logged no takeover after it")
PY
exit "${status:-0}"
