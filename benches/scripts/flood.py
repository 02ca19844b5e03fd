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
    flood.py typing URL SECONDS TOKEN CONVERSATION
        One session writing typing indicators as fast as it can; counts
        Error frames by code and how the session ended.
    flood.py devices URL SECONDS RATE DATA_DIR
        One user connecting RATE sessions a second, device numbers 1 to 16
        in turn, each held open; counts Welcome frames and closes by code
        (over the device limit, replaced by the same device's next session).
    flood.py headers HOST PORT SOURCE_IP SECONDS RATE
        RATE upgrade requests a second from SOURCE_IP, each with 40 KiB of
        headers; counts answers by HTTP status.
    flood.py slowread URL HOST PORT SECONDS READERS DATA_DIR
        READERS members of one group that never read their sockets, and its
        creator sending 60 KiB messages to the group within the send limit
        (45 a second); each reader checks every 5 s whether the node closed
        it, and reconnects (catching up) if it did. Counts closes by code.
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import itertools
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


def mint(secret, user, device=1):
    """An HS256 token for `user` and `device`, as `gateway token` makes them."""
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    now = int(time.time())
    claims = {"sub": user, "dev": device, "aud": "courier", "exp": now + 3600, "nbf": now - 1, "iat": now}
    head = b64(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


async def open_from(host, port, source):
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def open_counted(host, port, source, counts):
    """A connection from `source`, or None with the failure counted."""
    try:
        return await open_from(host, port, source)
    except OSError as e:
        counts[f"connect.{e.errno}"] += 1
        return None


async def status_of(reader, timeout):
    line = await asyncio.wait_for(reader.readline(), timeout)
    parts = line.split()
    return parts[1].decode() if len(parts) > 1 else "eof"


async def at_rate(end, rate, one):
    """Starts `one(n)` for n = 0, 1, ... at `rate` a second until `end`
    (a monotonic time), waits for all of them; returns how many started."""
    tasks = []
    started = time.monotonic()
    n = 0
    while time.monotonic() < end:
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n)))
        n += 1
    await asyncio.gather(*tasks)
    return n


async def conn_flood(host, port, source, seconds, rate, data_dir):
    secret = open(os.path.join(data_dir, "jwt.secret"), "rb").read().strip()
    counts = collections.Counter()
    held = []
    end = time.monotonic() + seconds

    async def one(n):
        opened = await open_counted(host, port, source, counts)
        if opened is None:
            return
        r, w = opened
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

    n = await at_rate(end, rate, one)
    for w in held:
        w.close()
    return {"flood": "conn", "attempts": n, "answers": dict(counts), "held_at_end": len(held)}


