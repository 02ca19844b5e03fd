#!/usr/bin/env python3
"""A small Courier client: protocol v1 frames and an asyncio session.

This file is both a library (imported by tests/python/test_chat.py) and a
command line example:

    python3 examples/courier_client.py --user alice --to bob "hello"
    python3 examples/courier_client.py --user bob --listen

Each WebSocket binary message holds one frame: a type byte, then fields in
a fixed order (docs/protocol.md is the reference). Integers are
little-endian; `str` is a u16 length and UTF-8; `bytes` is a u32 length and
raw bytes; a list is a u16 count and its items. Every frame type below
declares its fields once, and one encoder and one decoder read that list,
so the two directions cannot drift apart.

Needs the `websockets` package (pip install -r tests/python/requirements.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import random
import struct
import subprocess
import sys
import time

import websockets.exceptions
from websockets.asyncio.client import connect as ws_connect

SUBPROTOCOL = "courier.v1"
DEFAULT_URL = "ws://127.0.0.1:8080/ws"

# Entry kinds of a Message frame.
KIND_MESSAGE, KIND_MEMBERS_ADDED, KIND_MEMBERS_REMOVED = 0, 1, 2
# Receipt kinds.
RECEIPT_DELIVERED, RECEIPT_READ = 1, 2


# ----- frames ---------------------------------------------------------------

@dataclasses.dataclass
class Cursor:
    """The highest sequence held in one conversation."""
    conversation: str
    seq: int


def frame(type_byte, *fields):
    """Declares a frame class: its type byte and its (name, kind) fields."""
    def wrap(cls):
        cls.TYPE, cls.FIELDS = type_byte, fields
        cls.__annotations__ = {name: object for name, _ in fields}
        return dataclasses.dataclass(cls)
    return wrap


# Client to server.
@frame(0x01, ("conversation", "str"), ("client_id", "u64"), ("body", "bytes"))
class Send: pass
@frame(0x02, ("conversation", "str"), ("seq", "u64"))
class Delivered: pass
@frame(0x03, ("conversation", "str"), ("seq", "u64"))
class Read: pass
@frame(0x04, ("tail", "u16"), ("summary", "bool"), ("cursors", "cursors"))
class Sync: pass
@frame(0x05, ("request", "u32"), ("members", "strs"))
class GroupCreate: pass
@frame(0x06, ("request", "u32"), ("conversation", "str"), ("members", "strs"))
class GroupAdd: pass
@frame(0x07, ("request", "u32"), ("conversation", "str"), ("members", "strs"))
class GroupRemove: pass
@frame(0x08, ("request", "u32"), ("conversation", "str"))
class GroupMembers: pass
@frame(0x09, ("nonce", "u64"))
class Ping: pass
@frame(0x0A, ("request", "u32"), ("token", "str"))
class Refresh: pass
@frame(0x0B, ("request", "u32"), ("conversation", "str"), ("before_seq", "u64"), ("limit", "u16"))
class History: pass
@frame(0x0C, ("request", "u32"), ("before_ms", "u64"), ("before_conversation", "str"),
       ("limit", "u16"))
class ChatList: pass
@frame(0x0D, ("request", "u32"), ("conversation", "str"), ("seq", "u64"))
class ReceiptQuery: pass
@frame(0x0E, ("conversation", "str"), ("active", "bool"))
class Typing: pass
@frame(0x0F, ("request", "u32"), ("users", "strs"))
class PresenceQuery: pass
@frame(0x10, ("request", "u32"), ("users", "strs"))
class PresenceSubscribe: pass
@frame(0x11, ("request", "u32"), ("mask", "u8"), ("flags", "u8"))
class Settings: pass
@frame(0x12, ("request", "u32"))
class DeviceList: pass
@frame(0x13, ("request", "u32"), ("device", "u32"))
class DeviceRemove: pass

# End-to-end encryption (docs/protocol.md#end-to-end-encryption). A `key` is
# 32 raw bytes, a `sig` 64; the server never sees a private key or plaintext.
@frame(None, ("id", "u32"), ("key", "key"))
class Prekey: pass
@frame(None, ("user", "str"), ("device", "u32"), ("body", "bytes"))
class Ciphertext: pass
@frame(0x14, ("request", "u32"), ("identity_signing", "key"), ("identity_dh", "key"),
       ("signed_prekey_id", "u32"), ("signed_prekey", "key"), ("signed_prekey_signature", "sig"),
       ("last_resort_id", "u32"), ("last_resort", "key"), ("last_resort_signature", "sig"),
       ("one_time", Prekey))
class KeysUpload: pass
@frame(0x15, ("request", "u32"), ("user", "str"))
class BundleFetch: pass
@frame(0x16, ("conversation", "str"), ("client_id", "u64"), ("ciphertexts", Ciphertext))
class SendPerDevice: pass
@frame(0x17, ("request", "u32"), ("device", "u32"), ("archive", "bytes"))
class ArchiveUpload: pass
@frame(0x18, ("request", "u32"))
class ArchiveFetch: pass
@frame(0x19, ("request", "u32"))
class KeyCountQuery: pass

# Push tokens (docs/protocol.md#push-notifications).
PUSH_WEBHOOK, PUSH_FCM, PUSH_APNS = 1, 2, 3
@frame(0x1a, ("request", "u32"), ("provider", "u8"), ("token", "str"), ("ciphertext", "bool"))
class PushRegister: pass
@frame(0x1b, ("request", "u32"))
class PushUnregister: pass


def prekey_signing_message(last_resort: bool, prekey_id: int, key: bytes) -> bytes:
    """What the identity's Ed25519 key signs for a signed or last-resort prekey."""
    label = b"courier.v1 last-resort prekey\0" if last_resort else b"courier.v1 signed prekey\0"
    return label + struct.pack("<I", prekey_id) + key

