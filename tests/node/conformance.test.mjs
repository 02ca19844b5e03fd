// The gateway against Node's `ws`, an independent RFC 6455 client: a 1:1
// message, fragmented messages with a ping between the fragments, pings in
// both directions, the close handshake started by either side, and messages
// at the size limit and one byte over. Each test starts the real gateway
// binary (target/debug/gateway, or COURIER_GATEWAY_BIN).
//
//   cd tests/node && npm ci && npm test

import assert from "node:assert/strict";
import { inspect } from "node:util";
import { after, before, describe, test } from "node:test";

import {
  Gateway, directConversation, encodePing, encodeSend, encodeSync, within, STEP_MS,
} from "./courier.mjs";

const CONV = directConversation("alice", "bob");
// Tests that send to CONV are devices of alice (at most 4 linked: 1, 2, 10, 11);
// the others use users of their own.
// The defaults: max_body 65,536; a WebSocket message may carry max_body + 1024.
const MAX_BODY = 65536;
const MAX_MESSAGE = MAX_BODY + 1024;
// A Send's bytes besides its body: type, str length and id, client id, body length.
const SEND_OVERHEAD = 1 + 2 + CONV.length + 8 + 4;

describe("the gateway, with ws as the client", () => {
  let gw;
  before(async () => { gw = await Gateway.start(); });
  after(async () => { await gw?.stop(); });

  test("a 1:1 message is acked and delivered", async () => {
    const alice = await gw.live("alice");
    const bob = await gw.live("bob");
    assert.equal(alice.welcome.user, "alice");
    assert.equal(alice.welcome.maxBody, MAX_BODY);
    alice.ws.send(encodeSend(CONV, 41n, Buffer.from("hello from ws")));
    const sent = await alice.next();
    assert.equal(sent.name, "Sent");
    assert.deepEqual([sent.clientId, sent.conversation, sent.seq], [41n, CONV, 1n]);
    const msg = await bob.next();
    assert.equal(msg.name, "Message");
    assert.deepEqual([msg.conversation, msg.seq, msg.serverId, msg.sender, msg.clientId],
      [CONV, 1n, sent.serverId, "alice", 41n]);
    assert.equal(new TextDecoder().decode(msg.body), "hello from ws");
    alice.ws.close(1000);
    bob.ws.close(1000);
    assert.equal((await alice.closeEvent()).code, 1000);
  });

  test("a fragmented message with a ping between its fragments", async () => {
    const alice = await gw.live("alice", 2);
    const frame = encodeSend(CONV, 42n, Buffer.alloc(5000, "f"));
    // ws sends a message in fragments when told which one is the last.
    alice.ws.send(frame.subarray(0, 7), { binary: true, fin: false });
    alice.ws.ping(Buffer.from("between fragments"));
    alice.ws.send(frame.subarray(7, 3000), { binary: true, fin: false });
    alice.ws.send(frame.subarray(3000), { binary: true, fin: true });
    const sent = await alice.next();
    assert.equal(sent.name, "Sent", inspect(sent));
    assert.equal(sent.clientId, 42n);
    assert.deepEqual(alice.pongs.map(String), ["between fragments"]);
    alice.ws.close(1000);
  });

  test("ping from the client gets a pong with its data; protocol Ping gets Pong", async () => {
    const alice = await gw.live("alice3");
    const got = new Promise((ok) => alice.ws.once("pong", ok));
    alice.ws.ping(Buffer.from("are you there"));
    assert.equal(String(await within(got, STEP_MS, "pong")), "are you there");
    alice.ws.send(encodePing(77n));
    assert.deepEqual(await alice.next(), { name: "Pong", nonce: 77n });
    alice.ws.close(1000);
  });

  test("a close started by the client is answered with the same code", async () => {
    for (const [device, code] of [[4, 1000], [5, 4321], [6, 3000]]) {
      const alice = await gw.live(`alice${device}`);
      alice.ws.close(code, "client leaving");
      const closed = await alice.closeEvent();
      assert.equal(closed.code, code, `client closed with ${code}`);
    }
  });

  test("a malformed client frame: Error 400, then the server closes with 4400", async () => {
    const alice = await gw.live("alice7");
    alice.ws.send(Buffer.from([0x7f, 1, 2, 3]));
    const err = await alice.next();
    assert.equal(err.name, "Error");
    assert.equal(err.code, 400);
    assert.match(err.detail, /unknown frame type 0x7f/);
    const closed = await alice.closeEvent();
    assert.deepEqual(closed, { code: 4400, reason: "malformed client frame" });
  });

  test("a framing violation: the server closes with 1002 and a reason", async () => {
    const alice = await gw.live("alice8");
    // ws only writes valid frames; an unmasked one goes on its socket directly.
    alice.ws._socket.write(Buffer.from([0x82, 0x01, 0x00]));
    const closed = await alice.closeEvent();
    assert.deepEqual(closed, { code: 1002, reason: "client frame not masked" });
  });

  test("a text message: the server closes with 1003", async () => {
    const alice = await gw.live("alice9");
    alice.ws.send("text, not binary");
    assert.equal((await alice.closeEvent()).code, 1003);
  });

  test("a body of max_body is stored; one byte more is refused with 413", async () => {
    const alice = await gw.live("alice", 10);
    alice.ws.send(encodeSend(CONV, 100n, Buffer.alloc(MAX_BODY, "m")));
    const sent = await alice.next();
    assert.equal(sent.name, "Sent", inspect(sent));
    alice.ws.send(encodeSend(CONV, 101n, Buffer.alloc(MAX_BODY + 1, "m")));
    const refused = await alice.next();
    assert.deepEqual([refused.name, refused.code, refused.reference], ["Error", 413, 101n]);
  });

  test("a WebSocket message of exactly the limit is read; one byte over closes 1009", async () => {
    const alice = await gw.live("alice", 11);
    // Exactly MAX_MESSAGE bytes: a valid frame, so the answer is about the body (413).
    const atLimit = encodeSend(CONV, 102n, Buffer.alloc(MAX_MESSAGE - SEND_OVERHEAD, "l"));
    assert.equal(atLimit.length, MAX_MESSAGE);
    alice.ws.send(atLimit);
    const answer = await alice.next();
    assert.deepEqual([answer.name, answer.code, answer.reference], ["Error", 413, 102n]);
    // The same, fragmented, to the byte.
    alice.ws.send(atLimit.subarray(0, 40000), { binary: true, fin: false });
    alice.ws.send(atLimit.subarray(40000), { binary: true, fin: true });
    assert.equal((await alice.next()).code, 413);
    // One byte over: the connection is failed with 1009.
    const over = encodeSend(CONV, 103n, Buffer.alloc(MAX_MESSAGE - SEND_OVERHEAD + 1, "o"));
    alice.ws.send(over);
    const closed = await alice.closeEvent();
    assert.deepEqual(closed, { code: 1009, reason: "frame or message over the size limit" });
  });

  test("one byte over the limit across fragments also closes 1009", async () => {
    const alice = await gw.live("alice12");
    const over = Buffer.alloc(MAX_MESSAGE + 1, 0x01);
    alice.ws.send(over.subarray(0, 60000), { binary: true, fin: false });
    alice.ws.send(over.subarray(60000), { binary: true, fin: true });
    assert.equal((await alice.closeEvent()).code, 1009);
  });
});

