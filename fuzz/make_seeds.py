#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/.

The seeds are frames as real peers send them, built with the reference
codec in examples/courier_client.py (an implementation independent of the
Rust one): every client and server frame type, the masked WebSocket frames
a client sends (whole and fragmented, with pings and closes between), and
the upgrade requests a browser and Python's websockets send. Rerun it after
a protocol change; the fuzzer adds what it finds on top.

    python3 fuzz/make_seeds.py
"""

import hashlib
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import courier_client as cc  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
CONV, GROUP = "d:alice:bob", "g:3f09a1c2b4d5e6f7"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImRldiI6MX0.c2ln"

CLIENT = [
    cc.Send(CONV, 7, b"hi"),
    cc.Send(GROUP, 2**63 + 1, bytes(range(256))),
    cc.Delivered(CONV, 1),
    cc.Read(CONV, 42),
    cc.Sync([]),
    cc.Sync([cc.Cursor(CONV, 3), cc.Cursor(GROUP, 0)]),
    cc.GroupCreate(1, ["bob", "carol"]),
    cc.GroupAdd(2, GROUP, ["dave"]),
    cc.GroupRemove(3, GROUP, ["alice"]),
    cc.GroupMembers(4, GROUP),
    cc.Ping(77),
    cc.Refresh(5, TOKEN),
]
SERVER = [
    cc.Welcome("alice", 1, 1_767_225_600_000, 65536, 75),
    cc.Sent(7, CONV, 1, 0x66DDB6AA00000000, 1_767_225_600_000),
    cc.Message(CONV, 1, 0x66DDB6AA00000000, 1_767_225_600_000, cc.KIND_MESSAGE,
               "alice", 1, 7, b"hi"),
    cc.Message(GROUP, 1, 9, 10, cc.KIND_MEMBERS_ADDED, "alice", 1, 0,
               cc.encode(cc.GroupCreate(0, ["alice", "bob"]))[5:]),
    cc.Receipt(CONV, 1, "bob", 1, cc.RECEIPT_READ),
    cc.SyncDone(True),
    cc.GroupCreated(1, GROUP, 1),
    cc.Members(4, GROUP, ["alice", "bob", "carol"]),
    cc.Done(2),
    cc.Pong(77),
    cc.Error(413, 7, "body too large"),
]


def ws_frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d", rsv=0):
    """One RFC 6455 frame; masked unless `mask` is None."""
    head = bytearray([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def ws_seeds():
    """Byte streams a client sends after the upgrade. The first byte is the
    target's control byte: bit 7 picks the role (0: server decoding client
    frames), bits 0-6 the read size less one."""
    server, client = [], []
    payloads = [cc.encode(f) for f in CLIENT]
    for p in payloads:
        server.append(ws_frame(2, p))
    server.append(b"".join(ws_frame(2, p) for p in payloads[:4]))
    send = payloads[1]
    server.append(ws_frame(2, send[:40], fin=False) + ws_frame(9, b"ping")
                  + ws_frame(0, send[40:200], fin=False) + ws_frame(0, send[200:]))
    server.append(ws_frame(9, b"") + ws_frame(10, b"late pong"))
    server.append(ws_frame(8, struct.pack(">H", 1000)))
    server.append(ws_frame(8, struct.pack(">H", 4000) + "bye ✓".encode()))
    server.append(ws_frame(1, "text is refused".encode()))
    server.append(ws_frame(2, bytes(300)))  # at the fuzz target's frame limit
    server.append(ws_frame(2, bytes(200), mask=None))  # unmasked: refused
    for p in (cc.encode(f) for f in SERVER):
        client.append(ws_frame(2, p, mask=None))
    client.append(ws_frame(9, b"", mask=None) + ws_frame(8, struct.pack(">H", 1001)
                                                          + b"server shutting down; reconnect", mask=None))
    seeds = [bytes([i % 128]) + s for i, s in enumerate(server)]
    seeds += [bytes([0x80 | (i * 5 % 128)]) + s for i, s in enumerate(client)]
    return seeds


def upgrade_seeds():
    base = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: courier.v1\r\n")
    websockets_lib = base + f"Authorization: Bearer {TOKEN}\r\nUser-Agent: Python/3.12 websockets/15.0\r\n\r\n"
    browser = ("GET /?access_token=" + TOKEN.replace(".", "%2E") + " HTTP/1.1\r\n"
               "Host: chat.example\r\nConnection: keep-alive, Upgrade\r\nPragma: no-cache\r\n"
               "Origin: https://chat.example\r\nSec-WebSocket-Version: 13\r\n"
               "User-Agent: Mozilla/5.0\r\nUpgrade: websocket\r\n"
               "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
               "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
               "Sec-WebSocket-Protocol: chat, courier.v1\r\n\r\n")
    pipelined = websockets_lib.encode() + ws_frame(2, cc.encode(CLIENT[4]))
    return [websockets_lib.encode(), browser.encode(), pipelined,
            b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]


def write(target, seeds):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (d / ("seed-" + hashlib.sha1(s).hexdigest()[:16])).write_bytes(s)


def main():
    write("client_frame", [cc.encode(f) for f in CLIENT])
    write("server_roundtrip", [cc.encode(f) for f in SERVER])
    write("ws_decoder", ws_seeds())
    write("handshake", upgrade_seeds())


if __name__ == "__main__":
    main()