# Settings bits.
READ_RECEIPTS_OFF, HIDE_LAST_SEEN = 0x01, 0x02

# Items of the server's lists.
@frame(None, ("seq", "u64"), ("server_id", "u64"), ("timestamp_ms", "u64"), ("kind", "u8"),
       ("sender", "str"), ("sender_device", "u32"), ("client_id", "u64"), ("body", "bytes"))
class HistoryEntry: pass
@frame(None, ("conversation", "str"), ("last_seq", "u64"), ("last_ms", "u64"),
       ("last_sender", "str"), ("read_seq", "u64"), ("unread", "u64"))
class Chat: pass
@frame(None, ("user", "str"), ("online", "bool"), ("last_seen_ms", "u64"))
class PresenceEntry: pass
@frame(None, ("device", "u32"), ("linked_ms", "u64"), ("last_seen_ms", "u64"), ("online", "bool"))
class DeviceInfo: pass
@frame(None, ("conversation", "str"), ("last_seq", "u64"), ("delivered", "u64"), ("read", "u64"),
       ("unread", "u64"), ("from_seq", "u64"), ("peer_delivered", "u64"), ("peer_read", "u64"))
class ConversationSummary: pass
@frame(None, ("device", "u32"), ("identity_signing", "key"), ("identity_dh", "key"),
       ("signed_prekey_id", "u32"), ("signed_prekey", "key"), ("signed_prekey_signature", "sig"),
       ("prekey_kind", "u8"), ("prekey_id", "u32"), ("prekey", "key"), ("prekey_signature", "sig"))
class DeviceBundle: pass
@frame(None, ("user", "str"), ("device", "u32"))
class Address: pass

# A bundle's `prekey_kind`.
PREKEY_ONE_TIME, PREKEY_LAST_RESORT = 1, 2

# Server to client.
@frame(0x40, ("user", "str"), ("device", "u32"), ("server_time_ms", "u64"),
       ("max_body", "u32"), ("idle_timeout_s", "u32"))
class Welcome: pass
@frame(0x41, ("client_id", "u64"), ("conversation", "str"), ("seq", "u64"),
       ("server_id", "u64"), ("timestamp_ms", "u64"))
