#!/usr/bin/env bash
# Issue 2's load run: 10,000 connections against the default node, one
# message in five to a group (groups of 3 to 200, mean near 20), 5,000
# messages/s for 60 s. Writes bench-out/single_node.json.
# PORT and METRICS_PORT move the node off the default ports; NO_BUILD=1
# runs the binaries already built (GATEWAY, LOADGEN); LOADGEN_CPUS pins
# loadgen to those CPUs with taskset (e.g. LOADGEN_CPUS=1), leaving the
# node unpinned; LOADGEN_THREADS sets loadgen's --threads (default 1);
# GATEWAY_FLAGS adds flags to the node (e.g. GATEWAY_FLAGS="--cores 1").
source "$(dirname "$0")/common.sh"
RATE=${RATE:-5000}
DURATION=${DURATION:-60s}
[ "${NO_BUILD:-0}" = 1 ] || build
pin=()
[ -z "${LOADGEN_CPUS:-}" ] || pin=(taskset -c "$LOADGEN_CPUS")
data=$(mktemp -d)
# shellcheck disable=SC2086 # GATEWAY_FLAGS is a list of flags
start_gateway "$data" ${GATEWAY_FLAGS:-}
"${pin[@]}" "$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --connections 10000 \
    --rate "$RATE" --duration "$DURATION" --ramp 5000 --threads "${LOADGEN_THREADS:-1}" \
    --report "$OUT/single_node.json" --quiet ||
    status=$?
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" >"$OUT/single_node.metrics"
stop_gateway
rm -rf "$data"
exit "${status:-0}"
