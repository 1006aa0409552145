// wsbus.js: the JavaScript client of the wsbus wire protocol v1 (JSON codec), for browsers,
// Electron and Node 18+. One ES module, no build step, no dependencies; types in wsbus.d.ts,
// the npm package "wsbus-client" (README.md beside this file).
//
//   import { WsbusClient } from "wsbus-client";    // or "./wsbus.js" next to a page
//   const client = new WsbusClient("ws://127.0.0.1:8765/", { token: "optional" });
//   await client.connect();                        // resolves with the wsbus.welcome content
//   client.on("chat.message", (frame) => ...);     // frames by type; "*" for every frame
//   const reply = await client.request("echo", { hi: 1 });   // waits for the reply
//   client.send("chat.say", { room: "lobby", text: "hello" });
//
// WebSocket: the WebSocket option (in Node before 22: `import { WebSocket } from "ws"` and
// `new WsbusClient(url, { WebSocket })`), or else globalThis.WebSocket (browsers, Electron,
// Node 22+). Nothing else of a browser is needed: no window, document or location.
//
// Events (client.addEventListener): "welcome" (the connection is ready: after the resume
// answer when resuming), "resumed" (the wsbus.resumed content), "resync" ({groups,
// restored, reason, alias_lost?, message}: state lost at a reconnect; fetch it again),
// "frame", "ack", "error" (wsbus.error frames), "gap" (wsbus.gap frames: messages meant for
// this client may have been lost; resync), "close" ({code, reason, final}), "reconnecting"
// ({attempt, delay}). Each is a CustomEvent (an Event with the same `detail` where the
// runtime has no CustomEvent, as Node 18).
// client.sentType(ack.content.ref) says which message an ack or error answers.
// client.gaps counts the wsbus.gap frames; the onGap option is called with each.
//
// Resume: when the gateway offers it (the welcome's resume.token), the client keeps the
// token and the last position per history group (client.positions) in sessionStorage (in
// memory where there is none, as in Node, or in the storage option), and on a reconnect, or
// when the page is reloaded, sends wsbus.resume as its first frame: the gateway restores the
// alias, the user and the groups and replays what was missed. What it cannot restore comes
// as a "resync" event (and the onResync option), once.
//
// Acknowledgements: a frame with "ack": true is acknowledged with wsbus.processed, on
// arrival, or, for the types in the ackTypes option, once every handler for it returned
// (and the promises they returned settled); with manualAck, when client.processed(frame)
// names it. A redelivered frame the page already had is dropped (client.duplicates).

const CODEC = "wsbus.v1.json";
// Close codes after which reconnecting may help: going away, lost, server error, restart,
// overloaded, bus unreachable, and 4507 (messages were missed: reconnect and resync).
const RECONNECT_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014, 4507]);
// Ids in one wsbus.processed frame, and the pause between two such frames (ms): a burst of
// acknowledgements goes as a few frames, never spending the connection's rate limit.
const ACK_BATCH = 256;
const ACK_INTERVAL = 50;
const MAX_PENDING_ACKS = 4096;
// WebSocket.OPEN: the same in every implementation (the WHATWG standard, ws, undici).
const OPEN = 1;
const POSITION = /^([A-Za-z0-9_-]{1,40}):([1-9][0-9]{0,17})$/;

function parsePosition(text) {
  const match = POSITION.exec(text);
  return match ? [match[1], Number(match[2])] : null;
}

function strings(value) {
  return Array.isArray(value) ? value.filter((item) => typeof item === "string") : [];
}

/** The page's sessionStorage, or null where there is none (Node) or it is refused. */
function sessionStorageOrNull() {
  try {
    // Reading it throws in a browser that blocks storage (a sandboxed frame, some settings).
    return typeof sessionStorage !== "undefined" && sessionStorage ? sessionStorage : null;
  } catch (err) {
    return null;
  }
}

/** The WebSocket class to use: the one given, or the runtime's own; throws without either. */
function webSocketClass(given) {
  const found = given ?? globalThis.WebSocket;
  if (typeof found === "function") return found;
  if (given !== undefined && given !== null) {
    throw new TypeError(`wsbus: the WebSocket option must be a WebSocket class, not ${typeof given}`);
  }
  throw new TypeError(
    "wsbus: this JavaScript runtime has no WebSocket (Node before 22 has none): pass a " +
      'WebSocket class, e.g. from the "ws" package: npm install ws, then ' +
      'import { WebSocket } from "ws"; new WsbusClient(url, { WebSocket })',
  );
}

