#!/usr/bin/env bash
# Abuse limits under a flood (issue 9): one default node with the per-IP
# limits on, a normal loadgen run (CONNS connections from 4 source
# addresses, RATE messages/s), first alone and then beside each flood in
# turn, all from loopback:
#
#   conn  a connection flood from 127.0.0.99: CONN_RATE upgrades a second,
#         each with a valid token of its own user, the accepted ones held
#         open (so both per-IP limits are met: the concurrent cap and the
#         connect rate);
#   send  one user writing sends as fast as one session can, over the send
#         rate limit (50/s, burst 100);
#   slow  SLOW_CONNS connections from 127.0.0.98 trickling an upgrade
#         request one byte a second (slowloris);
#   typing one session writing typing indicators as fast as it can, over
#         the typing rate limit (2/s, burst 10);
#   devices one user opening DEVICES_RATE sessions a second, devices 1 to
#         16 in turn, over the device limit (4);
#   headers HEADERS_RATE upgrade requests a second from 127.0.0.97, each
#         with 40 KiB of headers (the limit is 8 KiB);
#   slowread SLOW_READERS group members that never read their sockets,
#         while the group's creator sends 60 KiB messages to it at 45/s
#         (the per-session outbound cap is 1 MiB; the node's total cap is
#         set to MAX_OUTBOUND_TOTAL, 8 MiB; MAX_OUTBOUND sets the
#         per-session cap, so a per-session cap above the total's share
#         makes the total cap act first).
#
# FLOODS (default: all, in the order above) picks some of them.
#
# Prints, per run, the normal clients' SENT-ack and end-to-end p99 and
# what the flooder got; writes bench-out/flood-*.json and flood.summary.
#
#   benches/scripts/flood.sh      # CONNS=1000 RATE=200 DURATION_S=30
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-1000}
RATE=${RATE:-200}
SECONDS_=${DURATION_S:-30}
CONN_RATE=${CONN_RATE:-1000}
SLOW_CONNS=${SLOW_CONNS:-400}
DEVICES_RATE=${DEVICES_RATE:-20}
HEADERS_RATE=${HEADERS_RATE:-500}
SLOW_READERS=${SLOW_READERS:-20}
MAX_OUTBOUND_TOTAL=${MAX_OUTBOUND_TOTAL:-8388608}
MAX_OUTBOUND=${MAX_OUTBOUND:-1048576}
FLOODS=${FLOODS:-"conn send slow typing devices headers slowread"}
MAX_PER_IP=${MAX_PER_IP:-500}
RATE_PER_IP=${RATE_PER_IP:-100}
[ "${NO_BUILD:-0}" = 1 ] || build

data=$(mktemp -d)
trap 'stop_gateway; rm -rf "$data"' EXIT
start_gateway "$data" --max-connections-per-ip "$MAX_PER_IP" --connect-rate-per-ip "$RATE_PER_IP" \
    --max-outbound-total-bytes "$MAX_OUTBOUND_TOTAL" --max-outbound-bytes "$MAX_OUTBOUND"
url="ws://127.0.0.1:$PORT/"
token() { "$GATEWAY" token --user "$1" --data-dir "$data"; }
: >"$OUT/flood.summary"
: >"$OUT/flood.metrics"

snapshot() { # name: the node's refusal and close counters after a run, appended to flood.metrics
    echo "== after $1" >>"$OUT/flood.metrics"
    curl -s "http://127.0.0.1:$METRICS_PORT/metrics" |
        grep -E '^courier_(handshake_refusals|auth_failures|session_closes|gateway_(send|typing)_refusals|outbound_(ephemeral_shed|cap_closes|pressure)|slow_consumer)' \
            >>"$OUT/flood.metrics" || true
}

normal() { # name: a loadgen run of the normal clients
    "$LOADGEN" --url "$url" --data-dir "$data" --connections "$CONNS" --rate "$RATE" \
        --duration "${SECONDS_}s" --source-addrs 127.0.1.1-127.0.1.4 --run-id "$(openssl rand -hex 4)" \
        --drain 10s --report "$OUT/flood-$1.json" --quiet >"$OUT/flood-$1.log" 2>&1 || true
    python3 - "$OUT/flood-$1.json" "$1" <<'PY' | tee -a "$OUT/flood.summary"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
print(f"{sys.argv[2]:<6} normal clients: connections {r['connections']}, sent {r['sent']}, acked {r['acked']}, "
      f"lost {r['lost']}, ack p99 {l['sent_ack']['p99']:.1f} ms, e2e p99 {l['end_to_end']['p99']:.1f} ms, "
      f"e2e p50 {l['end_to_end']['p50']:.2f} ms, errors {json.dumps(r['errors'])}")
PY
}

flood() { # name command...: runs the flood beside the normal run, from its traffic start
    local name=$1; shift
    (sleep $((CONNS / 2000 + 3)); python3 "$ROOT/benches/scripts/flood.py" "$@" >"$OUT/flood-$name.flooder.json") &
    local f=$!
    normal "$name"
    wait "$f" || true
    echo "$name   flooder: $(cat "$OUT/flood-$name.flooder.json")" | tee -a "$OUT/flood.summary"
    sleep 2
    snapshot "$name"
}

normal none
snapshot none
for f in $FLOODS; do
    case $f in
    conn) flood conn conn 127.0.0.1 "$PORT" 127.0.0.99 "$((SECONDS_ - 5))" "$CONN_RATE" "$data" ;;
    send) flood send send "$url" "$((SECONDS_ - 5))" "$(token send-flooder)" "d:send-flooder:send-target" ;;
    slow) flood slow slow 127.0.0.1 "$PORT" 127.0.0.98 "$((SECONDS_ - 5))" "$SLOW_CONNS" ;;
    typing) flood typing typing "$url" "$((SECONDS_ - 5))" "$(token typing-flooder)" "d:typing-flooder:typing-target" ;;
    devices) flood devices devices "$url" "$((SECONDS_ - 5))" "$DEVICES_RATE" "$data" ;;
    headers) flood headers headers 127.0.0.1 "$PORT" 127.0.0.97 "$((SECONDS_ - 5))" "$HEADERS_RATE" ;;
    slowread) flood slowread slowread "$url" 127.0.0.1 "$PORT" "$((SECONDS_ - 5))" "$SLOW_READERS" "$data" ;;
    *) echo "unknown flood $f" >&2; exit 2 ;;
    esac
done
