// Courier protocol v1 frames, for browsers and Node alike.
//
// The web client (app.mjs) and the Node test suites (tests/node/courier.mjs)
// both import this one module, so the page and its tests cannot disagree
// about the wire format. It uses only what both have: Uint8Array, DataView,
// TextEncoder/TextDecoder and BigInt; no Buffer, no DOM.
//
// docs/protocol.md is the reference. Each frame below is declared once, as
// its type byte and its fields in wire order; one encoder and one decoder
// walk those declarations. Integers are little-endian, `u64` values are
// BigInt, `str` is a u16 length and UTF-8, `bytes` a u32 length and raw
// bytes, and `list:T` a u16 count and its items.
//
// Only the frames a chat client uses are declared; the others (end-to-end
// encryption, devices, push) decode as { name: "Other", type }.

export const SUBPROTOCOL = "courier.v1";

/** Message entry kinds. */
export const EntryKind = Object.freeze({ MESSAGE: 0, MEMBERS_ADDED: 1, MEMBERS_REMOVED: 2 });
/** Receipt kinds. */
export const ReceiptKind = Object.freeze({ DELIVERED: 1, READ: 2 });

// ----- declarations ------------------------------------------------------------

/** Client frames: name -> [type byte, ...[field, kind]]. */
const CLIENT = {
  Send: [0x01, ["conversation", "str"], ["clientId", "u64"], ["body", "bytes"]],
  Delivered: [0x02, ["conversation", "str"], ["seq", "u64"]],
  Read: [0x03, ["conversation", "str"], ["seq", "u64"]],
  Sync: [0x04, ["tail", "u16"], ["summary", "bool"], ["cursors", "list:cursor"]],
  GroupCreate: [0x05, ["request", "u32"], ["members", "list:str"]],
  GroupMembers: [0x08, ["request", "u32"], ["conversation", "str"]],
  Ping: [0x09, ["nonce", "u64"]],
  Refresh: [0x0a, ["request", "u32"], ["token", "str"]],
  History: [0x0b, ["request", "u32"], ["conversation", "str"], ["beforeSeq", "u64"],
    ["limit", "u16"]],
  ChatList: [0x0c, ["request", "u32"], ["beforeMs", "u64"], ["beforeConversation", "str"],
    ["limit", "u16"]],
  ReceiptQuery: [0x0d, ["request", "u32"], ["conversation", "str"], ["seq", "u64"]],
  Typing: [0x0e, ["conversation", "str"], ["active", "bool"]],
  PresenceQuery: [0x0f, ["request", "u32"], ["users", "list:str"]],
  PresenceSubscribe: [0x10, ["request", "u32"], ["users", "list:str"]],
};

const ENTRY = [["seq", "u64"], ["serverId", "u64"], ["timestampMs", "u64"], ["kind", "u8"],
  ["sender", "str"], ["senderDevice", "u32"], ["clientId", "u64"], ["body", "bytes"]];

