// Courier's web client: one session (one device) in a browser tab.
//
// What it does, in the order a session lives (docs/web-client.md has the
// whole story, docs/protocol.md the frames):
//   1. takes a token from the URL fragment (#token=…) or the sign-in form and
//      keeps it in sessionStorage (this tab only), never in the address bar;
//   2. opens ws(s)://<this host>/ws?access_token=… with courier.v1;
//   3. on Welcome: Sync (tail 50, with a summary) until SyncDone{more: false},
//      the chat list, and a resend of every message still waiting for Sent;
//   4. live: messages, receipts and typing are pushed; it acks what arrives
//      with Delivered, and sends Read for the conversation that is open while
//      the tab is visible;
//   5. when the connection drops: reconnects with backoff (or the drain's
//      hint) and goes back to 3. Unsent messages survive a reload: they wait
//      in sessionStorage with their client ids.
//
// The DOM is built with textContent only (the page's policy refuses HTML
// from strings), so a message body can never become markup.

import {
  EntryKind, ReceiptKind, SUBPROTOCOL, decodeMembers, decodeServer, directConversation, encode,
  peerOf, validUser,
} from "./codec.mjs";

/** Newest entries per conversation that catch-up and a first History bring. */
const PAGE = 50;
/** Typing: `active` again after this long while the user keeps typing (the
 * server's indicator lasts 6 s), so at most one frame per 3 s. */
const TYPING_RENEW_MS = 3000;
/** Reconnect backoff: first delay, cap. Each wait is jittered to 50–100 %. */
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30_000;
/** Close codes after which reconnecting with the same token is pointless. */
const SIGN_IN_AGAIN = new Map([
  [4001, "Your token expired. Sign in with a new one."],
  [4005, "This device was removed. Sign in with a new token."],
  [4006, "This user already has the most devices linked. Unlink one, then sign in."],
]);
const TOKEN_KEY = "courier.token";

const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();
const text = new TextDecoder();

// ----- state -------------------------------------------------------------------------

/** Everything the tab knows. Lives as long as the page; only the token, the
 * outbox and the open conversation are saved (sessionStorage), everything
 * else is fetched again after a reload. */
const state = {
  token: null,
  claims: { sub: "", dev: 0 },
  ws: null,
  /** Welcome seen on this connection. */
  welcomed: false,
  /** Catch-up finished: pushes flow. */
  live: false,
  /** A Welcome was ever seen with this token (a failure before that is
   * probably the token). */
  everWelcomed: false,
  maxBody: 65536,
  attempt: 0,
  reconnectTimer: null,
  /** id -> Conversation, see conversation(). */
  conversations: new Map(),
  open: null,
  /** Messages without a Sent yet: { clientId (string), conversation, text, at, failed }. */
  outbox: [],
  nextRequest: 1,
  /** request id -> callback(frame) for History, Chats, ReceiptSummary, Presence. */
  pending: new Map(),
  presence: new Map(),
  typingSent: { conversation: null, at: 0 },
  receiptsTimer: null,
  renderTimer: null,
};

function conversation(id) {
  let c = state.conversations.get(id);
  if (!c) {
    c = {
      id,
      peer: peerOf(id, state.claims.sub),
      /** seq -> entry; entries this tab holds, from catch-up, live or History. */
      entries: new Map(),
      lastSeq: 0,
      lastMs: 0,
      lastSender: "",
      readSeq: 0,
      /** Highest seq this tab holds as delivered by the peer / read by the peer. */
      peerDelivered: 0,
      peerRead: 0,
      /** Highest seq received and not yet acked with Delivered. */
      received: 0,
      deliveredSent: 0,
      /** Older entries exist on the server (History said more). */
      older: false,
      historyAsked: false,
      /** user -> timer of its typing indicator. */
      typing: new Map(),
    };
    state.conversations.set(id, c);
  }
  return c;
}

const maxSeq = (c) => c.entries.size ? Math.max(...c.entries.keys()) : 0;
const minSeq = (c) => c.entries.size ? Math.min(...c.entries.keys()) : 0;
const unread = (c) => Math.max(0, c.lastSeq - c.readSeq);

