#!/usr/bin/env bash
# Fault injection on the network (issue 9): the fleet of deploy/local-fleet.sh
# (3 NATS servers, 2 routers, 2 gateways) spread over network namespaces
# that this script creates, joined by veth pairs to one bridge, and a loadgen
# run during which, one at a time:
#
#   1. router-1 is cut off from NATS (its link set down at the bridge, so
#      its packets are dropped silently) for PARTITION_S seconds, then healed;
#   2. everything router-1 sends to NATS is held DELAY_MS ± JITTER_MS for
#      LATENCY_S seconds, then the delay is removed.
#
# loadgen must report 0 lost and 0 reordered among SENT-acked messages;
# bench-out/netfault.summary says, per fault, when the run was not at rate
# (acks under 80 % of it, or 10 or more sends awaiting SENT). Needs root. Everything it made (namespaces, bridge,
# veths, processes, the fleet's directory) is removed on exit, also on
# failure.
#
#   sudo benches/scripts/netfault.sh      # CONNS=1000 RATE=300 PARTITION_S=15 LATENCY_S=20
#
# Layout (addresses exist only inside these namespaces):
#
#   cfault-nats0 10.209.0.10   cfault-router1 10.209.0.21   cfault-edge 10.209.0.30
#   cfault-nats1 10.209.0.11   cfault-router2 10.209.0.22     gateway-1, gateway-2 (one
#   cfault-nats2 10.209.0.12                                   SO_REUSEPORT port) and
#        \___________ veth ___ cfault-hub: bridge cfbr0 ___/    loadgen, on its loopback
#
# loadgen targets loopback only, so it shares one namespace with both
# gateways; the faults are on router-1's link, which carries only its NATS
# traffic. The kernel here has no netem qdisc, so the delay comes from a
# relay inside router-1's namespace (benches/scripts/delay_relay.py): router-1
# reaches NATS through it for the whole run (no delay outside the fault).
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-1000}
RATE=${RATE:-300}
WARM_S=${WARM_S:-20}
PARTITION_S=${PARTITION_S:-15}
SETTLE_S=${SETTLE_S:-25}
LATENCY_S=${LATENCY_S:-20}
DELAY_MS=${DELAY_MS:-50}
JITTER_MS=${JITTER_MS:-10}
PARTITIONS=${PARTITIONS:-16}
NATS=${COURIER_NATS_SERVER:-nats-server}
[ "${NO_BUILD:-0}" = 1 ] || build
command -v ip >/dev/null || { apt-get update -q && apt-get install -y -q iproute2; }

P=cfault
NET=10.209.0
declare -A ADDR=([nats0]=$NET.10 [nats1]=$NET.11 [nats2]=$NET.12 [router1]=$NET.21
    [router2]=$NET.22 [edge]=$NET.30)
dir=$(mktemp -d)
pids=()
events="$OUT/netfault.events"
log="$OUT/netfault.log"

