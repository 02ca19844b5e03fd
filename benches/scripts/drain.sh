#!/usr/bin/env bash
# The reconnect rate a drain sends to the rest of the fleet: a node holding
# CONNS loadgen sessions with light traffic is drained with SIGTERM, once
# with WINDOW_MS and once with window 0, and its 1001 closes (each one a
# client that reconnects elsewhere) are sampled from /metrics every 100 ms.
# Prints the peak and mean closes per second (peak over any 1 s span and
# over any 100 ms span) and writes bench-out/drain-<window>.tsv (elapsed ms,
# closes so far).
# PORT and METRICS_PORT pick the node's ports (defaults 8080, 9100);
# NO_BUILD=1 with GATEWAY and LOADGEN set runs binaries already built.
source "$(dirname "$0")/common.sh"
CONNS=${CONNS:-5000}
WINDOW_MS=${WINDOW_MS:-10000}
RATE=${RATE:-200}
PORT=${PORT:-8080}
METRICS_PORT=${METRICS_PORT:-9100}
METRICS=http://127.0.0.1:$METRICS_PORT
[ -n "${NO_BUILD:-}" ] || build

closes() {
    curl -sf --max-time 1 "$METRICS/metrics" 2>/dev/null |
        awk '/^courier_session_closes_total\{code="1001"\}/ {print $2; found=1} END {if (!found) print 0}'
}

sessions() {
    curl -sf --max-time 1 "$METRICS/admin/connections" 2>/dev/null |
        sed -n 's/.*"process":\([0-9]*\).*/\1/p'
}

# start_node DATA_DIR WINDOW_MS: a node on PORT and METRICS_PORT, once ready.
start_node() {
    "$GATEWAY" --data-dir "$1" --drain-window-ms "$2" --listen "127.0.0.1:$PORT" \
        --metrics-listen "127.0.0.1:$METRICS_PORT" >>"$OUT/gateway.log" 2>&1 &
    GW_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "$METRICS/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "gateway did not become ready" >&2
    return 1
}

now_ms() { date +%s%3N; }

drain_once() {
    local window=$1 data tsv lg
    data=$(mktemp -d)
    tsv="$OUT/drain-$window.tsv"
    start_node "$data" "$window"
    "$LOADGEN" --url "ws://127.0.0.1:$PORT/" --data-dir "$data" --connections "$CONNS" --rate "$RATE" --duration 600s \
        --ramp 2000 --quiet --report "$OUT/drain-$window-loadgen.json" >/dev/null 2>&1 &
    lg=$!
    for _ in $(seq 1 300); do
        [ "$(sessions)" -ge "$CONNS" ] 2>/dev/null && break
        sleep 0.2
    done
    echo "window ${window} ms: $(sessions) sessions up; draining" >&2
    sleep 2
    local base t0
    base=$(closes)
    t0=$(now_ms)
    kill -TERM "$GW_PID"
    : >"$tsv"
    # Sample until the endpoint is gone (the process has exited); bounded.
    for _ in $(seq 1 1200); do
        local v
        v=$(curl -sf --max-time 1 "$METRICS/metrics" 2>/dev/null |
            awk '/^courier_session_closes_total\{code="1001"\}/ {print $2}') || true
        [ -z "$v" ] && { kill -0 "$GW_PID" 2>/dev/null || break; continue; }
        echo "$(($(now_ms) - t0))	$((v - base))" >>"$tsv"
        sleep 0.1
    done
    wait "$GW_PID" 2>/dev/null || true
    kill -INT "$lg" 2>/dev/null || true
    sleep 1
    kill -KILL "$lg" 2>/dev/null || true
    wait "$lg" 2>/dev/null || true
    rm -rf "$data"
    # Peak over any 1 s and any 100 ms span; mean from the first close to
    # the last.
    awk -v window="$window" '
        { t[NR] = $1; v[NR] = $2 }
        END {
            n = NR; total = v[n]; first = 0; last = 0
            for (i = 1; i <= n; i++) { if (!first && v[i] > 0) first = t[i]; if (v[i] < total) last = t[i + 1] }
            if (last == 0) last = first
            p1 = 0; p01 = 0; j = 1; k = 1
            for (i = 1; i <= n; i++) {
                while (t[i] - t[j] > 1000) j++
                if (j > 1 && v[i] - v[j - 1] > p1) p1 = v[i] - v[j - 1]
                if (j == 1 && v[i] > p1) p1 = v[i]
                while (t[i] - t[k] > 100) k++
                if (k > 1 && v[i] - v[k - 1] > p01) p01 = v[i] - v[k - 1]
                if (k == 1 && v[i] > p01) p01 = v[i]
            }
            span = (last - first) / 1000
            mean = span > 0 ? total / span : total
            printf "window %5d ms: %d closes over %.1f s; peak %d/s (any 1 s), peak %d per 100 ms, mean %.0f/s\n",
                window, total, span, p1, p01, mean
        }' "$tsv"
}

drain_once "$WINDOW_MS"
drain_once 0