// ----- storage -----------------------------------------------------------------------

const outboxKey = () => `courier.outbox.${state.claims.sub}.${state.claims.dev}`;
const openKey = () => `courier.open.${state.claims.sub}.${state.claims.dev}`;

function saveOutbox() {
  sessionStorage.setItem(outboxKey(), JSON.stringify(state.outbox));
}

function loadSaved() {
  try {
    state.outbox = JSON.parse(sessionStorage.getItem(outboxKey()) ?? "[]");
  } catch {
    state.outbox = [];
  }
  state.open = sessionStorage.getItem(openKey());
  if (state.open) conversation(state.open);
}

/** The token's claims, read without checking the signature (the gateway
 * checks it): who this tab will be, before Welcome says so. */
function readClaims(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64));
    return { sub: String(claims.sub ?? ""), dev: Number(claims.dev ?? 0) };
  } catch {
    return null;
  }
}

// ----- connection ----------------------------------------------------------------------

function connect() {
  clearTimeout(state.reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/ws?access_token=${encodeURIComponent(state.token)}`;
  const ws = new WebSocket(url, SUBPROTOCOL);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  state.welcomed = false;
  state.live = false;
  setStatus("connecting", "connecting…");
  ws.onmessage = (ev) => {
    if (state.ws !== ws) return;
    let frame;
    try {
      frame = decodeServer(ev.data);
    } catch (e) {
      console.warn("undecodable frame", e);
      return;
    }
    handle(frame);
  };
  ws.onclose = (ev) => {
    if (state.ws === ws) closed(ev);
  };
}

function send(name, fields) {
  if (state.ws?.readyState !== WebSocket.OPEN || !state.welcomed) return false;
  state.ws.send(encode(name, fields));
  return true;
}

function request(name, fields, answer) {
  const id = state.nextRequest;
  state.nextRequest = state.nextRequest >= 0xffffffff ? 1 : state.nextRequest + 1;
  if (send(name, { ...fields, request: id })) state.pending.set(id, answer);
}

function closed(ev) {
  state.ws = null;
  state.welcomed = false;
  state.live = false;
  state.pending.clear();
  for (const c of state.conversations.values()) clearTyping(c);
  const signIn = SIGN_IN_AGAIN.get(ev.code);
  if (signIn) return signOut(signIn);
  if (ev.code === 4002) {
    setStatus("stopped", "open in another tab");
    return;
  }
  if (!state.everWelcomed && state.attempt >= 2) {
    return signOut("Could not connect: the token may be invalid or expired, or the gateway is down.");
  }
  // 1001 (drain) says how long to wait before the first attempt.
  const hint = /reconnect after (\d+) ms/.exec(ev.reason ?? "");
  const backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt);
  const wait = hint && state.attempt === 0
    ? Number(hint[1])
    : Math.round(backoff * (0.5 + Math.random() / 2));
  state.attempt += 1;
  setStatus("offline", `offline, retrying in ${Math.ceil(wait / 1000)} s`);
  state.reconnectTimer = setTimeout(connect, wait);
  scheduleRender();
}

function signOut(message = "") {
  clearTimeout(state.reconnectTimer);
  const ws = state.ws;
  state.ws = null;
  ws?.close(1000, "signed out");
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  $("chat").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
}

/** Catch-up from what this tab holds; SyncDone{more} asks again. */
function sync(summary) {
  const cursors = [];
  for (const c of state.conversations.values()) {
    const held = maxSeq(c);
    if (held > 0) cursors.push({ conversation: c.id, seq: held });
  }
  send("Sync", { tail: PAGE, summary, cursors });
}

// ----- frames from the gateway ------------------------------------------------------------

function handle(f) {
  switch (f.name) {
    case "Welcome":
      state.welcomed = true;
      state.everWelcomed = true;
      state.attempt = 0;
      state.maxBody = f.maxBody;
      state.claims = { sub: f.user, dev: f.device };
      setStatus("syncing", "catching up…");
      sync(true);
      request("ChatList", { beforeMs: 0, beforeConversation: "", limit: 200 }, chats);
      for (const m of state.outbox) if (!m.failed) sendQueued(m);
      if (state.open) openConversation(state.open, { refresh: true });
      break;
    case "SyncSummary":
      for (const row of f.conversations) {
        const c = conversation(row.conversation);
        c.lastSeq = Math.max(c.lastSeq, Number(row.lastSeq));
        c.readSeq = Math.max(c.readSeq, Number(row.read));
        c.peerDelivered = Math.max(c.peerDelivered, Number(row.peerDelivered));
        c.peerRead = Math.max(c.peerRead, Number(row.peerRead));
        // Entries the tail left behind: History brings them when opened.
        if (Number(row.fromSeq) > Number(row.delivered) + 1) c.older = true;
      }
      break;
    case "Message":
      received(f.conversation, f);
      break;
    case "SyncDone":
      if (f.more) {
        sync(false);
      } else {
        state.live = true;
        setStatus("live", "online");
        markRead();
      }
      break;
    case "Sent":
      sent(f);
      break;
    case "Receipt":
      receipt(f);
      break;
    case "Typing":
      typing(f);
      break;
    case "Error":
      error(f);
      break;
    case "Presence":
      // The answer to PresenceSubscribe, then pushed changes (request 0).
      state.pending.delete(f.request);
      for (const p of f.entries) state.presence.set(p.user, p);
      break;
    default: {
      const answer = state.pending.get(f.request);
      if (f.request !== undefined && answer) {
        state.pending.delete(f.request);
        answer(f);
      }
    }
  }
  scheduleRender();
}

function toEntry(f) {
  return {
    seq: Number(f.seq),
    serverId: f.serverId,
    ms: Number(f.timestampMs),
    kind: f.kind,
    sender: f.sender,
    senderDevice: f.senderDevice,
    clientId: f.clientId,
    body: f.body,
  };
}

/** Adds an entry (catch-up, live or History) and acks it. */
function received(id, f, fromHistory = false) {
  const c = conversation(id);
  const e = toEntry(f);
  const mine = e.sender === state.claims.sub;
  c.entries.set(e.seq, e);
  if (e.seq > c.lastSeq) {
    c.lastSeq = e.seq;
    c.lastMs = e.ms;
    c.lastSender = e.sender;
  }
  if (mine) {
    // Sending moves the sender's own read cursor; and this tab's own send
    // that a reconnect interrupted came back in catch-up: it is stored.
    c.readSeq = Math.max(c.readSeq, e.seq);
    if (e.senderDevice === state.claims.dev) dropQueued(String(e.clientId));
  } else {
    // A message from a typist ends its indicator.
    stopTyping(c, e.sender);
  }
  if (!fromHistory && e.seq > c.received) {
    c.received = e.seq;
    scheduleReceipts();
  }
}

function sent(f) {
  const m = state.outbox.find((q) => q.clientId === String(f.clientId));
  const c = conversation(f.conversation);
  const seq = Number(f.seq);
  if (!c.entries.has(seq)) {
    c.entries.set(seq, {
      seq, serverId: f.serverId, ms: Number(f.timestampMs), kind: EntryKind.MESSAGE,
      sender: state.claims.sub, senderDevice: state.claims.dev, clientId: f.clientId,
      body: utf8.encode(m?.text ?? ""),
    });
  }
  if (seq > c.lastSeq) {
    c.lastSeq = seq;
    c.lastMs = Number(f.timestampMs);
    c.lastSender = state.claims.sub;
  }
  c.readSeq = Math.max(c.readSeq, seq);
  dropQueued(String(f.clientId));
}

function receipt(f) {
  const c = conversation(f.conversation);
  const seq = Number(f.seq);
  if (f.user === state.claims.sub) {
    // Our own read on another device.
    if (f.kind === ReceiptKind.READ) c.readSeq = Math.max(c.readSeq, seq);
    return;
  }
  c.peerDelivered = Math.max(c.peerDelivered, seq);
  if (f.kind === ReceiptKind.READ) c.peerRead = Math.max(c.peerRead, seq);
}

function typing(f) {
  const c = conversation(f.conversation);
  if (!f.active) return stopTyping(c, f.user);
  clearTimeout(c.typing.get(f.user));
  c.typing.set(f.user, setTimeout(() => {
    stopTyping(c, f.user);
    scheduleRender();
  }, f.ttlMs));
}

function stopTyping(c, user) {
  clearTimeout(c.typing.get(user));
  c.typing.delete(user);
}

function clearTyping(c) {
  for (const user of [...c.typing.keys()]) stopTyping(c, user);
}

function error(f) {
  const m = state.outbox.find((q) => q.clientId === String(f.reference));
  if (m) {
    if ([429, 503, 504].includes(f.code)) {
      // Retry with the same client id; 429 says how long to wait.
      const wait = Number(/retry in (\d+) ms/.exec(f.detail)?.[1] ?? 2000);
      setTimeout(() => sendQueued(m), Math.min(wait, BACKOFF_MAX_MS));
    } else {
      m.failed = `${f.code}: ${f.detail}`;
      saveOutbox();
    }
    return;
  }
  const answer = state.pending.get(Number(f.reference));
  if (f.reference !== 0n && answer) {
    state.pending.delete(Number(f.reference));
    answer(f);
    return;
  }
  if (f.code === 503 && f.reference === 0n && !state.live) {
    // The store could not be read for catch-up: ask again.
    setTimeout(() => sync(true), 1000);
  }
  console.warn(`gateway error ${f.code}: ${f.detail}`);
}

// ----- answers to requests ----------------------------------------------------------------

function chats(f) {
  if (f.name !== "Chats") return;
  for (const row of f.chats) {
    const c = conversation(row.conversation);
    c.lastSeq = Math.max(c.lastSeq, Number(row.lastSeq));
    c.lastMs = Math.max(c.lastMs, Number(row.lastMs));
    c.lastSender = row.lastSender;
    c.readSeq = Math.max(c.readSeq, Number(row.readSeq));
  }
}

function historyPage(f) {
  if (f.name !== "History") return;
  const c = conversation(f.conversation);
  for (const e of f.entries) received(f.conversation, e, true);
  // `more` is about what lies before this page; a later page may fill in.
  if (!f.entries.length || Number(f.entries[0].seq) <= minSeq(c)) c.older = f.more;
  queryReceipts(c);
  markRead();
}

/** A reload loses the receipts pushed before it; ask how far the peer got
 * for this tab's newest own message, and for the newest one before the
 * peer's own last message (cursors are cumulative, so that is enough for
 * every tick on screen). */
function queryReceipts(c) {
  const entries = [...c.entries.values()].filter((e) => e.kind === EntryKind.MESSAGE);
  const own = entries.filter((e) => e.sender === state.claims.sub);
  const theirs = entries.filter((e) => e.sender !== state.claims.sub);
  const lastTheirs = theirs.length ? theirs[theirs.length - 1].seq : 0;
  const picks = new Set();
  if (own.length) picks.add(Math.max(...own.map((e) => e.seq)));
  const before = own.filter((e) => e.seq < lastTheirs);
  if (before.length) picks.add(Math.max(...before.map((e) => e.seq)));
  for (const seq of picks) {
    if (seq <= c.peerRead) continue;
    request("ReceiptQuery", { conversation: c.id, seq }, (r) => {
      if (r.name !== "ReceiptSummary") return;
      const at = Number(r.seq);
      if (c.peer) {
        if (r.delivered.includes(c.peer)) c.peerDelivered = Math.max(c.peerDelivered, at);
        if (r.read.includes(c.peer)) c.peerRead = Math.max(c.peerRead, at);
      } else {
        const e = c.entries.get(at);
        if (e) e.summary = `delivered to ${r.delivered.length} of ${r.recipients}, read by ${r.read.length}`;
      }
    });
  }
}

// ----- what this tab sends ------------------------------------------------------------------

/** Delivered for everything received, once per conversation per turn. */
function scheduleReceipts() {
  if (state.receiptsTimer) return;
  state.receiptsTimer = setTimeout(() => {
    state.receiptsTimer = null;
    for (const c of state.conversations.values()) {
      if (c.received > c.deliveredSent && send("Delivered", { conversation: c.id, seq: c.received })) {
        c.deliveredSent = c.received;
      }
    }
    markRead();
  }, 50);
}

/** Read for the open conversation, while the tab is visible. */
function markRead() {
  if (!state.open || document.visibilityState !== "visible" || !state.welcomed) return;
  const c = conversation(state.open);
  const last = maxSeq(c);
  if (last > c.readSeq && send("Read", { conversation: c.id, seq: last })) {
    c.readSeq = last;
    c.deliveredSent = Math.max(c.deliveredSent, last);
    scheduleRender();
  }
}

function newClientId() {
  // Milliseconds in the high bits and 16 random bits: unique per device for
  // far longer than the 7-day dedupe window, and never 0.
  const random = crypto.getRandomValues(new Uint16Array(1))[0];
  return ((BigInt(Date.now()) << 16n) | BigInt(random)).toString();
}

function queue(conversationId, body) {
  const m = { clientId: newClientId(), conversation: conversationId, text: body, at: Date.now() };
  state.outbox.push(m);
  saveOutbox();
  sendQueued(m);
}

function sendQueued(m) {
  if (!state.outbox.includes(m) || m.failed) return;
  send("Send", { conversation: m.conversation, clientId: BigInt(m.clientId), body: m.text });
}

function dropQueued(clientId) {
  const before = state.outbox.length;
  state.outbox = state.outbox.filter((q) => q.clientId !== clientId);
  if (state.outbox.length !== before) saveOutbox();
}

function sendTyping(active) {
  const id = state.open;
  const t = state.typingSent;
  if (active) {
    if (t.conversation === id && Date.now() - t.at < TYPING_RENEW_MS) return;
    if (send("Typing", { conversation: id, active: true })) {
      state.typingSent = { conversation: id, at: Date.now() };
    }
  } else if (t.conversation) {
    send("Typing", { conversation: t.conversation, active: false });
    state.typingSent = { conversation: null, at: 0 };
  }
}

function openConversation(id, { refresh = false } = {}) {
  if (state.open !== id) sendTyping(false);
  state.open = id;
  sessionStorage.setItem(openKey(), id);
  const c = conversation(id);
  if (!c.historyAsked || refresh) {
    c.historyAsked = true;
    request("History", { conversation: id, beforeSeq: 0, limit: PAGE }, historyPage);
  }
  if (c.peer) request("PresenceSubscribe", { users: [c.peer] }, () => {});
  markRead();
  render({ scroll: true });
  $("composer-input").focus();
}

// ----- rendering ------------------------------------------------------------------------------

function el(tag, className, content) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (content !== undefined) node.textContent = content;
  return node;
}

const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
const title = (c) => c.peer ?? `Group ${c.id.slice(2, 8)}`;

function setStatus(stateName, label) {
  const s = $("status");
  s.dataset.state = stateName;
  s.textContent = label;
}

function typingLine(c) {
  const users = [...c.typing.keys()];
  if (!users.length) return "";
  return c.peer ? "typing…" : `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing…`;
}

function preview(c) {
  const last = c.entries.get(c.lastSeq);
  if (!last) return c.lastSender ? `${c.lastSender === state.claims.sub ? "You" : c.lastSender}` : "";
  const who = last.sender === state.claims.sub ? "You: " : (c.peer ? "" : `${last.sender}: `);
  return who + entryText(last);
}

function entryText(e) {
  if (e.kind === EntryKind.MESSAGE) return text.decode(e.body);
  let members = [];
  try {
    members = decodeMembers(e.body);
  } catch {
    // An undecodable membership body still holds its place.
  }
  const verb = e.kind === EntryKind.MEMBERS_ADDED ? "added" : "removed";
  return e.kind === EntryKind.MEMBERS_ADDED || e.kind === EntryKind.MEMBERS_REMOVED
    ? `${e.sender} ${verb} ${members.join(", ")}`
    : "(an entry this client does not know)";
}

function renderChats() {
  const list = $("chats");
  const rows = [...state.conversations.values()]
    .filter((c) => c.lastSeq > 0 || c.id === state.open)
    .sort((a, b) => b.lastMs - a.lastMs || a.id.localeCompare(b.id));
  list.replaceChildren(...rows.map((c) => {
    const li = el("li", c.id === state.open ? "chat-row open" : "chat-row");
    li.dataset.conversation = c.id;
    li.tabIndex = 0;
    const top = el("div", "row-top");
    top.append(el("span", "row-title", title(c)), el("time", "row-time", c.lastMs ? clock(c.lastMs) : ""));
    const bottom = el("div", "row-bottom");
    const typingNow = typingLine(c);
    bottom.append(el("span", typingNow ? "row-preview typing" : "row-preview", typingNow || preview(c)));
    const n = c.id === state.open ? 0 : unread(c);
    if (n > 0) bottom.append(el("span", "badge", String(n)));
    li.append(top, bottom);
    return li;
  }));
}

/** The tick state of an own message: pending, sent, delivered, read or failed. */
function status(c, item) {
  if (item.failed) return "failed";
  if (!item.seq) return "pending";
  if (!c.peer) return "sent";
  if (c.peerRead >= item.seq) return "read";
  if (c.peerDelivered >= item.seq) return "delivered";
  return "sent";
}

const TICK_LABEL = {
  pending: "waiting to send", sent: "sent", delivered: "delivered", read: "read", failed: "not sent",
};

/** One list item per entry and per queued message, kept across renders
 * (keyed by client id for own messages) so a message's element stays the
 * same from pending to read. */
const messageNodes = new Map();

function messageNode(key, c, item) {
  let li = messageNodes.get(key);
  if (!li) {
    li = el("li");
    li.append(el("span", "sender"), el("p", "body"), el("span", "meta"));
    messageNodes.set(key, li);
  }
  const system = item.kind !== undefined && item.kind !== EntryKind.MESSAGE;
  const mine = !system && item.sender === state.claims.sub;
  li.className = system ? "msg system" : mine ? "msg mine" : "msg theirs";
  if (item.seq) li.dataset.seq = String(item.seq);
  if (item.clientId) li.dataset.clientId = String(item.clientId);
  const [sender, body, meta] = li.children;
  sender.textContent = !mine && !system && !c.peer ? item.sender : "";
  body.textContent = item.text ?? entryText(item);
  meta.replaceChildren(el("time", "", clock(item.ms ?? item.at)));
  if (mine) {
    const s = status(c, item);
    li.dataset.status = s;
    const ticks = el("span", `ticks ${s}`);
    ticks.setAttribute("role", "img");
    ticks.setAttribute("aria-label", TICK_LABEL[s]);
    ticks.title = item.failed || item.summary || TICK_LABEL[s];
    meta.append(ticks);
  }
  return li;
}

function renderMessages(c) {
  const items = [...c.entries.values()].sort((a, b) => a.seq - b.seq).map((e) => {
    const own = e.sender === state.claims.sub && e.senderDevice === state.claims.dev && e.clientId;
    return [own ? `c:${e.clientId}` : `s:${e.seq}`, e];
  });
  for (const m of state.outbox) {
    if (m.conversation === c.id) {
      items.push([`c:${m.clientId}`, { ...m, sender: state.claims.sub, clientId: m.clientId }]);
    }
  }
  const list = $("messages");
  const nodes = items.map(([key, item]) => messageNode(key, c, item));
  nodes.forEach((node, i) => {
    if (list.children[i] !== node) list.insertBefore(node, list.children[i] ?? null);
  });
  while (list.children.length > nodes.length) list.lastElementChild.remove();
  $("empty").hidden = nodes.length > 0;
  $("empty").textContent = "No messages yet. Say hello.";
}

/** One render for a burst of frames (a catch-up page is hundreds). */
function scheduleRender() {
  if (state.renderTimer) return;
  state.renderTimer = setTimeout(() => {
    state.renderTimer = null;
    render();
  }, 0);
}

function render({ scroll = false } = {}) {
  if (!state.token) return;
  $("me").textContent = `${state.claims.sub} · device ${state.claims.dev}`;
  renderChats();
  const c = state.open ? conversation(state.open) : null;
  $("composer").hidden = !c;
  $("older").hidden = !c?.older;
  if (!c) {
    $("conv-title").textContent = "No conversation open";
    $("conv-sub").textContent = "";
    $("typing").textContent = "";
    return;
  }
  $("conv-title").textContent = title(c);
  const p = c.peer ? state.presence.get(c.peer) : null;
  const seen = p?.online ? "online" : p?.lastSeenMs ? `last seen ${clock(Number(p.lastSeenMs))}` : "";
  $("conv-sub").textContent = c.peer ? seen : c.id;
  $("typing").textContent = typingLine(c);
  const scroller = $("scroller");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  if (list().dataset.conversation !== c.id) {
    list().replaceChildren();
    messageNodes.clear();
    list().dataset.conversation = c.id;
  }
  renderMessages(c);
  if (scroll || atBottom) scroller.scrollTop = scroller.scrollHeight;
}

const list = () => $("messages");

// ----- the page's controls ------------------------------------------------------------------

function start(token) {
  const claims = readClaims(token);
  if (!claims || !validUser(claims.sub)) {
    // Show the form with the reason, whether the token came from it, from
    // the link or from this tab's storage.
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-error").textContent = "That is not a Courier token.";
    $("chat").hidden = true;
    $("login").hidden = false;
    return;
  }
  // Nothing of a previous sign-in in this tab carries over.
  state.conversations.clear();
  state.presence.clear();
  state.pending.clear();
  state.open = null;
  messageNodes.clear();
  list().replaceChildren();
  delete list().dataset.conversation;
  state.token = token;
  state.claims = claims;
  state.everWelcomed = false;
  state.attempt = 0;
  sessionStorage.setItem(TOKEN_KEY, token);
  loadSaved();
  $("login").hidden = true;
  $("chat").hidden = false;
  render();
  connect();
}

function wire() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    start($("login-token").value.trim());
  });
  $("logout").addEventListener("click", () => signOut());
  $("new-chat").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("new-chat-user");
    const user = input.value.trim();
    const problem = !validUser(user)
      ? "A user id is 1 to 64 of A–Z a–z 0–9 . _ @ + -"
      : user === state.claims.sub ? "That is you." : "";
    $("new-chat-error").textContent = problem;
    if (problem) return;
    input.value = "";
    openConversation(directConversation(state.claims.sub, user));
  });
  $("chats").addEventListener("click", (ev) => {
    const row = ev.target.closest("[data-conversation]");
    if (row) openConversation(row.dataset.conversation);
  });
  $("chats").addEventListener("keydown", (ev) => {
    const row = ev.target.closest("[data-conversation]");
    if (row && ev.key === "Enter") openConversation(row.dataset.conversation);
  });
  $("older").addEventListener("click", () => {
    const c = conversation(state.open);
    request("History", { conversation: c.id, beforeSeq: minSeq(c), limit: PAGE }, historyPage);
  });
  const input = $("composer-input");
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = input.value.trim();
    if (!body || !state.open) return;
    if (utf8.encode(body).length > state.maxBody) {
      $("composer-error").textContent = `Too long: at most ${state.maxBody} bytes.`;
      return;
    }
    $("composer-error").textContent = "";
    input.value = "";
    // The message itself ends the indicator on the other side.
    state.typingSent = { conversation: null, at: 0 };
    queue(state.open, body);
    render({ scroll: true });
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  input.addEventListener("input", () => sendTyping(input.value.trim().length > 0));
  document.addEventListener("visibilitychange", markRead);
  window.addEventListener("online", () => {
    if (state.token && !state.ws) connect();
  });
}

/** A token in the fragment (never sent to the server), taken out of the
 * address bar and the history; null if there is none. */
function tokenFromUrl() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname + location.search);
  return token;
}

function boot() {
  wire();
  const token = tokenFromUrl() ?? sessionStorage.getItem(TOKEN_KEY);
  if (token) start(token);
  else $("login").hidden = false;
  // A link with another token opened in this tab changes only the fragment.
  window.addEventListener("hashchange", () => {
    const next = tokenFromUrl();
    if (!next || next === state.token) return;
    if (state.token) signOut();
    start(next);
  });
}

boot();