describe("server pings and a server-started close", () => {
  let gw;
  before(async () => { gw = await Gateway.start(["--ping-interval", "1", "--idle-timeout", "4"]); });
  after(async () => { await gw?.stop(); });

  test("ws answers the server's pings, so a quiet session outlives the idle timeout", async () => {
    const alice = await gw.live("alice");
    let pings = 0;
    alice.ws.on("ping", () => { pings += 1; });
    await new Promise((ok) => setTimeout(ok, 5500));
    assert.ok(pings >= 1, "the server pinged the quiet session");
    assert.equal(alice.ws.readyState, alice.ws.OPEN, "still open past the idle timeout");
    alice.ws.close(1000);
    await alice.closeEvent();
  });

  test("a client that does not answer pings is closed with 4004", async () => {
    // autoPong: false makes ws leave pings unanswered.
    const bob = await gw.connect("bob", 1, { autoPong: false });
    bob.ws.send(encodeSync());
    const closed = await bob.closeEvent(15_000);
    assert.equal(closed.code, 4004);
    assert.ok(closed.reason.length > 0 && Buffer.byteLength(closed.reason) <= 123);
  });
});

describe("the Origin allow-list", () => {
  let gw;
  before(async () => { gw = await Gateway.start(["--allowed-origins", "https://chat.example"]); });
  after(async () => { await gw?.stop(); });

  test("a listed origin and no origin are served; another origin gets 403", async () => {
    const listed = await gw.connect("alice", 1, { origin: "https://chat.example" });
    assert.equal(listed.welcome.name, "Welcome");
    const native = await gw.connect("alice", 2);
    assert.equal(native.welcome.name, "Welcome");
    await assert.rejects(gw.connect("alice", 3, { origin: "https://evil.example" }),
      /Unexpected server response: 403/);
    listed.ws.close(1000);
    native.ws.close(1000);
  });
});
