"""End to end: the real gateway binary, driven by the `websockets` package.

Each test starts its own gateway on free loopback ports with a fresh data
directory, and talks to it through examples/courier_client.py. Nothing here
waits without a bound: every receive has a timeout and every test body runs
under one overall deadline.

    COURIER_GATEWAY_BIN=target/release/gateway python3 -m pytest tests/python
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import courier_client as cc  # noqa: E402

GATEWAY = Path(os.environ.get("COURIER_GATEWAY_BIN", ROOT / "target/release/gateway"))
TEST_DEADLINE_S = 60
STEP_S = 10


def run(coro):
    """Runs one test body under the overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, TEST_DEADLINE_S))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A gateway process on its own ports and data directory."""

    def __init__(self, data_dir: Path):
        if not GATEWAY.exists():
            pytest.fail(f"no gateway binary at {GATEWAY}: cargo build --release -p courier-gateway")
        self.data_dir = data_dir
        self.proc = None
        self.log = open(data_dir.parent / "gateway.log", "ab")

    def start(self, extra=()):
        self.port, metrics_port = free_port(), free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.proc = subprocess.Popen(
            [str(GATEWAY), "--listen", f"127.0.0.1:{self.port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--cores", "1", "--drain-window-ms", "1000",
             "--data-dir", str(self.data_dir), *extra],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + STEP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gateway exited with {self.proc.returncode} at start; see {self.log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("gateway did not accept connections within 10 s")

    def token(self, user, device=1):
        return cc.mint_token(user, device, str(GATEWAY), str(self.data_dir))

    async def client(self, user, device=1) -> cc.Client:
        c = await cc.Client.connect(self.token(user, device), self.url, timeout=STEP_S)
        assert (c.welcome.user, c.welcome.device) == (user, device)
        return c

    async def live(self, user, device=1) -> cc.Client:
        """A session that has caught up (nothing to catch up) and is live."""
        c = await self.client(user, device)
        assert await c.sync(timeout=STEP_S) == []
        return c

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STEP_S)
        self.log.close()


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(tmp_path / "data")
    gw.start()
    yield gw
    gw.stop()


async def closed_with(client: cc.Client) -> int:
    """Reads until the server closes the session; returns its close code."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(100):
            await client.recv(timeout=STEP_S)
    assert closed.value.rcvd is not None, "the connection ended without a close frame"
    return closed.value.rcvd.code


def test_codec_matches_the_worked_example_in_docs():
    """The bytes of docs/protocol.md's worked example, both directions."""
    send = cc.Send("d:alice:bob", 7, b"hi")
    wire = bytes.fromhex("010b00643a616c6963653a626f620700000000000000020000006869")
    assert cc.encode(send) == wire
    assert cc.decode(wire, cc.CLIENT_FRAMES) == send
    sent = bytes.fromhex("4107000000000000000b00643a616c6963653a626f62"
                         "0100000000000000" "00000000aab6dd66" "00a8da769b010000")
    assert cc.decode(sent) == cc.Sent(7, "d:alice:bob", 1, 0x66DDB6AA00000000, 1_767_225_600_000)
    for bad in (b"", b"\x7f", b"\x48\x01", cc.encode(cc.Pong(1)) + b"\x00"):
        with pytest.raises(cc.FrameError):
            cc.decode(bad)


def test_direct_message_and_receipt(gateway):
    async def body():
        alice, bob = await gateway.live("alice"), await gateway.live("bob")
        conv = cc.direct_conversation("alice", "bob")
        before_ms = time.time() * 1000

        sent = await alice.send(conv, b"hello bob", client_id=41)
        assert (sent.client_id, sent.conversation, sent.seq) == (41, "d:alice:bob", 1)
        assert sent.server_id > 0
        assert before_ms - 5000 <= sent.timestamp_ms <= time.time() * 1000 + 5000

        msg = await bob.recv(timeout=STEP_S)
        assert isinstance(msg, cc.Message), msg
        assert (msg.conversation, msg.seq, msg.server_id, msg.timestamp_ms) == \
            (conv, 1, sent.server_id, sent.timestamp_ms)
        assert (msg.kind, msg.sender, msg.sender_device, msg.client_id, msg.body) == \
            (cc.KIND_MESSAGE, "alice", 1, 41, b"hello bob")

        await bob.put(cc.Delivered(conv, 1))
        receipt = await alice.recv(timeout=STEP_S)
        assert receipt == cc.Receipt(conv, 1, "bob", 1, cc.RECEIPT_DELIVERED)
        await bob.put(cc.Read(conv, 1))
        receipt = await alice.recv(timeout=STEP_S)
        assert receipt == cc.Receipt(conv, 1, "bob", 1, cc.RECEIPT_READ)

        # A retry of the same client id gets the original answer back.
        assert await alice.send(conv, b"hello bob", client_id=41) == sent
        await alice.close()
        await bob.close()
    run(body())


