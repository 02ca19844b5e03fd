// A minimal Courier client for the Node suite: the protocol v1 frames the
// tests use (docs/protocol.md is the reference; examples/courier_client.py
// is the full codec), a gateway process on its own ports, and a session on
// Node's `ws` that queues what arrives so a test can await it with a bound.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

import WebSocket from "ws";

export const SUBPROTOCOL = "courier.v1";
export const STEP_MS = 10_000;

const ROOT = resolve(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "../..");
export const GATEWAY = process.env.COURIER_GATEWAY_BIN ?? join(ROOT, "target/debug/gateway");

// ----- frames ----------------------------------------------------------------

const T = {
  SEND: 0x01, SYNC: 0x04, PING: 0x09,
  WELCOME: 0x40, SENT: 0x41, MESSAGE: 0x42, RECEIPT: 0x43, SYNC_DONE: 0x44,
  DONE: 0x47, PONG: 0x48, ERROR: 0x49,
};

class Writer {
  constructor(type) { this.parts = [Buffer.from([type])]; }
  u32(v) { const b = Buffer.alloc(4); b.writeUInt32LE(v); this.parts.push(b); return this; }
  u64(v) { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); this.parts.push(b); return this; }
  u8(v) { this.parts.push(Buffer.from([v])); return this; }
  u16(v) { const b = Buffer.alloc(2); b.writeUInt16LE(v); this.parts.push(b); return this; }
  str(s) { const raw = Buffer.from(s, "utf8"); this.u16(raw.length); this.parts.push(raw); return this; }
  bytes(raw) { this.u32(raw.length); this.parts.push(Buffer.from(raw)); return this; }
  done() { return Buffer.concat(this.parts); }
}

export const encodeSend = (conversation, clientId, body) =>
  new Writer(T.SEND).str(conversation).u64(clientId).bytes(body).done();
// Sync: u16 tail (0: everything missing), bool summary, list<cursor>.
export const encodeSync = (cursors = [], tail = 0, summary = false) => {
  const w = new Writer(T.SYNC).u16(tail).u8(summary ? 1 : 0).u16(cursors.length);
  for (const [conversation, seq] of cursors) w.str(conversation).u64(seq);
  return w.done();
};
export const encodePing = (nonce) => new Writer(T.PING).u64(nonce).done();

class Reader {
  constructor(buf) { this.buf = buf; this.pos = 0; }
  take(n, field) {
    if (this.pos + n > this.buf.length) throw new Error(`frame truncated in field \`${field}\``);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  u8(f) { return this.take(1, f)[0]; }
  u16(f) { return this.take(2, f).readUInt16LE(); }
  u32(f) { return this.take(4, f).readUInt32LE(); }
  u64(f) { return this.take(8, f).readBigUInt64LE(); }
  str(f) { return new TextDecoder("utf-8", { fatal: true }).decode(this.take(this.u16(f), f)); }
  bytes(f) { return Buffer.from(this.take(this.u32(f), f)); }
  finish() { if (this.pos !== this.buf.length) throw new Error("bytes after the last field"); }
}

/** Decodes the server frames the tests meet; others come back as { type }. */
export function decodeServer(buf) {
  const r = new Reader(buf);
  const type = r.u8("type");
  let f;
  switch (type) {
    case T.WELCOME:
      f = { name: "Welcome", user: r.str("user"), device: r.u32("device"),
        serverTimeMs: r.u64("server_time_ms"), maxBody: r.u32("max_body"),
        idleTimeoutS: r.u32("idle_timeout_s") };
      break;
    case T.SENT:
      f = { name: "Sent", clientId: r.u64("client_id"), conversation: r.str("conversation"),
        seq: r.u64("seq"), serverId: r.u64("server_id"), timestampMs: r.u64("timestamp_ms") };
      break;
    case T.MESSAGE:
      f = { name: "Message", conversation: r.str("conversation"), seq: r.u64("seq"),
        serverId: r.u64("server_id"), timestampMs: r.u64("timestamp_ms"), kind: r.u8("kind"),
        sender: r.str("sender"), senderDevice: r.u32("sender_device"),
        clientId: r.u64("client_id"), body: r.bytes("body") };
      break;
    case T.SYNC_DONE:
      f = { name: "SyncDone", more: r.u8("more") === 1 };
      break;
    case T.PONG:
      f = { name: "Pong", nonce: r.u64("nonce") };
      break;
    case T.ERROR:
      f = { name: "Error", code: r.u16("code"), reference: r.u64("reference"), detail: r.str("detail") };
      break;
    default:
      return { name: "Other", type };
  }
  r.finish();
  return f;
}

export const directConversation = (a, b) => {
  const [lo, hi] = [a, b].sort();
  return `d:${lo}:${hi}`;
};

// ----- bounded waiting ---------------------------------------------------------

export function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ----- the gateway process -------------------------------------------------------

/** A gateway on ports the kernel picks, with its own data directory. */
export class Gateway {
  static async start(extra = []) {
    const dir = mkdtempSync(join(tmpdir(), "courier-node-"));
    const proc = spawn(GATEWAY, [
      "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--cores", "1",
      "--data-dir", join(dir, "data"), "--log-format", "json", ...extra,
    ], { stdio: ["ignore", "ignore", "pipe"] });
    const gw = new Gateway(proc, dir);
    const started = new Promise((resolveStart, reject) => {
      proc.once("exit", (code) => reject(new Error(`gateway exited with ${code} at start`)));
      proc.once("error", reject);
      const lines = createInterface({ input: proc.stderr });
      lines.on("line", (line) => {
        let entry;
        try { entry = JSON.parse(line); } catch { return; }
        if (entry.fields?.message === "gateway started") resolveStart(entry.fields["listen.addr"]);
      });
    });
    const addr = await within(started, STEP_MS, `gateway start (${GATEWAY})`);
    gw.url = `ws://${addr}/ws`;
    return gw;
  }