/** Server frames: type byte -> [name, ...[field, kind]]. */
const SERVER = {
  0x40: ["Welcome", ["user", "str"], ["device", "u32"], ["serverTimeMs", "u64"],
    ["maxBody", "u32"], ["idleTimeoutS", "u32"]],
  0x41: ["Sent", ["clientId", "u64"], ["conversation", "str"], ["seq", "u64"],
    ["serverId", "u64"], ["timestampMs", "u64"]],
  0x42: ["Message", ["conversation", "str"], ...ENTRY],
  0x43: ["Receipt", ["conversation", "str"], ["seq", "u64"], ["user", "str"],
    ["device", "u32"], ["kind", "u8"]],
  0x44: ["SyncDone", ["more", "bool"]],
  0x45: ["GroupCreated", ["request", "u32"], ["conversation", "str"], ["seq", "u64"]],
  0x46: ["Members", ["request", "u32"], ["conversation", "str"], ["members", "list:str"]],
  0x47: ["Done", ["request", "u32"]],
  0x48: ["Pong", ["nonce", "u64"]],
  0x49: ["Error", ["code", "u16"], ["reference", "u64"], ["detail", "str"]],
  0x4a: ["History", ["request", "u32"], ["conversation", "str"], ["more", "bool"],
    ["entries", "list:entry"]],
  0x4b: ["Chats", ["request", "u32"], ["more", "bool"], ["chats", "list:chat"]],
  0x4c: ["ReceiptSummary", ["request", "u32"], ["conversation", "str"], ["seq", "u64"],
    ["recipients", "u32"], ["delivered", "list:str"], ["read", "list:str"]],
  0x4d: ["Typing", ["conversation", "str"], ["user", "str"], ["device", "u32"],
    ["active", "bool"], ["ttlMs", "u32"]],
  0x4e: ["Presence", ["request", "u32"], ["entries", "list:presence"]],
  0x4f: ["Settings", ["request", "u32"], ["flags", "u8"]],
  0x51: ["SyncSummary", ["conversations", "list:summary"]],
};

/** List items: name -> [...[field, kind]]. */
const ITEMS = {
  cursor: [["conversation", "str"], ["seq", "u64"]],
  entry: ENTRY,
  chat: [["conversation", "str"], ["lastSeq", "u64"], ["lastMs", "u64"], ["lastSender", "str"],
    ["readSeq", "u64"], ["unread", "u64"]],
  presence: [["user", "str"], ["online", "bool"], ["lastSeenMs", "u64"]],
  summary: [["conversation", "str"], ["lastSeq", "u64"], ["delivered", "u64"], ["read", "u64"],
    ["unread", "u64"], ["fromSeq", "u64"], ["peerDelivered", "u64"], ["peerRead", "u64"]],
};

// ----- encoding ------------------------------------------------------------------

const UTF8 = new TextEncoder();

class Writer {
  constructor() {
    this.buf = new Uint8Array(64);
    this.len = 0;
  }

  room(n) {
    if (this.len + n <= this.buf.length) return new DataView(this.buf.buffer, this.len, n);
    let cap = this.buf.length * 2;
    while (cap < this.len + n) cap *= 2;
    const grown = new Uint8Array(cap);
    grown.set(this.buf.subarray(0, this.len));
    this.buf = grown;
    return new DataView(this.buf.buffer, this.len, n);
  }

  raw(bytes) {
    this.room(bytes.length);
    this.buf.set(bytes, this.len);
    this.len += bytes.length;
  }

  value(kind, v, field) {
    const fixed = (n, put) => { put(this.room(n)); this.len += n; };
    switch (kind) {
      case "u8": return fixed(1, (d) => d.setUint8(0, v));
      case "bool": return fixed(1, (d) => d.setUint8(0, v ? 1 : 0));
      case "u16": return fixed(2, (d) => d.setUint16(0, v, true));
      case "u32": return fixed(4, (d) => d.setUint32(0, v, true));
      case "u64": return fixed(8, (d) => d.setBigUint64(0, BigInt(v), true));
      case "str": {
        const raw = UTF8.encode(v);
        if (raw.length > 0xffff) throw new RangeError(`field \`${field}\` is over 65,535 bytes`);
        this.value("u16", raw.length);
        return this.raw(raw);
      }
      case "bytes": {
        const raw = typeof v === "string" ? UTF8.encode(v) : v;
        this.value("u32", raw.length);
        return this.raw(raw);
      }
      default: {
        const item = kind.slice("list:".length);
        if (v.length > 0xffff) throw new RangeError(`list \`${field}\` has over 65,535 items`);
        this.value("u16", v.length);
        for (const x of v) {
          if (ITEMS[item]) this.fields(ITEMS[item], x);
          else this.value(item, x, field);
        }
      }
    }
  }