def test_typing_privacy_chat_list_and_history(gateway):
    async def body():
        alice, bob = await gateway.live("alice"), await gateway.live("bob")
        conv = cc.direct_conversation("alice", "bob")

        await alice.put(cc.Typing(conv, True))
        typing = await bob.wait_for(lambda f: isinstance(f, cc.TypingEvent), STEP_S)
        assert (typing.user, typing.active, typing.ttl_ms) == ("alice", True, 6000)

        # Bob turns read receipts off: his read reaches alice as delivered only.
        state = await bob.request(lambda r: cc.Settings(r, cc.READ_RECEIPTS_OFF, cc.READ_RECEIPTS_OFF))
        assert state.flags == cc.READ_RECEIPTS_OFF
        for i in range(3):
            await alice.send(conv, f"m{i}".encode(), client_id=100 + i)
        for _ in range(3):
            await bob.wait_for(lambda f: isinstance(f, cc.Message), STEP_S)
        await bob.put(cc.Read(conv, 2))
        receipt = await alice.wait_for(lambda f: isinstance(f, cc.Receipt), STEP_S)
        assert (receipt.seq, receipt.kind) == (2, cc.RECEIPT_DELIVERED)

        chats = await bob.request(lambda r: cc.ChatList(r, 0, "", 0))
        assert [(c.conversation, c.last_seq, c.read_seq, c.unread) for c in chats.chats] == \
            [(conv, 3, 2, 1)]
        page = await bob.request(lambda r: cc.History(r, conv, 0, 2))
        assert ([e.seq for e in page.entries], page.more) == ([2, 3], True)
        assert page.entries[-1].body == b"m2"
        await alice.close()
        await bob.close()
    run(body())


def test_group_create_and_message(gateway):
    async def body():
        alice, bob, carol = [await gateway.live(u) for u in ("alice", "bob", "carol")]

        created = await alice.create_group(["bob", "carol"])
        assert created.conversation.startswith("g:") and created.seq == 1
        group = created.conversation
        for member in (bob, carol):
            entry = await member.recv(timeout=STEP_S)
            assert isinstance(entry, cc.Message), entry
            assert (entry.conversation, entry.seq, entry.kind, entry.sender) == \
                (group, 1, cc.KIND_MEMBERS_ADDED, "alice")
            assert sorted(cc.decode_members(entry.body)) == ["alice", "bob", "carol"]

        sent = await bob.send(group, b"hi all")
        assert (sent.conversation, sent.seq) == (group, 2)
        for member in (alice, carol):
            msg = await member.recv(timeout=STEP_S)
            assert isinstance(msg, cc.Message), msg
            assert (msg.conversation, msg.seq, msg.server_id, msg.sender, msg.body) == \
                (group, 2, sent.server_id, "bob", b"hi all")

        members = await alice.request(lambda r: cc.GroupMembers(r, group))
        assert sorted(members.members) == ["alice", "bob", "carol"]
        for c in (alice, bob, carol):
            await c.close()
    run(body())


def test_catch_up_after_reconnect(gateway):
    async def body():
        alice, bob = await gateway.live("alice"), await gateway.live("bob")
        conv = cc.direct_conversation("alice", "bob")
        await alice.send(conv, b"before")
        first = await bob.recv(timeout=STEP_S)
        assert first.seq == 1
        await bob.close()

        sent = [await alice.send(conv, f"missed {i}".encode()) for i in range(3)]
        assert [s.seq for s in sent] == [2, 3, 4]

        bob = await gateway.client("bob")
        await bob.put(cc.Sync(0, False, [cc.Cursor(conv, first.seq)]))
        got = [await bob.recv(timeout=STEP_S) for _ in range(4)]
        assert [type(f) for f in got] == [cc.Message] * 3 + [cc.SyncDone], got
        assert [(m.seq, m.server_id, m.body) for m in got[:3]] == \
            [(s.seq, s.server_id, f"missed {i}".encode()) for i, s in enumerate(sent)]
        assert got[3].more is False

        # Now live: the next message is pushed.
        await alice.send(conv, b"live again")
        live = await bob.recv(timeout=STEP_S)
        assert (live.seq, live.body) == (5, b"live again")
        await alice.close()
        await bob.close()
    run(body())