/** An event carrying `detail`: CustomEvent where the runtime has it (not Node 18). */
function makeEvent(name, detail) {
  if (typeof CustomEvent === "function") return new CustomEvent(name, { detail });
  const event = new Event(name);
  Object.defineProperty(event, "detail", { value: detail, enumerable: true });
  return event;
}

/** A Storage-like object that keeps nothing past the page: used without sessionStorage. */
function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => items.set(key, String(value)),
    removeItem: (key) => items.delete(key),
  };
}

/** The gateway refused a request with a wsbus.error frame. */
export class WsbusError extends Error {
  constructor(code, message, retry) {
    super(`${code}: ${message}`);
    this.name = "WsbusError";
    this.code = code;
    this.retry = Boolean(retry);
  }
}

/** No answer to a request within its timeout (ms). */
export class WsbusTimeout extends Error {
  constructor(type, timeout) {
    super(`no answer to ${type} within ${timeout} ms`);
    this.name = "WsbusTimeout";
    this.type = type;
    this.timeout = timeout;
  }
}

/** The connection closed; `code` is the WebSocket close code. */
export class WsbusClosed extends Error {
  constructor(code, reason) {
    super(`connection closed with code ${code}${reason ? ": " + reason : ""}`);
    this.name = "WsbusClosed";
    this.code = code;
    this.reason = reason;
  }
}