class Sent: pass
@frame(0x42, ("conversation", "str"), ("seq", "u64"), ("server_id", "u64"),
       ("timestamp_ms", "u64"), ("kind", "u8"), ("sender", "str"),
       ("sender_device", "u32"), ("client_id", "u64"), ("body", "bytes"))
class Message: pass
@frame(0x43, ("conversation", "str"), ("seq", "u64"), ("user", "str"),
       ("device", "u32"), ("kind", "u8"))
class Receipt: pass
@frame(0x44, ("more", "bool"))
class SyncDone: pass
@frame(0x45, ("request", "u32"), ("conversation", "str"), ("seq", "u64"))
class GroupCreated: pass
@frame(0x46, ("request", "u32"), ("conversation", "str"), ("members", "strs"))
class Members: pass
@frame(0x47, ("request", "u32"))
class Done: pass
@frame(0x48, ("nonce", "u64"))
class Pong: pass
@frame(0x49, ("code", "u16"), ("reference", "u64"), ("detail", "str"))
class Error: pass
@frame(0x4A, ("request", "u32"), ("conversation", "str"), ("more", "bool"),
       ("entries", HistoryEntry))
class HistoryPage: pass
@frame(0x4B, ("request", "u32"), ("more", "bool"), ("chats", Chat))
class Chats: pass
@frame(0x4C, ("request", "u32"), ("conversation", "str"), ("seq", "u64"), ("recipients", "u32"),
       ("delivered", "strs"), ("read", "strs"))
class ReceiptSummary: pass
@frame(0x4D, ("conversation", "str"), ("user", "str"), ("device", "u32"), ("active", "bool"),
       ("ttl_ms", "u32"))
class TypingEvent: pass
@frame(0x4E, ("request", "u32"), ("entries", PresenceEntry))
class Presence: pass
@frame(0x4F, ("request", "u32"), ("flags", "u8"))
class SettingsState: pass
@frame(0x50, ("request", "u32"), ("devices", DeviceInfo))
class Devices: pass
@frame(0x51, ("conversations", ConversationSummary))
class SyncSummary: pass
@frame(0x52, ("request", "u32"), ("remaining", "u32"))
class KeyCount: pass
@frame(0x53, ("request", "u32"), ("user", "str"), ("devices", DeviceBundle))
class Bundle: pass
@frame(0x54, ("user", "str"), ("device", "u32"), ("identity_signing", "key"), ("identity_dh", "key"))
class KeyChange: pass
@frame(0x55, ("client_id", "u64"), ("missing", Address), ("stale", Address))
class DeviceMismatch: pass
@frame(0x56, ("request", "u32"), ("from_device", "u32"), ("created_ms", "u64"), ("archive", "bytes"))
class Archive: pass


CLIENT_FRAMES = {c.TYPE: c for c in (Send, Delivered, Read, Sync, GroupCreate,
                                     GroupAdd, GroupRemove, GroupMembers, Ping, Refresh,
                                     History, ChatList, ReceiptQuery, Typing, PresenceQuery,
                                     PresenceSubscribe, Settings, DeviceList, DeviceRemove,
                                     KeysUpload, BundleFetch, SendPerDevice, ArchiveUpload,
                                     ArchiveFetch, KeyCountQuery, PushRegister,
                                     PushUnregister)}
SERVER_FRAMES = {c.TYPE: c for c in (Welcome, Sent, Message, Receipt, SyncDone,
                                     GroupCreated, Members, Done, Pong, Error, HistoryPage,
                                     Chats, ReceiptSummary, TypingEvent, Presence,
                                     SettingsState, Devices, SyncSummary, KeyCount, Bundle,
                                     KeyChange, DeviceMismatch, Archive)}
INTS = {"u8": "<B", "bool": "<B", "u16": "<H", "u32": "<I", "u64": "<Q"}
FIXED = {"key": 32, "sig": 64}


class FrameError(ValueError):
    """Bytes that are not a well-formed frame."""


