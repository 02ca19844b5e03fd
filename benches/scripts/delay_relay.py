#!/usr/bin/env python3
"""A TCP relay that adds latency to one direction, for netfault.sh.

This kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is not set), so
`tc qdisc add ... netem delay` is not available. This relay stands in for
it on one process's link: it runs inside that process's network namespace,
listens on loopback there and forwards to the real servers, holding every
chunk the client writes for DELAY ± JITTER milliseconds before passing it
on (never reordering: a chunk leaves no earlier than the one before it).
The other direction is passed through at once, as netem on the client's
egress would leave it.

    delay_relay.py CONTROL_FILE LISTEN_PORT=HOST:PORT [...]

CONTROL_FILE holds "DELAY_MS JITTER_MS" and is read every 100 ms; a
missing or empty file means no delay.
"""

import asyncio
import random
import sys
import time

delay = (0.0, 0.0)


async def watch(path):
    global delay
    while True:
        try:
            with open(path) as f:
                parts = f.read().split()
            delay = (float(parts[0]), float(parts[1])) if len(parts) >= 2 else (0.0, 0.0)
        except (OSError, ValueError):
            delay = (0.0, 0.0)
        await asyncio.sleep(0.1)


async def delayed(reader, writer):
    """Client to server: each chunk due at max(now + delay, previous due)."""
    queue = asyncio.Queue()
    last_due = 0.0

    async def pump():
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(pump())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            mean, jitter = delay
            d = max(0.0, mean + random.uniform(-jitter, jitter)) / 1000.0
            last_due = max(time.monotonic() + d, last_due)
            queue.put_nowait((last_due, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait(None)
    try:
        await task
    except (ConnectionError, OSError):
        pass
    writer.close()


async def direct(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    writer.close()


def handler(host, port):
    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(delayed(client_r, server_w), direct(server_r, client_w))

    return handle


async def main():
    control, routes = sys.argv[1], sys.argv[2:]
    servers = []
    for route in routes:
        listen, target = route.split("=")
        host, port = target.rsplit(":", 1)
        servers.append(
            await asyncio.start_server(handler(host, int(port)), "127.0.0.1", int(listen))
        )
    await watch(control)


asyncio.run(main())
