#!/usr/bin/env bash
# Issue 5: the local fleet next to the single node on the same scenario,
# back to back on the same machine. First the fleet (deploy/local-fleet.sh:
# 3 NATS servers, R3 with sync_interval always, 2 routers, 2 gateways on
# one SO_REUSEPORT port, 8080 + FLEET_PORT_OFFSET), then one node (router embedded, fjall
# fsynced per batch) on PORT: loadgen with CONNS connections at each rate
# of RATES for DURATION, fresh users every run. Writes
# bench-out/fleet-vs-single-{fleet,single}-<rate>.json and prints
# loadgen's summary of each run. NO_BUILD=1 runs the binaries already
# built (GATEWAY, LOADGEN). FLEET_PORT_OFFSET moves the fleet's ports
# (deploy/local-fleet.sh), PORT and METRICS_PORT the node's, away from
# other servers on the machine.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-2000}
RATES=${RATES:-"500 1500"}
DURATION=${DURATION:-30s}
[ "${NO_BUILD:-0}" = 1 ] || build
export FLEET_DIR=${FLEET_DIR:-$(mktemp -d)}
export COURIER_BIN=$GATEWAY
fleet="$ROOT/deploy/local-fleet.sh"
trap '"$fleet" down >/dev/null 2>&1 || true' EXIT

run() { # label url data-dir rate
    echo "== $1 at $4 msg/s"
    "$LOADGEN" --url "$2" --data-dir "$3" --connections "$CONNS" --rate "$4" \
        --duration "$DURATION" --report "$OUT/fleet-vs-single-$1-$4.json" --quiet ||
        status=$?
}

"$fleet" up
for rate in $RATES; do
    run fleet "ws://127.0.0.1:$((8080 + ${FLEET_PORT_OFFSET:-0}))/" "$FLEET_DIR/gateway-1" "$rate"
done
"$fleet" down

data=$(mktemp -d)
start_gateway "$data"
for rate in $RATES; do
    run single "ws://127.0.0.1:$PORT/" "$data" "$rate"
done
stop_gateway
rm -rf "$data"
exit "${status:-0}"