def test_bad_token_is_refused_with_401(gateway, tmp_path):
    async def body():
        # A token signed by another node's secret (`gateway token` only
        # signs with a secret a node already made, so make one here).
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "jwt.secret").write_text(os.urandom(32).hex())
        other_node = cc.mint_token("alice", 1, str(GATEWAY), str(elsewhere))
        for token in ("not-a-jwt", other_node):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await cc.Client.connect(token, gateway.url, timeout=STEP_S)
            assert refused.value.response.status_code == 401
        # No token at all is refused the same way.
        with pytest.raises(websockets.InvalidStatus) as refused:
            await ws_connect(gateway.url, subprotocols=[cc.SUBPROTOCOL], open_timeout=STEP_S)
        assert refused.value.response.status_code == 401
        # A good token without the subprotocol is a bad request.
        headers = {"Authorization": f"Bearer {gateway.token('alice')}"}
        with pytest.raises(websockets.InvalidStatus) as refused:
            await ws_connect(gateway.url, additional_headers=headers, open_timeout=STEP_S)
        assert refused.value.response.status_code == 400
    run(body())


def test_malformed_frame_gets_error_400_then_close_4400(gateway):
    async def body():
        malformed = [
            bytes([0x7F]),                    # unknown frame type
            bytes([0x09, 1, 2, 3]),           # Ping with a truncated nonce
            cc.encode(cc.Ping(1)) + b"\x00",  # a byte after the last field
        ]
        for payload in malformed:
            c = await gateway.client("alice")
            await c.ws.send(payload)
            err = await c.recv(timeout=STEP_S)
            assert isinstance(err, cc.Error), err
            assert (err.code, err.reference) == (400, 0)
            assert await closed_with(c) == 4400
        # A text frame is not protocol v1 at all.
        c = await gateway.client("alice")
        await c.ws.send("hello")
        assert await closed_with(c) == 1003
    run(body())


def test_sigterm_closes_with_1001_and_restart_keeps_messages(gateway):
    async def body():
        alice, bob = await gateway.live("alice"), await gateway.live("bob")
        conv = cc.direct_conversation("alice", "bob")
        sent = [await alice.send(conv, f"kept {i}".encode(), client_id=100 + i) for i in range(2)]
        for s in sent:
            assert (await bob.recv(timeout=STEP_S)).server_id == s.server_id

        gateway.proc.send_signal(signal.SIGTERM)
        assert await closed_with(alice) == 1001
        assert await closed_with(bob) == 1001
        assert await asyncio.to_thread(gateway.proc.wait, STEP_S) == 0

        gateway.start()
        bob = await gateway.client("bob")
        await bob.put(cc.Sync(0, False, [cc.Cursor(conv, 0)]))
        got = [await bob.recv(timeout=STEP_S) for _ in range(3)]
        assert [(m.seq, m.server_id, m.body) for m in got[:2]] == \
            [(s.seq, s.server_id, f"kept {i}".encode()) for i, s in enumerate(sent)]
        assert got[2] == cc.SyncDone(False)

        # Dedupe survived the restart: a retry gets the original Sent.
        alice = await gateway.client("alice")
        assert await alice.send(conv, b"kept 0", client_id=100) == sent[0]
        # And the sequence continues where it stopped.
        assert (await alice.send(conv, b"after restart")).seq == 3
        await alice.close()
        await bob.close()
    run(body())