  fields(decl, obj) {
    for (const [field, kind] of decl) {
      if (obj[field] === undefined) throw new TypeError(`field \`${field}\` is missing`);
      this.value(kind, obj[field], field);
    }
  }
}

/** Encodes client frame `name` (a key of the declarations above) from
 * `fields`; a `bytes` field may be a string (sent as UTF-8). */
export function encode(name, fields) {
  const [type, ...decl] = CLIENT[name] ?? [];
  if (type === undefined) throw new TypeError(`unknown client frame ${name}`);
  const w = new Writer();
  w.value("u8", type);
  w.fields(decl, fields);
  return w.buf.slice(0, w.len);
}

// Shorthands for the frames the tests send most.
export const encodeSend = (conversation, clientId, body) =>
  encode("Send", { conversation, clientId, body });
/** Sync with `cursors` as [conversation, seq] pairs. */
export const encodeSync = (cursors = [], tail = 0, summary = false) =>
  encode("Sync", { tail, summary, cursors: cursors.map(([conversation, seq]) => ({ conversation, seq })) });
export const encodePing = (nonce) => encode("Ping", { nonce });

// ----- decoding ------------------------------------------------------------------

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true });

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  take(n, field) {
    if (this.pos + n > this.bytes.length) throw new Error(`frame truncated in field \`${field}\``);
    const at = this.pos;
    this.pos += n;
    return at;
  }

  value(kind, field) {
    switch (kind) {
      case "u8": return this.view.getUint8(this.take(1, field));
      case "bool": {
        const b = this.view.getUint8(this.take(1, field));
        if (b > 1) throw new Error(`field \`${field}\` is not a bool`);
        return b === 1;
      }
      case "u16": return this.view.getUint16(this.take(2, field), true);
      case "u32": return this.view.getUint32(this.take(4, field), true);
      case "u64": return this.view.getBigUint64(this.take(8, field), true);
      case "str": {
        const n = this.value("u16", field);
        const at = this.take(n, field);
        return STRICT_UTF8.decode(this.bytes.subarray(at, at + n));
      }
      case "bytes": {
        const n = this.value("u32", field);
        const at = this.take(n, field);
        return this.bytes.slice(at, at + n);
      }
      default: {
        const item = kind.slice("list:".length);
        const out = [];
        for (let n = this.value("u16", field); n > 0; n -= 1) {
          out.push(ITEMS[item] ? this.fields(ITEMS[item], {}) : this.value(item, field));
        }
        return out;
      }
    }
  }

  fields(decl, into) {
    for (const [field, kind] of decl) into[field] = this.value(kind, field);
    return into;
  }
}

/** Decodes one server frame (an ArrayBuffer or any Uint8Array, Node's
 * Buffer included) into { name, ...fields }. Throws on a malformed frame. */
export function decodeServer(data) {
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : data;
  const r = new Reader(bytes);
  const type = r.value("u8", "type");
  const [name, ...decl] = SERVER[type] ?? [];
  if (name === undefined) return { name: "Other", type };
  const frame = r.fields(decl, { name });
  if (r.pos !== bytes.length) throw new Error("bytes after the last field");
  return frame;
}

/** The user ids a membership entry's body lists (kinds 1 and 2). */
export function decodeMembers(body) {
  return new Reader(body).value("list:str", "members");
}

// ----- identifiers ---------------------------------------------------------------

const USER_ID = /^[A-Za-z0-9._@+-]{1,64}$/;

/** Whether `id` is a valid user id. */
export const validUser = (id) => USER_ID.test(id);

/** The direct conversation of two different users (ids are ASCII, so
 * string order is byte order). */
export const directConversation = (a, b) => {
  const [lo, hi] = [a, b].sort();
  return `d:${lo}:${hi}`;
};

/** The other participant of direct conversation `id`, or null for a group. */
export function peerOf(id, me) {
  const parts = id.split(":");
  if (parts[0] !== "d" || parts.length !== 3) return null;
  return parts[1] === me ? parts[2] : parts[1];
}
