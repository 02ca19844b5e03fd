#!/usr/bin/env bash
# Traffic with 200,000 connections up (issue 4): the local fleet
# (deploy/local-fleet.sh: 3 NATS servers at R3 with `sync_interval:
# always`, 2 routers, 16 partitions) with GW_PROCS gateway processes of
# one core each on one SO_REUSEPORT port, because a process may hold only
# 20,000 descriptors here. For each rate of RATES one loadgen command
# ramps CONNS fresh users (worker processes of at most 18,000 sockets over
# source addresses in 127.0.1.0/24), holds them idle for IDLE (the
# baseline), then sends RATE messages/s for DURATION (one in five to a
# group of 3 to 200, mean 20; a 0.3 share marked read).
#
# Beside loadgen a sampler reads, every 2 s, the CPU time of each kind of
# process from /proc (gateways, routers, NATS servers), the routers'
# resident memory and the gateways' messages written to clients. Per rate it writes
# bench-out/capacity-fleet-<rate>.{json,html,cpu.tsv} and prints loadgen's
# summary, then the CPU of each kind per million deliveries over the
# traffic phase, less what the same processes spent per second while idle.
#
#   benches/scripts/capacity_fleet.sh                       # 200,000 connections, 250 500 1000 msg/s
#   CONNS=20000 GW_PROCS=2 RATES=200 benches/scripts/capacity_fleet.sh   # scaled down
#   KEEP_FLEET=1 ...                                         # keep the fleet's logs and state
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-200000}
GW_PROCS=${GW_PROCS:-12}
RATES=${RATES:-"250 500 1000"}
DURATION=${DURATION:-60s}
IDLE=${IDLE:-40s}
RAMP=${RAMP:-4000}
WORKERS=${WORKERS:-$(( (CONNS + 17999) / 18000 ))}
SOURCES=${SOURCES:-$(( (CONNS + 12499) / 12500 ))}
export FLEET_PORT_OFFSET=${FLEET_PORT_OFFSET:-11000}
[ "${NO_BUILD:-0}" = 1 ] || build

if (( CONNS / GW_PROCS > 18000 )); then
    echo "$CONNS connections over $GW_PROCS gateway processes is more than 18,000 each; raise GW_PROCS" >&2
    exit 2
fi