def test_key_directory_and_per_device_send(gateway):
    """Keys signed with an independent Ed25519 implementation are accepted,
    come back in a bundle whose signatures it verifies, a forged one is
    refused, and a per-device send with a wrong device list is answered
    with the devices to fix."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def raw(public_key):
        return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def x25519():
        return raw(X25519PrivateKey.generate().public_key())

    identity = Ed25519PrivateKey.generate()
    spk, last_resort = x25519(), x25519()

    def upload(r, forge=False):
        spk_sig = identity.sign(cc.prekey_signing_message(False, 1, spk))
        if forge:
            spk_sig = bytes([spk_sig[0] ^ 1]) + spk_sig[1:]
        return cc.KeysUpload(
            r, raw(identity.public_key()), x25519(), 1, spk, spk_sig,
            0xFFFFFFFF, last_resort, identity.sign(cc.prekey_signing_message(True, 0xFFFFFFFF,
                                                                             last_resort)),
            [cc.Prekey(i, x25519()) for i in (1, 2, 3)])

    async def body():
        alice, bob = await gateway.live("alice"), await gateway.live("bob")
        count = await alice.request(upload)
        assert isinstance(count, cc.KeyCount) and count.remaining == 3
        with pytest.raises(cc.CourierError) as refused:
            await alice.request(lambda r: upload(r, forge=True))
        assert refused.value.code == 400

        bundle = await bob.request(lambda r: cc.BundleFetch(r, "alice"))
        assert isinstance(bundle, cc.Bundle) and len(bundle.devices) == 1
        d = bundle.devices[0]
        assert (d.device, d.prekey_kind, d.prekey_id) == (1, cc.PREKEY_ONE_TIME, 1)
        assert d.signed_prekey == spk
        # Raises if the signature the server relayed does not verify.
        identity.public_key().verify(d.signed_prekey_signature,
                                     cc.prekey_signing_message(False, 1, d.signed_prekey))

        conv = cc.direct_conversation("alice", "bob")
        await bob.put(cc.SendPerDevice(conv, 7, [cc.Ciphertext("alice", 2, b"sealed")]))
        mismatch = await bob.wait_for(lambda f: isinstance(f, cc.DeviceMismatch), STEP_S)
        assert (mismatch.client_id, mismatch.missing, mismatch.stale) == \
            (7, [cc.Address("alice", 1)], [cc.Address("alice", 2)])
        err = await bob.wait_for(lambda f: isinstance(f, cc.Error), STEP_S)
        assert (err.code, err.reference) == (409, 7)

        await bob.put(cc.SendPerDevice(conv, 7, [cc.Ciphertext("alice", 1, b"sealed for 1")]))
        await bob.wait_for(lambda f: isinstance(f, cc.Sent) and f.client_id == 7, STEP_S)
        msg = await alice.wait_for(lambda f: isinstance(f, cc.Message), STEP_S)
        assert msg.body == b"sealed for 1"
        await alice.close()
        await bob.close()

    run(body())


def test_push_webhook_is_signed_and_carries_no_plaintext(tmp_path):
    """A Python webhook receiver checks the node's notification: the
    HMAC-SHA256 signature over "<timestamp>.<body>" (computed here with
    Python's hmac, independently of the Rust code), and a body with the
    conversation, sender and count but not the message."""
    import hashlib
    import hmac
    import http.server
    import json
    import threading

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = b"python-side-secret"
    (tmp_path / "hook.secret").write_bytes(secret + b"\n")
    gw = Gateway(tmp_path / "data")
    gw.start(["--push-webhook-url", f"http://127.0.0.1:{server.server_address[1]}/hook",
              "--push-webhook-secret-file", str(tmp_path / "hook.secret"),
              "--push-delay-ms", "300"])
    try:
        async def body():
            bob = await gw.client("bob")
            done = await bob.request(lambda r: cc.PushRegister(r, cc.PUSH_WEBHOOK, "bob-token", False))
            assert isinstance(done, cc.Done)
            with pytest.raises(cc.CourierError):
                await bob.request(lambda r: cc.PushRegister(r, cc.PUSH_APNS, "abcd", False))
            await bob.close()
            alice = await gw.live("alice")
            for i in range(3):
                await alice.send(cc.direct_conversation("alice", "bob"), b"the plaintext", client_id=i + 1)
            deadline = time.monotonic() + STEP_S
            while not received and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            await alice.close()
        run(body())
    finally:
        gw.stop()
        server.shutdown()
    assert len(received) == 1, received
    path, headers, body = received[0]
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/hook"
    ts = headers["x-courier-timestamp"]
    assert abs(int(ts) - time.time()) < 120
    expected = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-courier-signature"], "sha256=" + expected)
    note = json.loads(body)
    assert note["type"] == "message"
    assert (note["token"], note["conversation"], note["sender"], note["count"], note["seq"]) == \
        ("bob-token", "d:alice:bob", "alice", 3, 3)
    assert b"plaintext" not in body
