// wsbus.js: a browser client for the wsbus wire protocol v1 (JSON codec).
// One ES module, no build step:  import { WsbusClient } from "./wsbus.js";
//
//   const client = new WsbusClient("ws://127.0.0.1:8765/", { token: "optional" });
//   await client.connect();                        // resolves with the wsbus.welcome content
//   client.on("chat.message", (frame) => ...);     // frames by type; "*" for every frame
//   const reply = await client.request("echo", { hi: 1 });   // waits for the reply
//   client.send("chat.say", { room: "lobby", text: "hello" });
//
// Events (client.addEventListener): "welcome", "frame", "ack", "error" (wsbus.error
// frames), "gap" (wsbus.gap frames: messages meant for this client may have been lost;
// resync), "close" ({code, reason, final}), "reconnecting" ({attempt, delay}).
// client.sentType(ack.content.ref) says which message an ack or error answers.
// client.gaps counts the wsbus.gap frames; the onGap option is called with each.

const CODEC = "wsbus.v1.json";
// Close codes after which reconnecting may help: going away, lost, server error, restart,
// overloaded, bus unreachable, and 4507 (messages were missed: reconnect and resync).
const RECONNECT_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014, 4507]);

/** The gateway refused a request with a wsbus.error frame. */
export class WsbusError extends Error {
  constructor(code, message, retry) {
    super(`${code}: ${message}`);
    this.name = "WsbusError";
    this.code = code;
    this.retry = Boolean(retry);
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

/** A connection to a wsbus gateway that reconnects with backoff and jitter. */
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
   */
  constructor(
    url,
    { token = null, reconnect = true, backoff = [100, 10000], maxAttempts = 30, onGap = null } = {},
  ) {
    super();
    this.url = url;
    this.token = token;
    this.reconnect = reconnect;
    this.backoff = backoff;
    this.maxAttempts = maxAttempts;
    this.onGap = onGap;
    this.gaps = 0; // wsbus.gap frames received
    this.welcome = null;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, wait, timer}
    this._handlers = new Map(); // type -> Set(handler)
    this._closing = false;
    this._attempt = 0;
    this._sentTypes = new Map(); // id -> type of the last frames sent with an id
  }

  /** The type of the frame this client sent with id `ref` (one of the last 256), or null. */
  sentType(ref) {
    return this._sentTypes.get(ref) ?? null;
  }

  /** The connection id the gateway gave this connection, once welcomed. */
  get connId() {
    return this.welcome ? this.welcome.conn_id : null;
  }

  /** True while the connection is open and welcomed. */
  get connected() {
    return this._ws !== null && this._ws.readyState === WebSocket.OPEN && this.welcome !== null;
  }

  /** Open the connection; resolves with the welcome, rejects with WsbusClosed. */
  connect() {
    this._closing = false;
    return new Promise((resolve, reject) => {
      const protocols = [CODEC];
      if (this.token) protocols.push("wsbus.token." + this.token);
      const ws = new WebSocket(this.url, protocols);
      this._ws = ws;
      let welcomed = false;
      ws.onmessage = (event) => {
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (err) {
          return; // not ours to handle: the gateway only sends JSON objects
        }
        if (!welcomed && frame.type === "wsbus.welcome") {
          welcomed = true;
          this._attempt = 0;
          this.welcome = frame.content;
          this._emit("welcome", frame.content);
          resolve(frame.content);
          return;
        }
        this._dispatch(frame);
      };
      ws.onclose = (event) => {
        const closed = new WsbusClosed(event.code, event.reason);
        this._failPending(closed);
        this.welcome = null;
        const retry = this.reconnect && !this._closing && RECONNECT_CODES.has(event.code);
        this._emit("close", { code: event.code, reason: event.reason, final: !retry });
        if (!welcomed) reject(closed);
        if (retry && welcomed) this._scheduleReconnect();
      };
    });
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
    setTimeout(() => {
      if (this._closing) return;
      this.connect().catch(() => this._scheduleReconnect());
    }, delay);
  }

  /** A fresh frame id. */
  nextId() {
    return "b" + this._nextId++;
  }

  /** Send a message; does not wait. Throws WsbusClosed when not connected. */
  send(type, content = null, { id = undefined, replyTo = undefined } = {}) {
    const frame = { type, content };
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
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) {
      throw new WsbusClosed(1006, "not connected");
    }
    this._ws.send(text);
  }

  /**
   * Send a message with an id and wait for the answer: the reply whose reply_to is the id
   * (wait "reply", the default) or the wsbus.ack (wait "ack"). Rejects with WsbusError on
   * a wsbus.error, with WsbusClosed if the connection closes, or on timeout.
   */
  request(type, content = null, { wait = "reply", timeout = 10000 } = {}) {
    const id = this.nextId();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new Error(`no answer to ${type} within ${timeout} ms`));
      }, timeout);
      this._pending.set(id, { resolve, reject, wait, timer });
      try {
        this.send(type, content, { id });
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
    return () => this._handlers.get(type).delete(handler);
  }

  /** Close for good. */
  close(code = 1000, reason = "") {
    this._closing = true;
    if (this._ws) this._ws.close(code, reason);
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
    } else if (frame.reply_to) {
      const pending = this._pending.get(frame.reply_to);
      if (pending && pending.wait === "reply") this._settle(frame.reply_to, pending, frame, null);
    }
    this._emit("frame", frame);
    for (const key of [frame.type, "*"]) {
      const handlers = this._handlers.get(key);
      if (!handlers) continue;
      for (const handler of handlers) {
        try {
          handler(frame);
        } catch (err) {
          console.error("wsbus handler failed", err);
        }
      }
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
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}
