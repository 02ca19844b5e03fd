#!/usr/bin/env bash
# Presence storm: CONNS idle connections dropped at once (their loadgen is
# SIGKILLed, so the kernel closes every socket together) and reconnected
# straight away by a new loadgen. Samples the node's metrics every 100 ms
# and reports the peak last-seen write rate (bounded by
# --presence-writes-per-s) and the time until presence is consistent again:
# every device back online and no last-seen record left to write.
# Writes bench-out/presence_storm.csv and prints a summary.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-10000}
WRITES_PER_S=${WRITES_PER_S:-2000}
[ "${NO_BUILD:-0}" = 1 ] || build
data=$(mktemp -d)
start_gateway "$data" --presence-writes-per-s "$WRITES_PER_S"
metric() { curl -sf http://127.0.0.1:9100/metrics | awk -v m="$1" '$1 == m {print $2}'; }
wait_for_online() {
    for _ in $(seq 1 600); do
        [ "$(metric courier_routes_online)" = "$1" ] && return 0
        sleep 0.1
    done
    echo "connections did not come up" >&2
    return 1
}

"$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --connections "$CONNS" --rate 0 --duration 600s --ramp 5000 --quiet \
    >"$OUT/presence_storm_loadgen1.log" 2>&1 &
lg=$!
wait_for_online "$CONNS"
sleep 2
csv=$OUT/presence_storm.csv
echo "t_ms,routes_online,presence_writes_total,presence_pending_writes" >"$csv"
(
    t0=$(date +%s%3N)
    for _ in $(seq 1 1200); do
        body=$(curl -sf http://127.0.0.1:9100/metrics) || break
        now=$(date +%s%3N)
        echo "$body" | awk -v t=$((now - t0)) '
            $1 == "courier_routes_online" {r=$2}
            $1 == "courier_presence_writes_total" {w=$2}
            $1 == "courier_presence_pending_writes" {p=$2}
            END {print t "," r "," w "," p}'
        sleep 0.1
    done
) >>"$csv" &
sampler=$!
sleep 1
kill -KILL "$lg"
wait "$lg" 2>/dev/null || true
killed_at=$(date +%s%3N)
"$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --connections "$CONNS" --rate 0 --duration 600s --ramp 5000 --quiet \
    >"$OUT/presence_storm_loadgen2.log" 2>&1 &
lg=$!
wait_for_online "$CONNS"
online_at=$(date +%s%3N)
for _ in $(seq 1 600); do
    [ "$(metric courier_presence_pending_writes)" = "0" ] && break
    sleep 0.1
done
drained_at=$(date +%s%3N)
sleep 2
kill "$sampler" 2>/dev/null || true
kill -KILL "$lg"
wait "$lg" 2>/dev/null || true
stop_gateway
rm -rf "$data"

python3 - "$csv" "$CONNS" "$WRITES_PER_S" $((online_at - killed_at)) $((drained_at - killed_at)) <<'PY'
import csv, sys
path, conns, cap, online_ms, drained_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = [r for r in csv.DictReader(open(path)) if r["presence_writes_total"]]
pts = [(int(r["t_ms"]), float(r["presence_writes_total"]), float(r["presence_pending_writes"])) for r in rows]
peak = 0.0
for i, (t, w, _) in enumerate(pts):
    for t2, w2, _ in pts[i + 1:]:
        if t2 - t >= 1000:
            peak = max(peak, (w2 - w) * 1000.0 / (t2 - t))
            break
print(f"connections dropped and reconnected: {conns}")
print(f"last-seen write cap: {cap:.0f}/s; peak measured over 1 s windows: {peak:.0f}/s")
print(f"max pending last-seen writes: {max(p for _, _, p in pts):.0f}")
print(f"all devices online again after: {online_ms} ms")
print(f"presence consistent (online and nothing left to write) after: {drained_ms} ms")
PY
