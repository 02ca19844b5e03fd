#!/usr/bin/env bash
# Issue 2's load run: 10,000 connections against the default node, one
# message in five to a group (groups of 3 to 200, mean near 20), 5,000
# messages/s for 60 s. Writes bench-out/single_node.json.
source "$(dirname "$0")/common.sh"
RATE=${RATE:-5000}
DURATION=${DURATION:-60s}
build
data=$(mktemp -d)
start_gateway "$data"
"$LOADGEN" --data-dir "$data" --connections 10000 --rate "$RATE" --duration "$DURATION" \
    --ramp 5000 --report "$OUT/single_node.json" --quiet || status=$?
curl -s http://127.0.0.1:9100/metrics >"$OUT/single_node.metrics"
stop_gateway
rm -rf "$data"
exit "${status:-0}"
