# Shared helpers for the end-to-end benchmark scripts. Sourced, not run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$ROOT/bench-out}
GATEWAY=${GATEWAY:-$ROOT/target/release/gateway}
LOADGEN=${LOADGEN:-$ROOT/target/release/loadgen}
mkdir -p "$OUT"

build() {
    (cd "$ROOT" && cargo build --release --locked --bin gateway --bin loadgen)
}

# The node's ports: the defaults unless PORT or METRICS_PORT say otherwise
# (private ports keep a run apart from other nodes on the machine).
PORT=${PORT:-8080}
METRICS_PORT=${METRICS_PORT:-9100}

# start_gateway DATA_DIR [flags...]: starts a node on PORT and METRICS_PORT, waits until it is ready.
start_gateway() {
    local data=$1; shift
    "$GATEWAY" --data-dir "$data" --listen "127.0.0.1:$PORT" \
        --metrics-listen "127.0.0.1:$METRICS_PORT" "$@" >>"$OUT/gateway.log" 2>&1 &
    GW_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "gateway did not become ready" >&2
    return 1
}

stop_gateway() {
    kill -TERM "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
}

rss_kb() {
    awk '/^VmRSS/ {print $2}' "/proc/$1/status"
}
