#!/usr/bin/env bash
# Memory per idle authenticated connection: 15,000 connections held by
# loadgen with --rate 0; the gateway's RSS delta divided by connections,
# sampled after the ramp and a full heartbeat cycle.
source "$(dirname "$0")/common.sh"
N=${N:-15000}
[ "${NO_BUILD:-0}" = 1 ] || build
data=$(mktemp -d)
start_gateway "$data"
before=$(rss_kb "$GW_PID")
"$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --connections "$N" --rate 0 --duration 40s --ramp 5000 --quiet \
    --report "$OUT/idle_memory.json" &
lg=$!
sleep $(( N / 5000 + 32 ))
after=$(rss_kb "$GW_PID")
sockstat=$(grep '^TCP:' /proc/net/sockstat)
wait "$lg" || true
stop_gateway
rm -rf "$data"
echo "connections=$N rss_before_kib=$before rss_after_kib=$after bytes_per_connection=$(( (after - before) * 1024 / N ))"
echo "kernel: $sockstat (mem is in pages)"