def encode(f) -> bytes:
    """The payload of one WebSocket binary message carrying frame `f`."""
    out = bytearray([f.TYPE])

    def put_str(s):
        raw = s.encode()
        out.extend(struct.pack("<H", len(raw)) + raw)

    put_fields(out, f, put_str)
    return bytes(out)


def put_fields(out, f, put_str):
    """Appends `f`'s fields; a field whose kind is an item class is a list."""
    for name, kind in f.FIELDS:
        value = getattr(f, name)
        if isinstance(kind, type):
            out.extend(struct.pack("<H", len(value)))
            for item in value:
                put_fields(out, item, put_str)
        elif kind in INTS:
            out.extend(struct.pack(INTS[kind], int(value)))
        elif kind in FIXED:
            if len(value) != FIXED[kind]:
                raise FrameError(f"field `{name}` must be {FIXED[kind]} bytes")
            out.extend(value)
        elif kind == "str":
            put_str(value)
        elif kind == "bytes":
            out.extend(struct.pack("<I", len(value)) + bytes(value))
        elif kind == "strs":
            out.extend(struct.pack("<H", len(value)))
            for s in value:
                put_str(s)
        elif kind == "cursors":
            out.extend(struct.pack("<H", len(value)))
            for c in value:
                put_str(c.conversation)
                out.extend(struct.pack("<Q", c.seq))


def decode(payload: bytes, table=SERVER_FRAMES):
    """Decodes one frame; `table` picks the direction (server frames by default)."""
    if not payload:
        raise FrameError("empty frame")
    cls = table.get(payload[0])
    if cls is None:
        raise FrameError(f"unknown frame type 0x{payload[0]:02x}")
    pos = 1

    def take(n, field):
        nonlocal pos
        if pos + n > len(payload):
            raise FrameError(f"frame truncated in field `{field}`")
        pos += n
        return payload[pos - n:pos]

    def num(fmt, field):
        return struct.unpack(fmt, take(struct.calcsize(fmt), field))[0]

    def get_str(field):
        try:
            return take(num("<H", field), field).decode()
        except UnicodeDecodeError:
            raise FrameError(f"field `{field}` is not UTF-8") from None

    def fields(cls):
        values = {}
        for name, kind in cls.FIELDS:
            values[name] = field(name, kind)
        return cls(**values)

    def field(name, kind):
        if isinstance(kind, type):
            return [fields(kind) for _ in range(num("<H", name))]
        if kind in INTS:
            value = num(INTS[kind], name)
            if kind == "bool":
                if value > 1:
                    raise FrameError(f"field `{name}` is out of range")
                return bool(value)
            return value
        if kind in FIXED:
            return bytes(take(FIXED[kind], name))
        if kind == "str":
            return get_str(name)
        if kind == "bytes":
            return bytes(take(num("<I", name), name))
        if kind == "strs":
            return [get_str(name) for _ in range(num("<H", name))]
        if kind == "cursors":
            return [Cursor(get_str(name), num("<Q", name)) for _ in range(num("<H", name))]
        raise FrameError(f"unknown field kind {kind}")

    frame_value = fields(cls)
    if pos != len(payload):
        raise FrameError(f"{len(payload) - pos} unexpected bytes after the last field")
    return frame_value


def decode_members(body: bytes) -> list[str]:
    """The member list in the body of a MembersAdded / MembersRemoved entry."""
    return decode(bytes([0]) + body, {0: _MemberList}).members


@frame(0x00, ("members", "strs"))
class _MemberList: pass


def direct_conversation(a: str, b: str) -> str:
    """The id of the direct conversation between users `a` and `b`."""
    lo, hi = sorted((a, b))
    return f"d:{lo}:{hi}"


# ----- session --------------------------------------------------------------

class CourierError(Exception):
    """An Error frame that answered one of our requests."""

    def __init__(self, err: Error):
        super().__init__(f"error {err.code}: {err.detail}")
        self.code, self.reference, self.detail = err.code, err.reference, err.detail


