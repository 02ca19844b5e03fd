#!/usr/bin/env bash
# Push notifications under load (issue 6): a fresh node with the webhook
# provider pointed at loadgen, which registers OFFLINE devices that then
# disconnect and ONLINE devices that stay caught up, sends RATE direct
# messages a second to both for DURATION seconds, and receives every
# notification itself. loadgen push checks that each offline (device,
# conversation) got notifications whose counts add up to the messages sent
# there, and that no online device was notified; it reports the
# notification rate and the wake-up latency (first message to its
# notification, the push delay included).
# Writes bench-out/push.json.
source "$(dirname "$0")/common.sh"
OFFLINE=${OFFLINE:-2000}
ONLINE=${ONLINE:-100}
RATE=${RATE:-500}
DURATION=${DURATION:-20}
DELAY_MS=${DELAY_MS:-2000}
COALESCE_MS=${COALESCE_MS:-5000}
RECEIVER=${RECEIVER:-127.0.0.1:9180}
[ "${NO_BUILD:-0}" = 1 ] || build
data=$(mktemp -d)
printf 'bench-webhook-secret\n' >"$data/webhook.secret"
start_gateway "$data" --push-webhook-url "http://$RECEIVER/hook" \
    --push-webhook-secret-file "$data/webhook.secret" \
    --push-delay-ms "$DELAY_MS" --push-coalesce-ms "$COALESCE_MS" --send-rate 1000 --send-burst 1000
status=0
"$LOADGEN" push --data-dir "$data" --receiver "$RECEIVER" --offline "$OFFLINE" --online "$ONLINE" \
    --rate "$RATE" --duration "$DURATION" --settle $(( (DELAY_MS + COALESCE_MS) / 1000 + 5 )) \
    --report "$OUT/push.json" || status=$?
stop_gateway
rm -rf "$data"
exit "$status"
