// The web client and the gateway in headless Chromium: Debian's `chromium`
// package, driven by playwright-core (which never downloads a browser).
//
// 1. Two pages, alice and bob, chat through the page the gateway serves:
//    ticks go pending → sent → delivered → read, typing shows, a reload
//    catches up, and a message typed while the gateway is down is sent once
//    it is back.
// 2. WebSocket conformance from inside Chromium, with the browser's own
//    WebSocket: messages at the size limit, pings answered by the browser,
//    and the close handshake started by either side.
//
// Screenshots of the two pages go to bench-out/ (ignored by git).
//
//   cd tests/node && npm ci && npm run test:browser

import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";

import { chromium } from "playwright-core";

import { Gateway, STEP_MS, directConversation } from "./courier.mjs";

const CHROMIUM = process.env.COURIER_CHROMIUM ?? "/usr/bin/chromium";
// --headless is playwright's own (headless: true); the rest keep a browser
// on a machine without a network from calling out at all.
const FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const HERE = import.meta.dirname ?? new URL(".", import.meta.url).pathname;
const SHOTS = resolve(HERE, "../../bench-out");
const MAX_BODY = 65536;
const MAX_MESSAGE = MAX_BODY + 1024;

/** Chromium with a fresh profile directory, removed by `close`. */
async function launch() {
  assert.ok(existsSync(CHROMIUM),
    `${CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)`);
  const profile = mkdtempSync(join(tmpdir(), "courier-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS,
    viewport: { width: 960, height: 600 }, timeout: STEP_MS,
  });
  context.setDefaultTimeout(STEP_MS);
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** A page of the web client signed in as `user`, live. Collects what the
 * policy refused and what the page threw. */
async function openApp(browser, gw, user) {
  const page = await browser.context.newPage();
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(`error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") page.problems.push(`console: ${m.text()}`);
  });
  await page.goto(`${gw.http}/app/#token=${gw.token(user)}`);
  await page.locator('#status[data-state="live"]').waitFor();
  return page;
}

/** Records every tick state a message of this page shows, per client id. */
function recordTicks(page) {
  return page.evaluate(() => {
    window.ticks = {};
    const note = (node) => {
      const { clientId, status } = node.dataset ?? {};
      if (!clientId || !status) return;
      const seen = (window.ticks[clientId] ??= []);
      if (seen.at(-1) !== status) seen.push(status);
    };
    new MutationObserver((records) => {
      for (const r of records) {
        if (r.type === "attributes") note(r.target);
        r.addedNodes.forEach(note);
      }
    }).observe(document.getElementById("messages"),
      { subtree: true, childList: true, attributes: true, attributeFilter: ["data-status"] });
  });
}

const message = (page, body) => page.locator("#messages li.msg", { hasText: body });

async function expectStatus(page, body, status) {
  await message(page, body).and(page.locator(`[data-status="${status}"]`)).waitFor();
}

describe("two pages chat through the web client", () => {
  let gw;
  let browser;
  before(async () => {
    gw = await Gateway.start();
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await gw?.stop();
  });

  test("ticks turn to read, typing shows, a reload catches up", async () => {
    const alice = await openApp(browser, gw, "alice");
    assert.equal(await alice.locator("#me").textContent(), "alice · device 1");
    await recordTicks(alice);

    // Alice starts the conversation; bob has never connected.
    await alice.fill("#new-chat-user", "bob");
    await alice.press("#new-chat-user", "Enter");
    await alice.locator("#conv-title", { hasText: "bob" }).waitFor();
    await alice.fill("#composer-input", "hello bob");
    await alice.press("#composer-input", "Enter");
    await expectStatus(alice, "hello bob", "sent");

    // Bob signs in: catch-up brings the message and his page acks it, so
    // alice sees two ticks; he has not opened the conversation yet.
    const bob = await openApp(browser, gw, "bob");
    const row = bob.locator(`#chats [data-conversation="${directConversation("alice", "bob")}"]`);
    await row.locator(".badge", { hasText: "1" }).waitFor();
    await expectStatus(alice, "hello bob", "delivered");

    // Opening it reads it.
    await row.click();
    await message(bob, "hello bob").waitFor();
    await expectStatus(alice, "hello bob", "read");
    const ticks = await alice.evaluate(() => Object.values(window.ticks));
    assert.deepEqual(ticks, [["pending", "sent", "delivered", "read"]]);

    // Bob types: alice's header says so, until his message arrives.
    await bob.locator("#composer-input").pressSequentially("on my", { delay: 30 });
    await alice.locator("#typing", { hasText: "typing…" }).waitFor();
    await bob.locator("#composer-input").pressSequentially(" way", { delay: 30 });
    await bob.press("#composer-input", "Enter");
    await message(alice, "on my way").waitFor();
    await alice.locator("#typing:empty").waitFor({ state: "attached" });
    // Alice has the conversation open, so bob's message turns read too.
    await expectStatus(bob, "on my way", "read");

    mkdirSync(SHOTS, { recursive: true });
    await alice.screenshot({ path: join(SHOTS, "web-client-alice.png") });
    await bob.screenshot({ path: join(SHOTS, "web-client-bob.png") });

    // A reload: the token and the open conversation come back from this
    // tab's storage, history and ticks from the gateway.
    await alice.reload();
    await alice.locator('#status[data-state="live"]').waitFor();
    await expectStatus(alice, "hello bob", "read");
    await message(alice, "on my way").waitFor();
    assert.equal(await alice.locator("#messages li.msg").count(), 2);

    for (const page of [alice, bob]) assert.deepEqual(page.problems, []);
    await alice.close();
    await bob.close();
  });

  test("a message sent while the gateway is down goes out once it is back", async () => {
    const carol = await openApp(browser, gw, "carol");
    await carol.fill("#new-chat-user", "dave");
    await carol.press("#new-chat-user", "Enter");
    await gw.kill();
    await carol.locator('#status[data-state="offline"]').waitFor();
    await carol.fill("#composer-input", "sent while offline");
    await carol.press("#composer-input", "Enter");
    await expectStatus(carol, "sent while offline", "pending");
    const clientId = await message(carol, "sent while offline").getAttribute("data-client-id");

    await gw.restart();
    await carol.locator('#status[data-state="live"]').waitFor({ timeout: 20_000 });
    await expectStatus(carol, "sent while offline", "sent");
    const sent = message(carol, "sent while offline");
    assert.equal(await sent.getAttribute("data-client-id"), clientId, "the same client id");
    assert.equal(await sent.getAttribute("data-seq"), "1");

    // Dave gets it once.
    const dave = await openApp(browser, gw, "dave");
    await dave.locator(`#chats [data-conversation="${directConversation("carol", "dave")}"]`).click();
    await message(dave, "sent while offline").waitFor();
    assert.equal(await dave.locator("#messages li.msg").count(), 1);
    assert.deepEqual([...carol.problems, ...dave.problems], []);
    await carol.close();
    await dave.close();
  });

  test("a link with a malformed token shows the sign-in form with the reason", async () => {
    const page = await browser.context.newPage();
    await page.goto(`${gw.http}/app/#token=not-a-token`);
    await page.locator("#login").waitFor({ state: "visible" });
    assert.equal(await page.locator("#login-error").textContent(), "That is not a Courier token.");
    assert.equal(await page.locator("#chat").isVisible(), false);
    await page.close();
  });
});

// ----- conformance from inside Chromium ---------------------------------------------

/** Installed in a page of the gateway's origin: sessions on the browser's
 * own WebSocket, with the page's codec, that queue what arrives. Frames
 * cross back to Node as plain JSON (u64 values as strings). */
async function installHarness() {
  const codec = await import("/app/codec.mjs");
  const plain = (f) => JSON.parse(JSON.stringify(f, (_, v) => {
    if (typeof v === "bigint") return v.toString();
    if (v instanceof Uint8Array) return { length: v.length };
    return v;
  }));
  window.codec = codec;
  window.sessions = [];
  window.openSession = (token) => new Promise((resolveOpen, reject) => {
    const url = `ws://${location.host}/ws?access_token=${encodeURIComponent(token)}`;
    const ws = new WebSocket(url, codec.SUBPROTOCOL);
    ws.binaryType = "arraybuffer";
    const s = { ws, frames: [], waiters: [], close: null };
    const wake = () => s.waiters.splice(0).forEach((w) => w());
    ws.onmessage = (ev) => { s.frames.push(plain(codec.decodeServer(ev.data))); wake(); };
    ws.onclose = (ev) => {
      s.close = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
      wake();
      reject(new Error(`closed before open: ${ev.code}`));
    };
    ws.onopen = () => resolveOpen(window.sessions.push(s) - 1);
  });
  /** The next frame, or the close, of session `i`, within `ms`. */
  window.nextEvent = async (i, ms) => {
    const s = window.sessions[i];
    const deadline = Date.now() + ms;
    while (!s.frames.length && !s.close && Date.now() < deadline) {
      await new Promise((ok) => {
        s.waiters.push(ok);
        setTimeout(ok, deadline - Date.now());
      });
    }
    if (s.frames.length) return { frame: s.frames.shift() };
    return s.close ? { close: s.close } : { timeout: true };
  };
  window.sendFrame = (i, name, fields) => window.sessions[i].ws.send(codec.encode(name, fields));
}

/** A browser page of `gw`'s origin with the harness installed. */
async function harnessPage(browser, gw) {
  const page = await browser.context.newPage();
  await page.goto(`${gw.http}/app/`);
  await page.evaluate(installHarness);
  const session = {
    async open(user, device = 1) {
      const index = await page.evaluate((t) => window.openSession(t), gw.token(user, device));
      const s = { index, page };
      s.next = async (ms = STEP_MS) => page.evaluate(([i, t]) => window.nextEvent(i, t), [index, ms]);
      s.frame = async (ms) => {
        const e = await s.next(ms);
        assert.ok(e.frame, `expected a frame, got ${JSON.stringify(e)}`);
        return e.frame;
      };
      s.closeEvent = async (ms = STEP_MS) => {
        for (;;) {
          const e = await s.next(ms);
          if (!e.frame) return e.close ?? assert.fail("no close in time");
        }
      };
      s.send = (name, fields) => page.evaluate(([i, n, f]) => {
        // Numbers that must be u64 travel as strings.
        for (const k of ["clientId", "seq", "nonce", "beforeSeq", "beforeMs"]) {
          if (typeof f[k] === "string") f[k] = BigInt(f[k]);
        }
        if (typeof f.bodyLength === "number") {
          f.body = new Uint8Array(f.bodyLength).fill(0x61);
          delete f.bodyLength;
        }
        window.sendFrame(i, n, f);
      }, [index, name, fields]);
      s.sendRaw = (length) => page.evaluate(([i, n]) => {
        window.sessions[i].ws.send(new Uint8Array(n).fill(1));
      }, [index, length]);
      s.sendText = (t) => page.evaluate(([i, x]) => window.sessions[i].ws.send(x), [index, t]);
      s.closeWith = (code, reason) =>
        page.evaluate(([i, c, r]) => window.sessions[i].ws.close(c, r), [index, code, reason]);
      s.readyState = () => page.evaluate((i) => window.sessions[i].ws.readyState, index);
      const welcome = await s.frame();
      assert.equal(welcome.name, "Welcome");
      s.welcome = welcome;
      return s;
    },
    /** A session that has caught up (and so gets pushes). */
    async live(user, device = 1) {
      const s = await this.open(user, device);
      await s.send("Sync", { tail: 0, summary: false, cursors: [] });
      for (let f = await s.frame(); f.name !== "SyncDone"; f = await s.frame()) { /* catch-up */ }
      return s;
    },
    page,
  };
  return session;
}

describe("WebSocket conformance, Chromium's WebSocket against the gateway", () => {
  let gw;
  let browser;
  let h;
  before(async () => {
    gw = await Gateway.start(["--ping-interval", "1", "--idle-timeout", "3", "--drain-window-ms", "0"]);
    browser = await launch();
    h = await harnessPage(browser, gw);
  });
  after(async () => {
    await browser?.close();
    await gw?.stop();
  });

  const CONV = directConversation("erin", "frank");
  const SEND_OVERHEAD = 1 + 2 + CONV.length + 8 + 4;

  test("a message at the size limit is read; one byte over closes 1009", async () => {
    const erin = await h.open("erin");
    const frank = await h.live("frank");
    assert.equal(erin.welcome.maxBody, MAX_BODY);
    // A body of max_body is stored and reaches frank in one 64-bit-length frame.
    await erin.send("Send", { conversation: CONV, clientId: "1", bodyLength: MAX_BODY });
    const sent = await erin.frame();
    assert.deepEqual([sent.name, sent.seq], ["Sent", "1"]);
    const got = await frank.frame();
    assert.deepEqual([got.name, got.body.length, got.sender], ["Message", MAX_BODY, "erin"]);
    // A WebSocket message of exactly max_body + 1024 bytes is read (its body
    // is too big for a Send: 413, the session stays).
    await erin.send("Send", {
      conversation: CONV, clientId: "2", bodyLength: MAX_MESSAGE - SEND_OVERHEAD,
    });
    const refused = await erin.frame();
    assert.deepEqual([refused.name, refused.code, refused.reference], ["Error", 413, "2"]);
    // One byte more fails the connection.
    await erin.sendRaw(MAX_MESSAGE + 1);
    const closed = await erin.closeEvent();
    assert.deepEqual(closed,
      { code: 1009, reason: "frame or message over the size limit", wasClean: true });
    await frank.closeWith(1000);
  });

  test("the browser answers the server's pings: a quiet session outlives the idle timeout", async () => {
    const s = await h.live("gina");
    await new Promise((ok) => setTimeout(ok, 4500));
    assert.equal(await s.readyState(), 1, "open past the 3 s idle timeout");
    await s.send("Ping", { nonce: "77" });
    assert.deepEqual(await s.frame(), { name: "Pong", nonce: "77" });
    await s.closeWith(1000);
  });

  test("a close from the browser is echoed with its code", async () => {
    for (const [device, code] of [[1, 1000], [2, 3000], [3, 4321]]) {
      const s = await h.open("hank", device);
      await s.closeWith(code, "leaving");
      assert.deepEqual(await s.closeEvent(), { code, reason: "", wasClean: true });
    }
  });

  test("a text message closes 1003", async () => {
    const s = await h.open("ivan");
    await s.sendText("text, not binary");
    assert.equal((await s.closeEvent()).code, 1003);
  });

  test("an operator disconnect reaches the browser as 4007", async () => {
    const s = await h.live("judy");
    const res = await fetch(`http://${gw.metrics}/admin/disconnect?user=judy&device=1`,
      { method: "POST" });
    assert.equal(res.status, 200);
    assert.deepEqual(await s.closeEvent(),
      { code: 4007, reason: "disconnected by an operator", wasClean: true });
  });

  test("a drain reaches the browser as 1001 with a reconnect hint", async () => {
    const s = await h.live("kim");
    gw.proc.kill("SIGTERM");
    const closed = await s.closeEvent();
    assert.equal(closed.code, 1001);
    assert.match(closed.reason, /^server draining; reconnect after \d+ ms$/);
    assert.equal(closed.wasClean, true);
  });
});
