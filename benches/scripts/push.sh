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
BURST=${BURST:-5}
PUSH_RATE=${PUSH_RATE:-500}
RECEIVER=${RECEIVER:-127.0.0.1:9180}
LISTEN=${LISTEN:-127.0.0.1:8080}
METRICS=${METRICS:-127.0.0.1:9100}
[ "${NO_BUILD:-0}" = 1 ] || build
data=$(mktemp -d)
printf 'bench-webhook-secret\n' >"$data/webhook.secret"
"$GATEWAY" --data-dir "$data" --listen "$LISTEN" --metrics-listen "$METRICS" \
    --push-webhook-url "http://$RECEIVER/hook" --push-webhook-secret-file "$data/webhook.secret" \
    --push-delay-ms "$DELAY_MS" --push-coalesce-ms "$COALESCE_MS" --push-rate "$PUSH_RATE" --send-rate 1000 --send-burst 1000 \
    >>"$OUT/gateway.log" 2>&1 &
GW_PID=$!
for _ in $(seq 1 100); do
    curl -sf "http://$METRICS/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
status=0
"$LOADGEN" push --url "ws://$LISTEN/" --data-dir "$data" --receiver "$RECEIVER" \
    --offline "$OFFLINE" --online "$ONLINE" \
    --rate "$RATE" --burst "$BURST" --duration "$DURATION" --settle $(( (DELAY_MS + COALESCE_MS) / 1000 + 5 )) \
    --report "$OUT/push.json" || status=$?
curl -s "http://$METRICS/metrics" | grep -E '^courier_push_' >"$OUT/push-metrics.txt" || true
stop_gateway
rm -rf "$data"
exit "$status"