export FLEET_DIR=${FLEET_DIR:-$(mktemp -d)}
export COURIER_BIN=$GATEWAY FLEET_GATEWAYS=$GW_PROCS FLEET_GATEWAY_CORES=1
fleet="$ROOT/deploy/local-fleet.sh"
sampler=
cleanup() {
    [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
    "$fleet" down >/dev/null 2>&1 || true
    if [ "${KEEP_FLEET:-0}" = 1 ]; then echo "fleet state kept under $FLEET_DIR"; else rm -rf "$FLEET_DIR"; fi
}
trap cleanup EXIT
"$fleet" up

pids_of() { # glob of pid files
    local f out=()
    for f in $1; do [ -f "$f" ] && out+=("$(cat "$f")"); done
    echo "${out[*]}"
}
gateways=$(pids_of "$FLEET_DIR/gateway-*/pid")
routers=$(pids_of "$FLEET_DIR/router-*/pid")
natss=$(pids_of "$FLEET_DIR/nats-*/nats.pid")
tick=$(getconf CLK_TCK)
cpu_s() { # pids...: their user + system CPU seconds
    local p t=0
    for p in "$@"; do
        t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
    done
    echo "scale=2; $t / $tick" | bc
}
rss_mib() { # pids...: their resident memory summed, MiB
    local p t=0
    for p in "$@"; do
        t=$(( t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
    done
    echo $(( t / 1024 ))
}
gateway_metrics() { # every gateway's metrics, one after the other
    local i
    for i in $(seq 1 "$GW_PROCS"); do
        curl -sf "http://127.0.0.1:$(( 9100 + FLEET_PORT_OFFSET + i ))/metrics" 2>/dev/null || true
    done
}
# The gateways' messages written to clients, then their delivery
# histogram summed over the gateways (bucket counts, in bound order).
gateway_sample() {
    gateway_metrics | awk '
        /^courier_messages_out_total/ {n += $NF}
        /^courier_delivery_duration_seconds_bucket/ {
            if (!($1 in b)) order[++k] = $1
            b[$1] += $NF
        }
        END {
            printf "%d\t", n
            for (i = 1; i <= k; i++) printf "%s%s", (i > 1 ? "," : ""), b[order[i]]
        }'
}

status=0
for rate in $RATES; do
    name="capacity-fleet-$rate"
    scenario="$OUT/$name.toml"
    cat >"$scenario" <<TOML
name = "$name"
connections = $CONNS
ramp_rate = $RAMP
workers = $WORKERS
source_addrs = "127.0.1.1-127.0.1.$SOURCES"
setup_timeout = "180s"
drain = "20s"
thresholds = ["lost == 0", "reordered == 0", "connections >= $CONNS"]

[groups]
min = 3
max = 200
mean = 20

[body]
min = 40
mean = 200
max = 2000

[[phase]]
name = "idle"
duration = "$IDLE"

[[phase]]
name = "traffic"
duration = "$DURATION"
rate = $rate
group_share = 0.2
read_share = 0.3
TOML
    # The sampler starts with loadgen, so its seconds are loadgen's.
    (
        printf 'at_s\tgateways_cpu_s\trouters_cpu_s\tnats_cpu_s\tmessages_out\tdelivery_buckets\trouters_rss_mib\n'
        start=$(date +%s)
        while :; do
            # shellcheck disable=SC2086
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(( $(date +%s) - start ))" "$(cpu_s $gateways)" \
                "$(cpu_s $routers)" "$(cpu_s $natss)" "$(gateway_sample)" "$(rss_mib $routers)"
            sleep 2
        done
    ) >"$OUT/$name.cpu.tsv" &
    sampler=$!
    echo "== $CONNS connections, $rate msg/s"
    # shellcheck disable=SC2086
    "$LOADGEN" --url "ws://127.0.0.1:$((8080 + FLEET_PORT_OFFSET))/" --data-dir "$FLEET_DIR/gateway-1" \
        --scenario "$scenario" --gateway-pid "$(echo $gateways | tr ' ' ,)" \
        --report "$OUT/$name.json" --quiet || status=$?
    sleep 3 # one more sample after the drain
    # The bucket bounds of the gateways' delivery histogram, for the
    # sampler's counts.
    gateway_metrics | sed -n 's/^courier_delivery_duration_seconds_bucket{le="\([^"]*\)"}.*/\1/p' |
        awk '!seen[$0]++' >"$OUT/$name.delivery_bounds"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=
    python3 - "$OUT/$name.json" "$OUT/$name.cpu.tsv" "$OUT/$name.delivery_bounds" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
bounds = [float(b) for b in open(sys.argv[3]).read().split()]
lines = [l.split("\t") for l in open(sys.argv[2]).read().splitlines()[1:] if l.strip()]
rows = [[float(x) for x in r[:5]] for r in lines]
hists = [(float(r[0]), [float(c) for c in r[5].split(",")] if len(r) > 5 and r[5] else []) for r in lines]
marks = {m["label"]: m["at_s"] for m in report["measurements"]}
def at(t, k):  # column k at second t, between the samples around it
    for a, b in zip(rows, rows[1:]):
        if a[0] <= t <= b[0]:
            return a[k] + (b[k] - a[k]) * (t - a[0]) / (b[0] - a[0])
    return rows[-1][k]
# loadgen marks each phase at its end: the idle baseline is the idle
# phase less its first 5 s; the traffic window runs from the end of the
# idle phase to the drain.
i0, t0, t1 = marks["connected"] + 5, marks["idle"], marks["drained"]
delivered = report["delivered"]
if delivered == 0:
    sys.exit("  no deliveries: no CPU per delivery")
print(f"  traffic window {t1 - t0:.0f} s ({delivered} deliveries), idle baseline {t0 - i0:.0f} s")
# The gateways' own view of the traffic window's deliveries: from a
# gateway reading a send to a gateway writing it on the recipient's
# socket, from the histogram's growth between the samples around it.
def hist_at(t, after):
    picks = [h for at, h in hists if (at >= t if after else at <= t) and len(h) == len(bounds)]
    return (picks[0] if after else picks[-1]) if picks else None
h0, h1 = hist_at(t0, False), hist_at(t1, True)
if h0 and h1 and h1[-1] > h0[-1]:
    grown = [b - a for a, b in zip(h0, h1)]
    def bound(q):
        return next(le for le, c in zip(bounds, grown) if c >= q * grown[-1])
    print(f"  gateways' delivery latency over the window (bucket bounds): p50 <= {bound(0.5) * 1e3:g} ms, "
          f"p90 <= {bound(0.9) * 1e3:g} ms, p99 <= {bound(0.99) * 1e3:g} ms ({grown[-1]:.0f} deliveries)")
rss = [float(r[6]) for r in lines if len(r) > 6 and r[6]]
if rss:
    print(f"  routers' resident memory, summed: {rss[-1]:.0f} MiB at the end, {max(rss):.0f} MiB at most")
for k, kind in ((1, "gateways"), (2, "routers"), (3, "nats servers")):
    idle_rate = (at(t0, k) - at(i0, k)) / (t0 - i0)
    used = at(t1, k) - at(t0, k) - idle_rate * (t1 - t0)
    print(f"  {kind:<13} {used / delivered * 1e6:8.1f} CPU-s per million deliveries "
          f"({used:.1f} CPU-s over the window; {idle_rate:.3f} CPU/s while idle)")
PY
done
exit "$status"
