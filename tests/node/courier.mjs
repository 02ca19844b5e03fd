// A minimal Courier client for the Node suites: the protocol v1 codec of the
// web client (gateway/web/codec.mjs, one module for the page and its tests;
// docs/protocol.md is the reference), a gateway process on its own ports,
// and a session on Node's `ws` that queues what arrives so a test can await
// it with a bound.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

import WebSocket from "ws";

import { SUBPROTOCOL, decodeServer, encodeSync } from "../../gateway/web/codec.mjs";

export {
  SUBPROTOCOL, decodeServer, directConversation, encode, encodePing, encodeSend, encodeSync,
} from "../../gateway/web/codec.mjs";
export const STEP_MS = 10_000;

const ROOT = resolve(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "../..");
export const GATEWAY = process.env.COURIER_GATEWAY_BIN ?? join(ROOT, "target/debug/gateway");

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
    const gw = new Gateway(mkdtempSync(join(tmpdir(), "courier-node-")), extra);
    await gw.spawn("127.0.0.1:0");
    return gw;
  }

  constructor(dir, extra) {
    this.dir = dir;
    this.extra = extra;
  }

  /** Starts the process on `listen`; `url` (WebSocket), `http` (the page's
   * origin) and `metrics` (host:port of /metrics and /admin/) follow. */
  async spawn(listen) {
    const proc = spawn(GATEWAY, [
      "--listen", listen, "--metrics-listen", "127.0.0.1:0", "--cores", "1",
      "--data-dir", join(this.dir, "data"), "--log-format", "json", ...this.extra,
    ], { stdio: ["ignore", "ignore", "pipe"] });
    this.proc = proc;
    const started = new Promise((resolveStart, reject) => {
      proc.once("exit", (code) => reject(new Error(`gateway exited with ${code} at start`)));
      proc.once("error", reject);
      const lines = createInterface({ input: proc.stderr });
      lines.on("line", (line) => {
        let entry;
        try { entry = JSON.parse(line); } catch { return; }
        if (entry.fields?.message === "gateway started") resolveStart(entry.fields);
      });
    });
    const fields = await within(started, STEP_MS, `gateway start (${GATEWAY})`);
    this.addr = fields["listen.addr"];
    this.url = `ws://${this.addr}/ws`;
    this.http = `http://${this.addr}`;
    this.metrics = fields["metrics.addr"];
  }

  /** Kills the process at once (no drain), as a crash would. */
  async kill() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise((ok) => this.proc.once("exit", ok));
      this.proc.kill("SIGKILL");
      await within(exited, STEP_MS, "gateway exit");
    }
  }

  /** Starts it again on the same address and data directory. */
  async restart() {
    await this.kill();
    await this.spawn(this.addr);
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
    await this.kill();
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
