#!/usr/bin/env python3
"""The flooders of flood.sh. Each runs for a bounded time and prints what
it got as one JSON line.

    flood.py conn  HOST PORT SOURCE_IP SECONDS RATE DATA_DIR
        Opens RATE connections a second from SOURCE_IP, each sending a
        complete upgrade with a valid token of its own user (signed with
        DATA_DIR/jwt.secret), and keeps those the node accepts open until
        the end. Counts answers by HTTP status.
    flood.py send  URL SECONDS TOKEN CONVERSATION
        One session sending as fast as it can write, never waiting for an
        answer; counts Sent frames and Error frames by code.
    flood.py slow  HOST PORT SOURCE_IP SECONDS CONNECTIONS
        Opens CONNECTIONS connections from SOURCE_IP and trickles an upgrade
        request into each, one byte a second; counts how each ended (HTTP
        status, reset, still open at the end) and when.
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))


def upgrade_request(host, port, token):
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: courier.v1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


def mint(secret, user):
    """An HS256 token for `user`, device 1, as `gateway token` makes them."""
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    now = int(time.time())
    claims = {"sub": user, "dev": 1, "aud": "courier", "exp": now + 3600, "nbf": now - 1, "iat": now}
    head = b64(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


async def open_from(host, port, source):
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def status_of(reader, timeout):
    line = await asyncio.wait_for(reader.readline(), timeout)
    parts = line.split()
    return parts[1].decode() if len(parts) > 1 else "eof"


async def conn_flood(host, port, source, seconds, rate, data_dir):
    secret = open(os.path.join(data_dir, "jwt.secret"), "rb").read().strip()
    counts = collections.Counter()
    held = []
    end = time.monotonic() + seconds

    async def one(n):
        try:
            r, w = await open_from(host, port, source)
        except OSError as e:
            counts[f"connect.{e.errno}"] += 1
            return
        try:
            w.write(upgrade_request(host, port, mint(secret, f"conn-flooder-{n}")))
            status = await status_of(r, 5)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            counts[type(e).__name__] += 1
            w.close()
            return
        counts[status] += 1
        if status == "101":
            held.append(w)
        else:
            w.close()

    tasks = []
    started = time.monotonic()
    n = 0
    while time.monotonic() < end:
        due = started + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n)))
        n += 1
    await asyncio.gather(*tasks)
    for w in held:
        w.close()
    return {"flood": "conn", "attempts": n, "answers": dict(counts), "held_at_end": len(held)}


async def send_flood(url, seconds, token, conversation):
    """One user sending as fast as one session can; a session the gateway
    closes for it (1008) is replaced at once, as a determined flooder would."""
    import courier_client as cc
    counts = collections.Counter()
    end = time.monotonic() + seconds
    written = 0
    cid = 1
    while time.monotonic() < end:
        try:
            client = await cc.Client.connect(token, url)
        except Exception as e:
            counts[f"connect.{type(e).__name__}"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["sessions"] += 1

        async def reader():
            while True:
                try:
                    f = await client.recv(timeout=max(0.1, end + 3 - time.monotonic()))
                except Exception as e:
                    counts[f"ended.{type(e).__name__}"] += 1
                    return
                if isinstance(f, cc.Sent):
                    counts["sent"] += 1
                elif isinstance(f, cc.Error):
                    counts[f"error.{f.code}"] += 1
                if time.monotonic() > end + 3:
                    return

        task = asyncio.ensure_future(reader())
        try:
            while time.monotonic() < end and not task.done():
                for _ in range(50):
                    await client.put(cc.Send(conversation, cid, b"flood"))
                    cid += 1
                    written += 1
                await asyncio.sleep(0.005)
        except Exception as e:
            counts[f"write.{type(e).__name__}"] += 1
        await task
        code = client.ws.close_code
        if code is not None:
            counts[f"close.{code}"] += 1
        try:
            await client.close()
        except Exception:
            pass
    return {"flood": "send", "written": written, "written_per_s": round(written / seconds),
            "answers": dict(counts)}


async def slowloris(host, port, source, seconds, connections):
    counts = collections.Counter()
    lifetimes = []
    end = time.monotonic() + seconds

    async def one():
        t0 = time.monotonic()
        try:
            r, w = await open_from(host, port, source)
        except OSError as e:
            counts[f"connect.{e.errno}"] += 1
            return
        request = upgrade_request(host, port, "x")
        i = 0
        answer = asyncio.ensure_future(status_of(r, seconds + 5))
        while time.monotonic() < end and not answer.done():
            try:
                w.write(request[i:i + 1])
                await w.drain()
            except OSError:
                break
            i = (i + 1) % (len(request) - 4)  # never the final blank line
            await asyncio.sleep(1)
        if answer.done():
            try:
                counts[answer.result()] += 1
            except Exception as e:
                counts[type(e).__name__] += 1
            lifetimes.append(time.monotonic() - t0)
        else:
            answer.cancel()
            counts["open_at_end"] += 1
        w.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    lifetimes.sort()
    mid = lifetimes[len(lifetimes) // 2] if lifetimes else None
    return {"flood": "slow", "connections": connections, "ended": dict(counts),
            "median_lifetime_s": round(mid, 2) if mid else None}


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "conn":
        host, port, source, seconds, rate, data_dir = args
        out = conn_flood(host, int(port), source, float(seconds), float(rate), data_dir)
    elif mode == "send":
        url, seconds, token, conversation = args
        out = send_flood(url, float(seconds), token, conversation)
    elif mode == "slow":
        host, port, source, seconds, connections = args
        out = slowloris(host, int(port), source, float(seconds), int(connections))
    else:
        sys.exit(f"unknown flood {mode}")
    print(json.dumps(asyncio.run(out)))


socket.setdefaulttimeout(10)
main()
