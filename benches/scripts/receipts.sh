#!/usr/bin/env bash
# Receipts and typing in the message mix (issue 3): the same traffic twice
# against a fresh default node, first plain, then with a share of messages
# read and a share preceded by typing, and with churn so that receipts made
# while a sender is away come back through the catch-up summary. loadgen
# checks that every DELIVERED and READ reaches the sender's device exactly
# once per state change and times the delivered and read ticks.
# Writes bench-out/receipts-plain.json and bench-out/receipts-mixed.json.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-5000}
RATE=${RATE:-2000}
DURATION=${DURATION:-30s}
[ "${NO_BUILD:-0}" = 1 ] || build
status=0
for mix in plain mixed; do
    data=$(mktemp -d)
    start_gateway "$data"
    extra=()
    if [ "$mix" = mixed ]; then
        extra=(--read-share 0.3 --typing-share 0.2
            --threshold "receipt_duplicates == 0" --threshold "receipts_missing == 0"
            --threshold "reads_missing == 0")
    fi
    "$LOADGEN" --data-dir "$data" --connections "$CONNS" --rate "$RATE" --duration "$DURATION" \
        --ramp 5000 --drain 10s --threshold "lost == 0" --threshold "reordered == 0" \
        "${extra[@]}" --report "$OUT/receipts-$mix.json" --quiet || status=$?
    stop_gateway
    rm -rf "$data"
done
exit "$status"
