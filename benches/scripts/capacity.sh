#!/usr/bin/env bash
# Idle capacity at the machine's limit: CONNS authenticated, heartbeating
# connections (default 200,000) held by one loadgen command (worker
# processes of at most 18,000 sockets, spread over source addresses in
# 127.0.0.0/8) against GW_PROCS gateway processes sharing one port with
# --share-port (a process may hold 20,000 descriptors here, so 200,000
# connections need at least 11). loadgen measures every gateway process
# (--gateway-pid) and the kernel, and writes bench-out/capacity-idle.json
# and .html with the sizing section.
#
# Each gateway process runs its own embedded router and data directory, so
# traffic between users on different processes would not route: the big
# phase is idle. Traffic at this size runs against the fleet
# (benches/scripts/capacity_fleet.sh). They share one token secret so loadgen's tokens are good on all.
# With TRAFFIC=1 the traffic scenario (loadgen/scenarios/traffic.toml) then
# runs against a single gateway process and writes capacity-traffic.json.
#
# Scaled down for a sanity check:
#   CONNS=20000 GW_PROCS=2 IDLE=40s benches/scripts/capacity.sh
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-200000}
GW_PROCS=${GW_PROCS:-12}
IDLE=${IDLE:-3m}
RAMP=${RAMP:-4000}
PORT=${PORT:-24100}
METRICS_BASE=${METRICS_BASE:-24101}
TRAFFIC=${TRAFFIC:-0}
WORKERS=${WORKERS:-$(( (CONNS + 17999) / 18000 ))}
SOURCES=${SOURCES:-$(( (CONNS + 12499) / 12500 ))}
[ "${NO_BUILD:-0}" = 1 ] || build

if (( CONNS / GW_PROCS > 18000 )); then
    echo "$CONNS connections over $GW_PROCS gateway processes is more than 18,000 each; raise GW_PROCS" >&2
    exit 2
fi

data=$(mktemp -d)
head -c 32 /dev/urandom >"$data/jwt.secret"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$data"
}
trap cleanup EXIT

for i in $(seq 0 $(( GW_PROCS - 1 ))); do
    mkdir -p "$data/gw$i"
    cp "$data/jwt.secret" "$data/gw$i/jwt.secret"
    "$GATEWAY" --listen "127.0.0.1:$PORT" --share-port --cores 1 --node-id "$i" \
        --metrics-listen "127.0.0.1:$(( METRICS_BASE + i ))" --data-dir "$data/gw$i" \
        >>"$OUT/capacity-gateway.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$(( METRICS_BASE + i ))/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
pid_list=$(IFS=,; echo "${pids[*]}")
echo "gateway processes on 127.0.0.1:$PORT: $pid_list"

# The idle scenario at this run's size and length; groups would need
# cross-process routing, so there are none.
scenario="$OUT/capacity-idle.toml"
sed -e "s/^duration = \"3m\"/duration = \"$IDLE\"/" \
    -e "s/^connections = .*/connections = $CONNS/" \
    -e "s/^ramp_rate = .*/ramp_rate = $RAMP/" \
    -e "s/^workers = .*/workers = $WORKERS/" \
    -e "s/^source_addrs = .*/source_addrs = $SOURCES/" \
    -e "s/>= 200000/>= $CONNS/g" \
    "$ROOT/loadgen/scenarios/idle-200k.toml" >"$scenario"
printf '\n[groups]\ncount = 0\n' >>"$scenario"

status=0
"$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --scenario "$scenario" \
    --gateway-pid "$pid_list" --report "$OUT/capacity-idle.json" --quiet || status=$?
grep -E '^(sockets|TCP):' /proc/net/sockstat
"$LOADGEN" size "$OUT/capacity-idle.json" | tail -n 4

if [ "$TRAFFIC" = 1 ]; then
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
    mkdir -p "$data/traffic"
    cp "$data/jwt.secret" "$data/traffic/jwt.secret"
    "$GATEWAY" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS_BASE" \
        --data-dir "$data/traffic" >>"$OUT/capacity-gateway.log" 2>&1 &
    pids+=($!)
    sleep 1
    "$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" \
        --scenario "$ROOT/loadgen/scenarios/traffic.toml" --gateway-pid "${pids[0]}" \
        --report "$OUT/capacity-traffic.json" --quiet || status=$?
    "$LOADGEN" size "$OUT/capacity-traffic.json" | tail -n 4
fi
exit "$status"