def mint_token(user, device=1, gateway="target/release/gateway", data_dir="./data"):
    """A token from `gateway token`, valid for the node using `data_dir`."""
    cmd = [gateway, "token", "--user", user, "--device", str(device), "--data-dir", str(data_dir)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


class Client:
    """One session. Frames that arrive while a call waits for its own answer
    are kept, in order, for `recv`."""

    def __init__(self, ws, welcome: Welcome):
        self.ws, self.welcome = ws, welcome
        self._kept = collections.deque()
        self._request = 0

    @classmethod
    async def connect(cls, token, url=DEFAULT_URL, timeout=10.0):
        """Opens a session; the server's first frame is always Welcome."""
        ws = await ws_connect(url, subprotocols=[SUBPROTOCOL], open_timeout=timeout,
                              additional_headers={"Authorization": f"Bearer {token}"})
        first = decode(await asyncio.wait_for(ws.recv(), timeout))
        if not isinstance(first, Welcome):
            await ws.close()
            raise FrameError(f"expected Welcome first, got {first!r}")
        return cls(ws, first)

    async def put(self, f):
        """Sends one client frame."""
        await self.ws.send(encode(f))

    async def recv(self, timeout=10.0):
        """The next server frame (kept ones first)."""
        if self._kept:
            return self._kept.popleft()
        return decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def wait_for(self, match, timeout=10.0):
        """Reads until `match(frame)`; other frames are kept for `recv`."""
        for i, f in enumerate(self._kept):
            if match(f):
                del self._kept[i]
                return f
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            f = decode(await asyncio.wait_for(self.ws.recv(), max(left, 0.001)))
            if match(f):
                return f
            self._kept.append(f)

    async def send(self, conversation, body: bytes, client_id=None, timeout=10.0) -> Sent:
        """Sends a message and waits for its Sent. Retrying with the same
        `client_id` is safe: the server answers with the original Sent."""
        if client_id is None:
            client_id = random.getrandbits(63) | 1
        await self.put(Send(conversation, client_id, body))
        answer = await self.wait_for(
            lambda f: (isinstance(f, Sent) and f.client_id == client_id)
            or (isinstance(f, Error) and f.reference == client_id), timeout)
        if isinstance(answer, Error):
            raise CourierError(answer)
        return answer

    async def request(self, make, timeout=10.0):
        """Sends a request frame built by `make(request_id)`; returns its answer."""
        self._request += 1
        rid = self._request
        await self.put(make(rid))
        answer = await self.wait_for(
            lambda f: getattr(f, "request", None) == rid
            or (isinstance(f, Error) and f.reference == rid), timeout)
        if isinstance(answer, Error):
            raise CourierError(answer)
        return answer

    async def create_group(self, members, timeout=10.0) -> GroupCreated:
        return await self.request(lambda r: GroupCreate(r, list(members)), timeout)

    async def sync(self, cursors=(), timeout=10.0) -> list[Message]:
        """Catch-up: sends Sync with the cursors held and returns every entry
        missed, in order, paging until SyncDone(more=False). After it the
        session receives live messages."""
        held = {c.conversation: c.seq for c in cursors}
        entries = []
        while True:
            await self.put(Sync(0, False, [Cursor(k, v) for k, v in held.items()]))
            while True:
                f = await self.wait_for(lambda f: isinstance(f, (Message, SyncDone))
                                        or (isinstance(f, Error) and f.reference == 0), timeout)
                if isinstance(f, Error):
                    raise CourierError(f)
                if isinstance(f, SyncDone):
                    break
                entries.append(f)
                held[f.conversation] = max(held.get(f.conversation, 0), f.seq)
            if not f.more:
                return entries

    async def close(self):
        await self.ws.close()


# ----- command line ---------------------------------------------------------

def describe(m: Message) -> str:
    head = f"[{m.conversation} #{m.seq}]"
    if m.kind == KIND_MESSAGE:
        return f"{head} {m.sender}: {m.body.decode(errors='replace')}"
    verb = "added" if m.kind == KIND_MEMBERS_ADDED else "removed"
    return f"{head} {m.sender} {verb} {', '.join(decode_members(m.body))}"


async def run_cli(args) -> int:
    token = mint_token(args.user, args.device, args.gateway, args.data_dir)
    client = await Client.connect(token, args.url)
    try:
        if args.listen:
            return await listen(client, args)
        conversation = args.conversation or direct_conversation(args.user, args.to)
        sent = await client.send(conversation, " ".join(args.text).encode())
        when = time.strftime("%H:%M:%S", time.localtime(sent.timestamp_ms / 1000))
        print(f"SENT {sent.conversation} seq={sent.seq} server_id={sent.server_id} at {when}")
        return 0
    finally:
        await client.close()


async def listen(client: Client, args) -> int:
    """Prints what was missed, then live messages, acking each as delivered."""
    shown = 0
    for m in await client.sync():
        print(describe(m), flush=True)
        await client.put(Delivered(m.conversation, m.seq))
        shown += 1
    deadline = time.monotonic() + args.seconds if args.seconds else None
    while args.count is None or shown < args.count:
        left = deadline - time.monotonic() if deadline else 3600.0
        if left <= 0:
            break
        try:
            f = await client.recv(timeout=left)
        except asyncio.TimeoutError:
            continue
        if isinstance(f, Message):
            print(describe(f), flush=True)
            await client.put(Delivered(f.conversation, f.seq))
            shown += 1
        elif isinstance(f, Receipt):
            kind = "delivered" if f.kind == RECEIPT_DELIVERED else "read"
            print(f"[{f.conversation}] {f.user} {kind} up to #{f.seq}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Send or receive Courier messages.")
    p.add_argument("--user", required=True, help="who you are")
    p.add_argument("--device", type=int, default=1, help="your device number (default 1)")
    p.add_argument("--to", help="send to the direct conversation with this user")
    p.add_argument("--conversation", help="send to this conversation id (for example g:...)")
    p.add_argument("--listen", action="store_true", help="print missed and incoming messages")
    p.add_argument("--count", type=int, help="with --listen: stop after this many messages")
    p.add_argument("--seconds", type=float, help="with --listen: stop after this long")
    p.add_argument("--url", default=DEFAULT_URL, help=f"gateway WebSocket URL (default {DEFAULT_URL})")
    p.add_argument("--gateway", default="target/release/gateway", help="gateway binary, to mint a token")
    p.add_argument("--data-dir", default="./data", help="the node's data directory (default ./data)")
    p.add_argument("text", nargs="*", help="the message to send")
    args = p.parse_args(argv)
    if not args.listen and not (args.to or args.conversation) or not args.listen and not args.text:
        p.error("give --listen, or --to USER (or --conversation ID) and a message")
    try:
        return asyncio.run(run_cli(args))
    except KeyboardInterrupt:
        return 130
    except CourierError as e:
        print(f"courier: {e}", file=sys.stderr)
        return 1
    except websockets.exceptions.InvalidStatus as e:
        status = e.response.status_code
        hint = {401: "the token was refused (wrong --data-dir for this node, or expired)",
                429: "too many connections from this address; try again later"}.get(status, "")
        print(f"courier: the gateway refused the connection: HTTP {status}"
              + (f": {hint}" if hint else ""), file=sys.stderr)
        return 1
    except websockets.exceptions.ConnectionClosed as e:
        close = e.rcvd
        if close is not None and close.code == 4002:
            print("courier: replaced by a newer session of the same user and device "
                  "(use another --device to run both)", file=sys.stderr)
        elif close is not None:
            print(f"courier: the gateway closed the session: {close.code} {close.reason}",
                  file=sys.stderr)
        else:
            print("courier: the connection ended without a close frame", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"courier: minting a token failed: {(e.stderr or '').strip()}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"courier: {e.filename} not found (build it, or pass --gateway)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"courier: cannot reach {args.url}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