/** A connection to a wsbus gateway that reconnects with backoff and jitter, and resumes. */
export class WsbusClient extends EventTarget {
  /**
   * @param {string} url  the gateway's ws:// or wss:// URL
   * @param {object} [options]
   * @param {string} [options.token]  a bearer token, sent as a wsbus.token.<t> subprotocol
   * @param {boolean} [options.reconnect=true]
   * @param {number[]} [options.backoff=[100, 10000]]  first and largest delay, in ms
   * @param {number} [options.maxAttempts=30]  reconnect attempts in a row before giving up
   *   (a refused handshake looks like a lost connection to a browser: this ends the retries)
   * @param {function} [options.onGap]  called with each wsbus.gap frame (messages meant for
   *   this client may have been lost: fetch the state again rather than trust it)
   * @param {boolean} [options.resume=true]  resume the session on reconnect and on a page
   *   reload when the gateway offers it; false: every reconnect starts over, unannounced
   * @param {Storage} [options.storage]  where the token and positions are kept
   *   (sessionStorage by default: per tab, kept across reloads; in memory without one)
   * @param {string} [options.storageKey]  the key in storage ("wsbus.session " + url)
   * @param {function} [options.onResync]  called with each "resync" detail
   * @param {string[]} [options.ackTypes=[]]  types acknowledged only once their handlers
   *   are done ("*": every type); others are acknowledged on arrival
   * @param {boolean} [options.manualAck=false]  acknowledge ackTypes frames only through
   *   client.processed(frame)
   * @param {number} [options.remember=10000]  ids of acknowledged frames kept, to drop
   *   their redeliveries
   * @param {number} [options.openTimeout=10000]  ms to wait for the answer to wsbus.resume
   * @param {function} [options.WebSocket]  the WebSocket class (Node before 22: the "ws"
   *   package's); globalThis.WebSocket by default
   */
  constructor(
    url,
    {
      token = null,
      reconnect = true,
      backoff = [100, 10000],
      maxAttempts = 30,
      onGap = null,
      resume = true,
      storage = undefined,
      storageKey = undefined,
      onResync = null,
      ackTypes = [],
      manualAck = false,
      remember = 10000,
      openTimeout = 10000,
      WebSocket = undefined,
    } = {},
  ) {
    super();
    // Checked here, not at connect(): a runtime without one fails where the client is made.
    this._WebSocket = webSocketClass(WebSocket);
    this.url = url;
    this.token = token;
    this.reconnect = reconnect;
    this.backoff = backoff;
    this.maxAttempts = maxAttempts;
    this.onGap = onGap;
    this.onResync = onResync;
    this.resume = resume;
    this.ackTypes = new Set(ackTypes);
    this.manualAck = manualAck;
    this.remember = remember;
    this.openTimeout = openTimeout;
    this.gaps = 0; // wsbus.gap frames received
    this.resumes = 0; // connections that resumed the session
    this.resyncs = 0; // "resync" events
    this.duplicates = 0; // frames dropped: the page already had them
    this.welcome = null;
    this.resumed = null; // the last wsbus.resumed content
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, wait, timer}
    this._handlers = new Map(); // type -> Set(handler)
    this._closing = false;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._sentTypes = new Map(); // id -> type of the last frames sent with an id
    if (storage === undefined) {
      storage = sessionStorageOrNull() ?? memoryStorage();
    }
    this._storage = storage;
    this._storageKey = storageKey ?? "wsbus.session " + url;
    // The session to resume: a token, the last position per group, the groups restored.
    const saved = this._load();
    this._token = typeof saved.token === "string" ? saved.token : null;
    const positions = Object.entries(saved.positions || {}).filter(([, p]) => typeof p === "string");
    this._positions = new Map(positions);
    this._groups = strings(saved.groups);
    this._hadSession = false; // a connection of this object was welcomed before
    this._resuming = null; // {id, timer, done} while waiting for the resume answer
    this._redelivering = 0;
    // Acknowledgements: id -> processed, for frames that asked (bounded, oldest out).
    this._seen = new Map();
    this._acks = [];
    this._ackTimer = null;
  }

  /** The last position seen per history group ({"room.1": "e9f3:17"}; a copy). */
  get positions() {
    return Object.fromEntries(this._positions);
  }

  /** The token the next resume presents, or null. */
  get resumeToken() {
    return this._token;
  }

  /** The type of the frame this client sent with id `ref` (one of the last 256), or null. */
  sentType(ref) {
    return this._sentTypes.get(ref) ?? null;
  }

  /** The subprotocol the gateway chose ("wsbus.v1.json"), or null before a connection. */
  get protocol() {
    return this._ws ? this._ws.protocol : null;
  }

  /** The connection id the gateway gave this connection, once welcomed. */
  get connId() {
    return this.welcome ? this.welcome.conn_id : null;
  }

  /** True while the connection is open, welcomed, and not waiting for its resume. */
  get connected() {
    return (
      this._ws !== null &&
      this._ws.readyState === OPEN &&
      this.welcome !== null &&
      this._resuming === null
    );
  }

  /**
   * Open the connection; resolves with the welcome (once resumed, when resuming), rejects
   * with WsbusClosed.
   */
  connect() {
    this._closing = false;
    return new Promise((resolve, reject) => {
      const protocols = [CODEC];
      if (this.token) protocols.push("wsbus.token." + this.token);
      const ws = new this._WebSocket(this.url, protocols);
      this._ws = ws;
      let welcomed = false;
      let ready = false;
      const finish = () => {
        ready = true;
        this._emit("welcome", this.welcome);
        resolve(this.welcome);
        if (this._acks.length) this._scheduleAcks(0);
      };
      ws.onmessage = (event) => {
        // The gateway sends text frames only on a JSON connection.
        if (typeof event.data !== "string") return;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (err) {
          return; // not ours to handle: the gateway only sends JSON objects
        }
        if (frame === null || typeof frame !== "object") return;
        if (!welcomed && frame.type === "wsbus.welcome") {
          welcomed = true;
          this._attempt = 0;
          this.welcome = frame.content;
          this._startResume(ws, finish);
          return;
        }
        if (this._resuming && this._resumeAnswer(frame)) return;
        this._dispatch(frame);
      };
      let ended = false;
      const onEnd = (code, reason) => {
        if (ended) return;
        ended = true;
        const closed = new WsbusClosed(code, reason);
        this._failPending(closed);
        if (this._ws === ws) this.welcome = null;
        if (this._resuming) {
          clearTimeout(this._resuming.timer);
          this._resuming = null;
        }
        const retry = this.reconnect && !this._closing && RECONNECT_CODES.has(code);
        this._emit("close", { code, reason, final: !retry });
        if (!ready) reject(closed);
        if (retry && ready) this._scheduleReconnect();
      };
      ws.onclose = (event) => onEnd(event.code, event.reason);
      // A connection that fails before it opens ends with a close event (1006) in browsers;
      // Node 20's WebSocket fires only the error, and the client would wait forever.
      ws.onerror = () => {
        if (ws.readyState !== OPEN) setTimeout(() => onEnd(1006, ""), 0);
      };
    });
  }

  /** Send wsbus.resume if there is a session to resume, then call done(). */
  _startResume(ws, done) {
    const offered = this.welcome && this.welcome.resume && typeof this.welcome.resume.token === "string"
      ? this.welcome.resume.token
      : null;
    const token = this._token;
    const hadSession = this._hadSession;
    this._hadSession = true;
    if (!this.resume || token === null || offered === null) {
      this._token = offered;
      // Nothing to present, or a gateway that resumes nothing: a new session. Said only
      // when there was one to lose.
      if (this.resume && (token !== null || hadSession)) {
        this._lost("not_offered", "the connection was lost and the gateway offers no resume");
      }
      this._save();
      done();
      return;
    }
    // The old token is kept until the answer: a connection lost before it leaves the
    // session where it was (or taken, and the next try is told so).
    const id = "r" + this._nextId++;
    const timer = setTimeout(() => {
      if (this._resuming && this._resuming.id === id) {
        this._resuming = null;
        this._token = offered;
        this._lost("resume_failed", "no answer to wsbus.resume in time");
        done();
      }
    }, this.openTimeout);
    this._resuming = { id, timer, done, offered };
    ws.send(
      JSON.stringify({
        type: "wsbus.resume",
        id,
        content: { token, positions: Object.fromEntries(this._positions) },
      }),
    );
  }

  /** Take the answer to wsbus.resume; false for any other frame. */
  _resumeAnswer(frame) {
    const { id, timer, done, offered } = this._resuming;
    const content = frame.content && typeof frame.content === "object" ? frame.content : {};
    if (frame.type === "wsbus.resumed" && frame.reply_to === id) {
      clearTimeout(timer);
      this._resuming = null;
      this._token = offered;
      this._resumed(content);
      done();
      return true;
    }
    if (frame.type === "wsbus.error" && content.ref === id) {
      clearTimeout(timer);
      this._resuming = null;
      this._token = offered;
      this._lost("resume_failed", `the gateway refused to resume (${content.code}: ${content.message})`);
      done();
      return true;
    }
    return false;
  }

  _resumed(content) {
    this.resumed = content;
    this.resumes += 1;
    if (typeof content.token === "string") this._token = content.token;
    const groups = strings(content.groups);
    const resync = strings(content.resync);
    this._groups = groups;
    // A group it is no longer in, or one with a hole, has no position to resume from.
    for (const group of [...this._positions.keys()]) {
      if (!groups.includes(group) || resync.includes(group)) this._positions.delete(group);
    }
    this._redelivering = Number.isInteger(content.redelivered) ? content.redelivered : 0;
    this._save();
    this._emit("resumed", content);
    if (resync.length || typeof content.alias_lost === "string") {
      const detail = { groups: resync, restored: true, reason: "resync" };
      if (typeof content.alias_lost === "string") detail.alias_lost = content.alias_lost;
      detail.message =
        "the session was resumed, but the messages of these groups could not all be replayed: " +
        "fetch their state again";
      this._resync(detail);
    }
  }

  /** The session was not restored: a new one, with no alias and no groups. */
  _lost(reason, message) {
    const groups = [...new Set([...this._positions.keys(), ...this._groups])].sort();
    this._positions.clear();
    this._groups = [];
    this._redelivering = 0;
    this._save();
    this._resync({ groups, restored: false, reason, message });
  }

  _resync(detail) {
    this.resyncs += 1;
    if (this.onResync) {
      try {
        this.onResync(detail);
      } catch (err) {
        console.error("wsbus onResync failed", err);
      }
    }
    this._emit("resync", detail);
  }

  _load() {
    try {
      const text = this._storage && this._storage.getItem(this._storageKey);
      const value = text ? JSON.parse(text) : null;
      return value && typeof value === "object" ? value : {};
    } catch (err) {
      return {}; // storage refused (private mode, quota) or garbage: nothing to resume
    }
  }

  _save() {
    if (!this._storage) return;
    try {
      this._storage.setItem(
        this._storageKey,
        JSON.stringify({
          token: this._token,
          positions: Object.fromEntries(this._positions),
          groups: this._groups,
        }),
      );
    } catch (err) {
      // Storage refused: the session resumes on reconnect, not across a reload.
    }
  }

  _scheduleReconnect() {
    if (this._attempt >= this.maxAttempts) {
      this._emit("close", { code: 1006, reason: "gave up reconnecting", final: true });
      return;
    }
    const [low, high] = this.backoff;
    const ceiling = Math.min(high, low * 2 ** this._attempt);
    // Full jitter: a crowd of clients spreads over the whole window.
    const delay = Math.random() * ceiling;
    this._attempt += 1;
    this._emit("reconnecting", { attempt: this._attempt, delay });
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this._closing) return;
      // Tried again only after a code worth retrying: a refusal (4401, 4403...) is final,
      // as its close event said.
      this.connect().catch((err) => {
        if (this.reconnect && !this._closing && RECONNECT_CODES.has(err.code)) {
          this._scheduleReconnect();
        }
      });
    }, delay);
  }

  /** A fresh frame id. */
  nextId() {
    return "b" + this._nextId++;
  }

  /**
   * Send a message; does not wait. Throws WsbusClosed when not connected. traceparent and
   * tracestate (W3C Trace Context) continue a trace on the server (docs/tracing.md); the
   * gateway refuses the frame (invalid_message) when they are not in W3C form.
   */
  send(
    type,
    content = null,
    { id = undefined, replyTo = undefined, traceparent = undefined, tracestate = undefined } = {},
  ) {
    const frame = { type, content };
    if (traceparent !== undefined) frame.traceparent = traceparent;
    if (tracestate !== undefined) frame.tracestate = tracestate;
    if (id !== undefined) {
      frame.id = id;
      this._sentTypes.set(id, type);
      // Bounded: the oldest entry goes first (a Map keeps insertion order).
      if (this._sentTypes.size > 256) this._sentTypes.delete(this._sentTypes.keys().next().value);
    }
    if (replyTo !== undefined) frame.reply_to = replyTo;
    this.sendRaw(JSON.stringify(frame));
  }

  /** Send a frame exactly as given (a string): for tests and demonstrations. */
  sendRaw(text) {
    if (!this._ws || this._ws.readyState !== OPEN) {
      throw new WsbusClosed(1006, "not connected");
    }
    this._ws.send(text);
  }

  /**
   * Send a message with an id and wait for the answer: the reply whose reply_to is the id
   * (wait "reply", the default) or the wsbus.ack (wait "ack"). Rejects with WsbusError on
   * a wsbus.error, with WsbusClosed if the connection closes, or on timeout.
   */
  request(
    type,
    content = null,
    { wait = "reply", timeout = 10000, traceparent = undefined, tracestate = undefined } = {},
  ) {
    const id = this.nextId();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new WsbusTimeout(type, timeout));
      }, timeout);
      this._pending.set(id, { resolve, reject, wait, timer });
      try {
        this.send(type, content, { id, traceparent, tracestate });
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(err);
      }
    });
  }

  /** Call handler(frame) for every frame of a type ("*": every frame); returns an unsubscribe. */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  /** Stop calling handler for a type; true if it was there. */
  off(type, handler) {
    const handlers = this._handlers.get(type);
    if (!handlers || !handlers.delete(handler)) return false;
    if (handlers.size === 0) this._handlers.delete(type);
    return true;
  }

  /**
   * Close for good: the acknowledgements waiting are sent first, and the stored session is
   * forgotten (a reload starts a new one).
   */
  close(code = 1000, reason = "") {
    this._closing = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    while (this._acks.length && this._sendAcks()) {
      // every batch now, before the close frame
    }
    try {
      if (this._storage) this._storage.removeItem(this._storageKey);
    } catch (err) {
      // nothing kept, nothing to forget
    }
    if (this._ws) this._ws.close(code, reason);
  }

  /**
   * Acknowledge `frame`: the page is done with it. Only a frame with "ack": true is; one
   * acknowledged already is ignored. Needed with manualAck.
   */
  processed(frame) {
    if (!frame || frame.ack !== true || typeof frame.id !== "string") return;
    if (this._seen.get(frame.id) === true) return;
    this._remember(frame.id, true);
    this._ack(frame.id);
  }

  _wantsPage(type) {
    return this.ackTypes.has("*") || this.ackTypes.has(type);
  }

  _remember(id, done) {
    this._seen.delete(id);
    this._seen.set(id, done);
    while (this._seen.size > this.remember) this._seen.delete(this._seen.keys().next().value);
  }

  _ack(id) {
    this._acks.push(id);
    if (this._acks.length > MAX_PENDING_ACKS) this._acks.shift();
    if (this._ackTimer === null) this._scheduleAcks(0);
  }

  _scheduleAcks(delay) {
    if (this._ackTimer !== null || this._closing) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      // The rest after ACK_INTERVAL; when not connected, after the next welcome.
      if (this._sendAcks() && this._acks.length) this._scheduleAcks(ACK_INTERVAL);
    }, delay);
  }

  /** Send one batch of acknowledgements; false when not connected. */
  _sendAcks() {
    if (!this.connected) return false;
    const batch = this._acks.slice(0, ACK_BATCH);
    this._ws.send(JSON.stringify({ type: "wsbus.processed", content: { ids: batch } }));
    this._acks.splice(0, batch.length);
    return true;
  }

  /** Keep the frame's position and acknowledge it; false to drop it (a duplicate). */
  _accept(frame) {
    const ackId = frame.ack === true && typeof frame.id === "string" ? frame.id : null;
    let redelivered = false;
    if (ackId !== null) {
      if (this._redelivering > 0) {
        // The first `redelivered` frames asking for an ack after wsbus.resumed are those
        // the last connection left unacknowledged: they may come ahead of the replay, so
        // they must not move the positions the replay starts from.
        this._redelivering -= 1;
        redelivered = true;
      }
      const done = this._seen.get(ackId);
      if (done !== undefined) {
        // Processed (its acknowledgement was lost with the connection: say it again), or
        // still being handled (acknowledged when done).
        this.duplicates += 1;
        if (done) this._ack(ackId);
        return false;
      }
    }
    if (!redelivered && typeof frame.group === "string" && typeof frame.pos === "string") {
      if (!this._advance(frame.group, frame.pos)) {
        this.duplicates += 1;
        if (ackId !== null) {
          this._remember(ackId, true);
          this._ack(ackId);
        }
        return false;
      }
    }
    if (ackId !== null) {
      const later = this._wantsPage(frame.type);
      this._remember(ackId, !later);
      if (!later) this._ack(ackId);
    }
    return true;
  }

  /** Move the group's position to pos; false when it is not past the last one. */
  _advance(group, pos) {
    const last = this._positions.get(group);
    if (last !== undefined) {
      const next = parsePosition(pos);
      const old = parsePosition(last);
      if (next && old && next[0] === old[0] && next[1] <= old[1]) return false;
    }
    this._positions.set(group, pos);
    this._save();
    return true;
  }

  _dispatch(frame) {
    const content = frame.content || {};
    if (frame.type === "wsbus.ack") {
      this._emit("ack", frame);
      const pending = this._pending.get(content.ref);
      if (pending && pending.wait === "ack") this._settle(content.ref, pending, frame, null);
    } else if (frame.type === "wsbus.error") {
      this._emit("error", frame);
      const pending = this._pending.get(content.ref);
      if (pending) {
        this._settle(content.ref, pending, null, new WsbusError(content.code, content.message, content.retry));
      }
    } else if (frame.type === "wsbus.gap") {
      this.gaps += 1;
      this._emit("gap", frame);
      if (this.onGap) {
        try {
          this.onGap(frame);
        } catch (err) {
          console.error("wsbus onGap failed", err);
        }
      }
    } else {
      if (!this._accept(frame)) return;
      if (frame.reply_to) {
        const pending = this._pending.get(frame.reply_to);
        if (pending && pending.wait === "reply") this._settle(frame.reply_to, pending, frame, null);
      }
    }
    this._emit("frame", frame);
    const results = [];
    for (const key of [frame.type, "*"]) {
      const handlers = this._handlers.get(key);
      if (!handlers) continue;
      for (const handler of handlers) {
        try {
          results.push(handler(frame));
        } catch (err) {
          console.error("wsbus handler failed", err);
        }
      }
    }
    if (frame.ack === true && this._seen.get(frame.id) === false && !this.manualAck) {
      // Done once every handler is: a handler that returned a promise, when it settles.
      const waits = results.filter((result) => result && typeof result.then === "function");
      if (waits.length === 0) this.processed(frame);
      else Promise.allSettled(waits).then(() => this.processed(frame));
    }
  }

  _settle(id, pending, value, error) {
    clearTimeout(pending.timer);
    this._pending.delete(id);
    if (error) pending.reject(error);
    else pending.resolve(value);
  }

  _failPending(error) {
    for (const [id, pending] of this._pending) this._settle(id, pending, null, error);
  }

  _emit(name, detail) {
    this.dispatchEvent(makeEvent(name, detail));
  }
}