teardown() {
    set +e
    local pid i ns
    # Newest first: loadgen, gateways, routers, the relay, then NATS.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[$i]}
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # Anything still running inside our namespaces was started by this
    # script (deleting a namespace does not stop its processes).
    for ns in "${!ADDR[@]}"; do
        for pid in $(ip netns pids "$P-$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for ns in hub "${!ADDR[@]}"; do ip netns del "$P-$ns" 2>/dev/null; done
    rm -rf "$dir"
}
trap teardown EXIT

# Runs a command in one of our namespaces. In the background, call
# `ip netns exec` directly instead (it execs the command, so $! is the
# process itself; a function in the background would be a subshell).
in_ns() { # name command...
    local ns=$1; shift
    ip netns exec "$P-$ns" "$@"
}

# Namespaces, the bridge in its own namespace, one veth pair per process.
ip netns add "$P-hub"
ip -n "$P-hub" link add cfbr0 type bridge
ip -n "$P-hub" link set cfbr0 up
for ns in "${!ADDR[@]}"; do
    ip netns add "$P-$ns"
    ip -n "$P-$ns" link set lo up
    ip link add eth0 netns "$P-$ns" type veth peer name "h-$ns" netns "$P-hub"
    ip -n "$P-hub" link set "h-$ns" master cfbr0
    ip -n "$P-hub" link set "h-$ns" up
    ip -n "$P-$ns" addr add "${ADDR[$ns]}/24" dev eth0
    ip -n "$P-$ns" link set eth0 up
done

nats_urls=nats://${ADDR[nats0]}:4222,nats://${ADDR[nats1]}:4222,nats://${ADDR[nats2]}:4222
for i in 0 1 2; do
    mkdir -p "$dir/nats-$i"
    routes=()
    for j in 0 1 2; do [ "$j" = "$i" ] || routes+=("nats-route://${ADDR[nats$j]}:6222"); done
    cat >"$dir/nats-$i/nats.conf" <<CONF
server_name: nats-$i
listen: ${ADDR[nats$i]}:4222
http: ${ADDR[nats$i]}:8222
jetstream { store_dir: "$dir/nats-$i/js", sync_interval: always }
cluster {
  name: courier-netfault
  listen: ${ADDR[nats$i]}:6222
  routes: [$(IFS=,; echo "${routes[*]}")]
  # Clients keep the URLs they were given (router-1's go through its relay).
  no_advertise: true
}
CONF
    ip netns exec "$P-nats$i" "$NATS" -c "$dir/nats-$i/nats.conf" >"$dir/nats-$i/log" 2>&1 &
    pids+=($!)
done
for i in 0 1 2; do
    for _ in $(seq 1 50); do
        in_ns edge curl -fsS "http://${ADDR[nats$i]}:8222/healthz?js-enabled-only=true" >/dev/null 2>&1 &&
            in_ns edge curl -fsS "http://${ADDR[nats$i]}:8222/jsz" 2>/dev/null | grep -q meta_cluster && break
        sleep 0.2
    done
    in_ns edge curl -fsS "http://${ADDR[nats$i]}:8222/healthz?js-enabled-only=true" >/dev/null 2>&1 ||
        { echo "nats-$i is not healthy:" >&2; tail -n 5 "$dir/nats-$i/log" >&2; exit 1; }
done
echo "nats: 3 servers up"

# router-1 through its relay (loopback 4222..4224 to the three servers).
delay_file="$dir/router1.delay"
: >"$delay_file"
ip netns exec "$P-router1" python3 "$ROOT/benches/scripts/delay_relay.py" "$delay_file" \
    "4222=${ADDR[nats0]}:4222" "4223=${ADDR[nats1]}:4222" "4224=${ADDR[nats2]}:4222" \
    >"$dir/relay.log" 2>&1 &
pids+=($!)
sleep 0.5
for i in 1 2; do
    d="$dir/router-$i"
    mkdir -p "$d"
    urls=$nats_urls
    [ "$i" = 2 ] || urls=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
    ip netns exec "$P-router$i" "$GATEWAY" --role router --nats "$urls" --partitions "$PARTITIONS" \
        --nats-replicas 3 --node-id "$((100 + i))" --data-dir "$d" >"$d/log" 2>&1 &
    pids+=($!)
done
served=0
for _ in $(seq 1 300); do
    served=$(cat "$dir"/router-*/log | sed -n 's/.*serving partition partition=\([0-9]*\).*/\1/p' |
        sort -u | wc -l)
    [ "$served" -ge "$PARTITIONS" ] && break
    sleep 0.2
done
[ "$served" -ge "$PARTITIONS" ] || { echo "routers serve $served of $PARTITIONS partitions" >&2; exit 1; }
# The first router up takes every partition and hands half back, one per
# scan, once it sees the second; a catch-up sent to a partition in that
# handover waits for its 10 s timeout. Start the load once each router
# serves its half.
held() { # router index: partitions it serves now, by its log
    local taken dropped
    taken=$(grep -c 'serving partition' "$dir/router-$1/log" || true)
    dropped=$(grep -cE 'handing a partition back|giving the partition up|lease lost' "$dir/router-$1/log" || true)
    echo $((taken - dropped))
}
for _ in $(seq 1 300); do
    [ "$(held 1)" -ge $((PARTITIONS / 2)) ] && [ "$(held 2)" -ge $((PARTITIONS / 2)) ] && break
    sleep 0.2
done
echo "routers: all $PARTITIONS partitions served (router-1 $(held 1), router-2 $(held 2))"

mkdir -p "$dir/gateway-1" "$dir/gateway-2"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/gateway-1/jwt.secret"
cp "$dir/gateway-1/jwt.secret" "$dir/gateway-2/jwt.secret"
chmod 600 "$dir"/gateway-*/jwt.secret
for i in 1 2; do
    ip netns exec "$P-edge" "$GATEWAY" --role gateway --nats "$nats_urls" --partitions "$PARTITIONS" \
        --node-id "$i" --listen 127.0.0.1:8080 --share-port --metrics-listen "127.0.0.1:910$i" \
        --data-dir "$dir/gateway-$i" >"$dir/gateway-$i/log" 2>&1 &
    pids+=($!)
done
for i in 1 2; do
    for _ in $(seq 1 100); do
        in_ns edge curl -fsS "http://127.0.0.1:910$i/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    in_ns edge curl -fsS "http://127.0.0.1:910$i/readyz" >/dev/null ||
        { echo "gateway-$i not ready; see its log" >&2; cat "$dir/gateway-$i/log" >&2; exit 1; }
done
echo "gateways: 2 ready"

duration=$((WARM_S + PARTITION_S + SETTLE_S + LATENCY_S + SETTLE_S))
: >"$events"
start=$(date +%s.%N)
mark() { echo "$(echo "$(date +%s.%N) - $start" | bc) $*" | tee -a "$events"; }
ip netns exec "$P-edge" "$LOADGEN" --url ws://127.0.0.1:8080/ --data-dir "$dir/gateway-1" \
    --connections "$CONNS" --rate "$RATE" --duration "${duration}s" --drain 30s \
    --report "$OUT/netfault.json" >"$log" 2>&1 &
lg=$!
pids+=("$lg")
# loadgen's clock starts with the ramp; traffic after CONNS / 2000 s.
sleep "$WARM_S"
mark "partition router-1"
ip -n "$P-hub" link set h-router1 down
sleep "$PARTITION_S"
ip -n "$P-hub" link set h-router1 up
mark "heal router-1"
sleep "$SETTLE_S"
echo "$DELAY_MS $JITTER_MS" >"$delay_file"
mark "delay router-1 ${DELAY_MS}ms"
sleep "$LATENCY_S"
: >"$delay_file"
mark "undelay router-1"
wait "$lg" || status=$?
tail -n 14 "$log"
for i in 1 2; do cp "$dir/router-$i/log" "$OUT/netfault.router-$i.log"; done
for i in 1 2; do cp "$dir/gateway-$i/log" "$OUT/netfault.gateway-$i.log"; done

# Per fault, from loadgen's once-a-second progress lines: the seconds whose
# acks fell under 80 % of the offered rate, the most sends awaiting their
# SENT, and when the run was back at rate: the first line after the fault
# began from which 3 lines in a row have acks >= 80 % of the rate and
# fewer than 10 sends pending. Good to about a second (loadgen's clock
# starts a moment after the script's).
python3 - "$log" "$events" "$RATE" "$OUT/netfault.json" <<'PY' | tee "$OUT/netfault.summary"
import json, re, sys
log, events, rate, report = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
line = re.compile(r"\[\s*([\d.]+)s [^\]]*\] conns (\d+)/\d+ \| sent (\d+)/s acked (\d+)/s delivered (\d+)/s \| pending (\d+)")
rows = [tuple(float(x) for x in m.groups()) for m in map(line.search, open(log)) if m]
ev = [(float(l.split()[0]), " ".join(l.split()[1:])) for l in open(events) if l.strip()]
ok = lambda row: row[3] >= 0.8 * rate and row[5] < 10
for k in range(0, len(ev), 2):
    (t0, what), (t1, _) = ev[k], ev[k + 1]
    window = [r for r in rows if t0 <= r[0] <= t1 + 30]
    # Stretches of lines not at rate (acks under 80 % or 10+ pending).
    stretches, cur = [], None
    for r in window:
        if not ok(r):
            cur = [cur[0], r[0]] if cur else [r[0], r[0]]
        elif cur:
            stretches.append(cur)
            cur = None
    if cur:
        stretches.append(cur)
    low = sum(1 for r in window if r[3] < 0.8 * rate)
    desc = "; ".join(f"{a - t0:.1f} to {b - t0:.1f} s after it began" + (f" ({a - t1:+.1f} to {b - t1:+.1f} s from its end)" if b > t1 else "")
                     for a, b in stretches) or "none"
    print(f"{what} ({t0:.1f} to {t1:.1f} s): {low} progress seconds with acks under 80 % of rate, "
          f"at most {max(r[5] for r in window):.0f} sends pending; not at rate: {desc}")
r = json.load(open(report))
print(f"totals: sent {r['sent']}, acked {r['acked']}, unacked {r['unacked']}, resent {r.get('resent')}, "
      f"lost {r['lost']}, reordered {r['reordered']}, duplicates {r['duplicates']}, invalid {r.get('invalid')}, "
      f"ack p99 {r['latency_ms']['sent_ack']['p99']} ms, e2e p99 {r['latency_ms']['end_to_end']['p99']} ms")
print("errors:", json.dumps(r["errors"]))
PY
exit "${status:-0}"