async def hammer(url, seconds, token, next_frame, counts):
    """One session writing `next_frame()` as fast as it can write, 50 at a
    time; a session the node closes is replaced at once, as a determined
    flooder would. Counts Sent frames, Error frames by code and how each
    session ended into `counts`; returns how many frames were written."""
    import courier_client as cc
    end = time.monotonic() + seconds
    written = 0
    while time.monotonic() < end:
        try:
            client = await cc.Client.connect(token, url)
        except Exception as e:
            counts[f"connect.{type(e).__name__}"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["sessions"] += 1

        async def reader():
            while time.monotonic() < end + 3:
                try:
                    f = await client.recv(timeout=max(0.1, end + 3 - time.monotonic()))
                except Exception as e:
                    counts[f"ended.{type(e).__name__}"] += 1
                    return
                if isinstance(f, cc.Sent):
                    counts["sent"] += 1
                elif isinstance(f, cc.Error):
                    counts[f"error.{f.code}"] += 1

        task = asyncio.ensure_future(reader())
        try:
            while time.monotonic() < end and not task.done():
                for _ in range(50):
                    await client.put(next_frame())
                    written += 1
                await asyncio.sleep(0.005)
        except Exception as e:
            counts[f"write.{type(e).__name__}"] += 1
        await task
        if client.ws.close_code is not None:
            counts[f"close.{client.ws.close_code}"] += 1
        try:
            await client.close()
        except Exception:
            pass
    return written


async def send_flood(url, seconds, token, conversation):
    """One user sending as fast as one session can."""
    import courier_client as cc
    counts = collections.Counter()
    ids = iter(range(1, 1 << 62))
    written = await hammer(url, seconds, token, lambda: cc.Send(conversation, next(ids), b"flood"), counts)
    return {"flood": "send", "written": written, "written_per_s": round(written / seconds),
            "answers": dict(counts)}


async def slowloris(host, port, source, seconds, connections):
    counts = collections.Counter()
    lifetimes = []
    end = time.monotonic() + seconds

    async def one():
        t0 = time.monotonic()
        opened = await open_counted(host, port, source, counts)
        if opened is None:
            return
        r, w = opened
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


async def typing_flood(url, seconds, token, conversation):
    """One session writing typing indicators (on, off, on...) as fast as it can."""
    import courier_client as cc
    counts = collections.Counter()
    flips = itertools.cycle([True, False])
    written = await hammer(url, seconds, token, lambda: cc.Typing(conversation, next(flips)), counts)
    return {"flood": "typing", "written": written, "written_per_s": round(written / seconds),
            "answers": dict(counts)}


async def devices_flood(url, seconds, rate, data_dir):
    """One user opening sessions of devices 1 to 16 in turn, holding each."""
    import courier_client as cc
    secret = open(os.path.join(data_dir, "jwt.secret"), "rb").read().strip()
    counts = collections.Counter()
    end = time.monotonic() + seconds
    held = []

    async def one(n):
        device = n % 16 + 1
        try:
            client = await cc.Client.connect(mint(secret, "devices-flooder", device), url)
        except Exception as e:
            counts[f"connect.{type(e).__name__}"] += 1
            return
        counts["welcome"] += 1
        held.append(client)
        try:
            while time.monotonic() < end + 2:
                await client.recv(timeout=max(0.1, end + 2 - time.monotonic()))
        except Exception:
            pass
        code = client.ws.close_code
        counts[f"close.{code}" if code is not None else "open_at_end"] += 1

    n = await at_rate(end, rate, one)
    for c in held:
        try:
            await c.close()
        except Exception:
            pass
    return {"flood": "devices", "attempts": n, "answers": dict(counts)}


async def headers_flood(host, port, source, seconds, rate):
    """Upgrade requests with 40 KiB of headers (the limit is 8 KiB)."""
    counts = collections.Counter()
    answer_ms = []
    end = time.monotonic() + seconds
    padding = "".join(f"X-Pad-{i}: {'a' * 1000}\r\n" for i in range(40)).encode()

    async def one(_n):
        t0 = time.monotonic()
        opened = await open_counted(host, port, source, counts)
        if opened is None:
            return
        r, w = opened
        request = upgrade_request(host, port, "x")
        try:
            w.write(request[:-2] + padding + b"\r\n")
            await w.drain()
        except OSError as e:
            counts[f"write.{e.errno}"] += 1
        try:
            counts[await status_of(r, 5)] += 1
            answer_ms.append((time.monotonic() - t0) * 1000)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            counts[type(e).__name__] += 1
        w.close()

    n = await at_rate(end, rate, one)
    answer_ms.sort()
    p99 = answer_ms[int(len(answer_ms) * 0.99)] if answer_ms else None
    return {"flood": "headers", "attempts": n, "answers": dict(counts),
            "answer_p99_ms": round(p99, 2) if p99 is not None else None}


def masked_binary(payload):
    """One client-to-server WebSocket binary frame (masked, as RFC 6455
    requires of clients)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code_in(data):
    """The code of the first close frame in a stream of server frames
    (unmasked), or None."""
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        if opcode == 0x8:
            return int.from_bytes(data[i:i + 2], "big") if length >= 2 else 1005
        i += length
    return None


async def slowread_flood(url, host, port, seconds, readers, data_dir):
    """Group members that never read, and the group's creator sending 60 KiB
    messages to it at 45 a second."""
    import courier_client as cc
    secret = open(os.path.join(data_dir, "jwt.secret"), "rb").read().strip()
    counts = collections.Counter()
    end = time.monotonic() + seconds
    names = [f"slow-reader-{i}" for i in range(readers)]
    writer = await cc.Client.connect(mint(secret, "slow-writer"), url)
    created = await writer.request(lambda r: cc.GroupCreate(r, names))
    group = created.conversation

    async def reader(name):
        while time.monotonic() < end:
            r, w = await asyncio.open_connection(host, port)
            w.write(upgrade_request(host, port, mint(secret, name)))
            if await status_of(r, 5) != "101":
                counts["refused"] += 1
                w.close()
                await asyncio.sleep(1)
                continue
            await r.readuntil(b"\r\n\r\n")
            w.write(masked_binary(cc.encode(cc.Sync(0, False, []))))
            counts["sessions"] += 1
            # A catch-up makes the session live; after it, never read while
            # the session lives; every 5 s look whether
            # the node closed it (a FIN after its close frame).
            await asyncio.sleep(min(5, max(0, end - time.monotonic())))
            chunks, eof = [], False
            until = time.monotonic() + 2
            try:
                while time.monotonic() < until:
                    chunk = await asyncio.wait_for(r.read(1 << 20), until - time.monotonic())
                    if not chunk:
                        eof = True
                        break
                    chunks.append(chunk)
            except (asyncio.TimeoutError, OSError):
                pass
            code = close_code_in(b"".join(chunks))
            if code is None and eof:
                code = "fin"  # ended without a readable close frame (the socket was full)
            if code is None and time.monotonic() < end:
                # Still open: keep not reading for the rest of the run.
                await asyncio.sleep(max(0, end - time.monotonic()))
                counts["open_at_end"] += 1
            elif code is not None:
                counts[f"close.{code}"] += 1
            w.close()

    async def sender():
        body = os.urandom(60 * 1024)
        cid = 1
        started = time.monotonic()
        while time.monotonic() < end:
            await writer.put(cc.Send(group, cid, body))
            counts["sent"] += 1
            cid += 1
            delay = started + cid / 45 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def drain_writer():
        while time.monotonic() < end + 2:
            try:
                f = await writer.recv(timeout=max(0.1, end + 2 - time.monotonic()))
            except Exception:
                return
            if isinstance(f, cc.Sent):
                counts["acked"] += 1
            elif isinstance(f, cc.Error):
                counts[f"error.{f.code}"] += 1

    await asyncio.gather(sender(), drain_writer(), *(reader(n) for n in names))
    await writer.close()
    return {"flood": "slowread", "readers": readers, "answers": dict(counts)}


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
    elif mode == "typing":
        url, seconds, token, conversation = args
        out = typing_flood(url, float(seconds), token, conversation)
    elif mode == "devices":
        url, seconds, rate, data_dir = args
        out = devices_flood(url, float(seconds), float(rate), data_dir)
    elif mode == "headers":
        host, port, source, seconds, rate = args
        out = headers_flood(host, int(port), source, float(seconds), float(rate))
    elif mode == "slowread":
        url, host, port, seconds, readers, data_dir = args
        out = slowread_flood(url, host, int(port), float(seconds), int(readers), data_dir)
    else:
        sys.exit(f"unknown flood {mode}")
    print(json.dumps(asyncio.run(out)))


socket.setdefaulttimeout(10)
main()