  constructor(proc, dir) {
    this.proc = proc;
    this.dir = dir;
  }

  token(user, device = 1) {
    return execFileSync(GATEWAY, ["token", "--user", user, "--device", String(device),
      "--data-dir", join(this.dir, "data")], { timeout: STEP_MS }).toString().trim();
  }

  /** A session whose Welcome has arrived. */
  async connect(user, device = 1, options = {}) {
    const ws = new WebSocket(this.url, [SUBPROTOCOL], {
      headers: { Authorization: `Bearer ${this.token(user, device)}` },
      handshakeTimeout: STEP_MS,
      ...options,
    });
    const session = new Session(ws);
    await within(new Promise((ok, fail) => {
      ws.once("open", ok);
      ws.once("error", fail);
    }), STEP_MS, `${user}/${device} upgrade`);
    session.welcome = await session.next();
    if (session.welcome.name !== "Welcome") throw new Error(`first frame ${session.welcome.name}`);
    return session;
  }

  /** A session that has caught up and is live; `caughtUp` holds what
   * catch-up delivered. */
  async live(user, device = 1) {
    const s = await this.connect(user, device);
    const held = new Map();
    s.caughtUp = [];
    for (;;) {
      s.ws.send(encodeSync([...held]));
      let f;
      while ((f = await s.next()).name === "Message") {
        s.caughtUp.push(f);
        if (!(held.get(f.conversation) >= f.seq)) held.set(f.conversation, f.seq);
      }
      if (f.name !== "SyncDone") throw new Error(`expected SyncDone, got ${f.name}`);
      if (!f.more) return s;
    }
  }

  async stop() {
    if (this.proc.exitCode === null) {
      const exited = new Promise((ok) => this.proc.once("exit", ok));
      this.proc.kill("SIGKILL");
      await within(exited, STEP_MS, "gateway exit");
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** One session: frames, pongs and the close are queued as they arrive. */
export class Session {
  constructor(ws) {
    this.ws = ws;
    this.frames = [];
    this.waiters = [];
    this.pongs = [];
    this.closed = new Promise((ok) => {
      ws.on("close", (code, reason) => {
        ok({ code, reason: reason.toString() });
        this.wakeAll();
      });
    });
    ws.on("message", (data, isBinary) => {
      let frame;
      try {
        frame = isBinary ? decodeServer(data) : { name: "Text" };
      } catch (e) {
        frame = { name: "Undecodable", error: e.message };
      }
      this.frames.push(frame);
      this.wakeAll();
    });
    ws.on("pong", (data) => this.pongs.push(Buffer.from(data)));
    ws.on("error", () => {});
  }

  wakeAll() {
    for (const wake of this.waiters.splice(0)) wake();
  }

  /** The next frame, within `ms`. */
  async next(ms = STEP_MS) {
    const deadline = Date.now() + ms;
    while (this.frames.length === 0) {
      if (this.ws.readyState === WebSocket.CLOSED) throw new Error("closed while awaiting a frame");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no frame within ${ms} ms`);
      await within(new Promise((ok) => this.waiters.push(ok)), left, "next frame").catch(() => {});
    }
    return this.frames.shift();
  }

  /** The close the server sent (or the library reported), within `ms`. */
  closeEvent(ms = STEP_MS) {
    return within(this.closed, ms, "close");
  }
}
