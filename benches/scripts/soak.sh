#!/usr/bin/env bash
# The soak (issue 9): a steady moderate load with reconnect churn for a long
# time against one default node, sampling the resident memory of the node
# and of loadgen every SAMPLE_S seconds. Passes when loadgen reports 0 lost
# and 0 reordered and the node's RSS at the end is within BOUND_PCT percent
# of its RSS at WARM_S seconds. The warm-up is what the store takes to fill
# its bounded caches at this load: its memtables (16 MiB in all) fill in
# minutes, its block cache (16 MiB) in about a quarter of an hour, as reads
# of older messages come from disk; so 45 minutes: 15 of warm-up and 30
# measured. Writes bench-out/soak.{json,rss.tsv,toml}.
#
#   benches/scripts/soak.sh                      # 45 min, 2,000 connections, 200 msg/s
#   DURATION=5m WARM_S=60 benches/scripts/soak.sh
#
# PORT and METRICS_PORT move the node off the default ports; NO_BUILD=1
# runs the binaries already built.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-2000}
RATE=${RATE:-200}
DURATION=${DURATION:-45m}
CHURN=${CHURN:-0.002}          # share of the connections reconnecting per second
SAMPLE_S=${SAMPLE_S:-10}
WARM_S=${WARM_S:-900}
BOUND_PCT=${BOUND_PCT:-10}
[ "${NO_BUILD:-0}" = 1 ] || build

data=$(mktemp -d)
scenario="$OUT/soak.toml"
rss="$OUT/soak.rss.tsv"
cat >"$scenario" <<TOML
name = "soak"
connections = $CONNS
ramp_rate = 1000
drain = "20s"
thresholds = ["lost == 0", "reordered == 0"]

[[phase]]
name = "steady"
duration = "$DURATION"
rate = $RATE
group_share = 0.2
read_share = 0.3
churn_per_s = $CHURN
TOML

sampler=
cleanup() {
    [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
    stop_gateway
    rm -rf "$data"
}
trap cleanup EXIT
start_gateway "$data"
"$LOADGEN" --scenario "$scenario" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" \
    --gateway-pid "$GW_PID" --report "$OUT/soak.json" --quiet &
lg=$!

# One line per sample: seconds since the start, the node's RSS and
# loadgen's RSS in KiB, the node's open sessions (from its metrics).
(
    start=$(date +%s)
    printf 'at_s\tgateway_rss_kib\tloadgen_rss_kib\tsessions\n'
    while kill -0 "$lg" 2>/dev/null; do
        sessions=$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null |
            awk '/^courier_gateway_connections(\{| )/ {s += $NF} END {print s + 0}')
        printf '%s\t%s\t%s\t%s\n' "$(($(date +%s) - start))" "$(rss_kb "$GW_PID" 2>/dev/null || echo 0)" \
            "$(rss_kb "$lg" 2>/dev/null || echo 0)" "$sessions"
        sleep "$SAMPLE_S"
    done
) >"$rss" &
sampler=$!
wait "$lg" || status=$?
wait "$sampler" 2>/dev/null || true
sampler=

check=0
python3 - "$OUT/soak.json" "$rss" "$WARM_S" "$BOUND_PCT" <<'PY' || check=$?
import json, sys
report, rss, warm, bound = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rows = [l.split("\t") for l in open(rss).read().splitlines()[1:] if l.strip()]
rows = [(int(a), int(g), int(l), int(s)) for a, g, l, s in rows if int(g) > 0]
r = json.load(open(report))
warm_row = next((x for x in rows if x[0] >= warm), rows[0])
end = rows[-1]
peak = max(x[1] for x in rows if x[0] >= warm_row[0])
growth = 100.0 * (end[1] - warm_row[1]) / warm_row[1]
print(f"sent {r['sent']}, acked {r['acked']}, delivered {r['delivered']}, lost {r['lost']}, "
      f"reordered {r['reordered']}, duplicates {r['duplicates']}, churned {r.get('churned')}, "
      f"reconnects {r.get('reconnects')}, e2e p99 {r['latency_ms']['end_to_end']['p99']} ms")
print(f"gateway RSS: {warm_row[1]} KiB at {warm_row[0]} s, {end[1]} KiB at {end[0]} s "
      f"({growth:+.1f} %), peak after warm-up {peak} KiB; bound +{bound:.0f} %")
print(f"loadgen RSS: {warm_row[2]} KiB at {warm_row[0]} s, {end[2]} KiB at {end[0]} s")
ok = r["lost"] == 0 and r["reordered"] == 0 and growth <= bound
print("soak", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
exit "${status:-$check}"
