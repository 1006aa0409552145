// The client in Node against a real gateway (a `wsbus serve` process with the echo and chat
// services), with the "ws" package's WebSocket passed in: Node 18 and 20 have none of their own.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { WebSocket } from "ws";

import { WsbusClient, WsbusClosed, WsbusError } from "../wsbus.js";
import { startGateway, within } from "./gateway.js";
import { memoryStorage, record, trackedWebSocket } from "./record.js";

const T = { timeout: 60000 }; // each test's bound; each wait in it has its own, shorter
let gateway;
const clients = [];

before(async () => {
  gateway = await startGateway();
});

after(async () => {
  for (const client of clients) client.close();
  await gateway?.stop();
});

/** A client of the test gateway, closed at the end. */
function client(options = {}) {
  const made = new WsbusClient(gateway.url, { WebSocket, backoff: [20, 200], ...options });
  clients.push(made);
  return made;
}

test("connects, is welcomed, and speaks wsbus.v1.json", T, async () => {
  const { Tracked, made } = trackedWebSocket();
  const c = client({ WebSocket: Tracked });
  const events = record(c);
  assert.equal(c.connected, false);
  assert.equal(c.protocol, null);
  const welcome = await within(c.connect(), 20000, "connect");
  assert.equal(welcome.protocol, "wsbus.v1");
  assert.equal(welcome.codec, "wsbus.v1.json");
  assert.equal(typeof welcome.conn_id, "string");
  assert.equal(welcome.user, null);
  assert.equal(typeof welcome.limits.rate, "number");
  assert.equal(typeof welcome.resume.token, "string");
  assert.deepEqual(made.map((entry) => entry.protocols), [["wsbus.v1.json"]]);
  assert.equal(c.protocol, "wsbus.v1.json");
  assert.equal(c.connId, welcome.conn_id);
  assert.equal(c.connected, true);
  assert.equal(c.resumeToken, welcome.resume.token);
  assert.deepEqual(events.of("welcome"), [welcome]);
  c.close();
  const [closed] = await events.wait("close");
  assert.deepEqual(closed, { code: 1000, reason: "", final: true });
  assert.equal(c.connected, false);
});

test("request and reply with the echo service; acks; refusals are WsbusErrors", T, async () => {
  const c = client();
  const events = record(c);
  const welcome = await within(c.connect(), 20000, "connect");
  const reply = await c.request("echo", { hi: 1 });
  assert.equal(reply.type, "echo.reply");
  assert.equal(reply.from, "echo");
  assert.deepEqual(reply.content.content, { hi: 1 });
  // The gateway stamped the sender: the client never names itself.
  assert.equal(reply.content.sender.conn_id, welcome.conn_id);
  assert.equal(c.sentType(reply.reply_to), "echo");
  const ack = await c.request("echo", { hi: 2 }, { wait: "ack" });
  assert.equal(ack.type, "wsbus.ack");
  assert.equal(c.sentType(ack.content.ref), "echo");
  await assert.rejects(c.request("nobody.home", null), (err) => {
    assert.ok(err instanceof WsbusError);
    assert.equal(err.code, "no_route");
    assert.equal(err.retry, false);
    return true;
  });
  const [error] = await events.wait("error");
  assert.equal(error.content.code, "no_route");
  // Not connected: send throws and request rejects, both with WsbusClosed.
  c.close();
  await events.wait("close");
  assert.throws(() => c.send("echo", 1), WsbusClosed);
  await assert.rejects(c.request("echo", 1), WsbusClosed);
});

test("a W3C traceparent travels with a message; a malformed one is refused", T, async () => {
  const c = client();
  await within(c.connect(), 20000, "connect");
  const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const reply = await c.request("echo", "traced", { traceparent, tracestate: "vendor=1" });
  assert.equal(reply.type, "echo.reply");
  assert.deepEqual(reply.content.content, "traced");
  await assert.rejects(c.request("echo", "bad", { traceparent: "00-nope" }), (err) => {
    assert.ok(err instanceof WsbusError);
    assert.equal(err.code, "invalid_message");
    assert.match(err.message, /traceparent/);
    return true;
  });
});

test("on and off: handlers by type and for every frame", T, async () => {
  const c = client();
  await within(c.connect(), 20000, "connect");
  const byType = [];
  const every = [];
  const onReply = (frame) => byType.push(frame.content.content);
  const onEvery = (frame) => every.push(frame.type);
  const unsubscribe = c.on("echo.reply", onReply);
  c.on("*", onEvery);
  // Handlers run before the request's promise settles.
  await c.request("echo", 1);
  assert.deepEqual(byType, [1]);
  // "*" sees the reply (and the ack, which may come before or after it).
  assert.ok(every.includes("echo.reply"));
  assert.equal(unsubscribe(), true);
  assert.equal(unsubscribe(), false); // gone already
  await c.request("echo", 2);
  assert.deepEqual(byType, [1]);
  assert.equal(c.off("*", onEvery), true);
  const seen = every.length;
  await c.request("echo", 3);
  assert.equal(every.length, seen);
  assert.equal(c.off("*", onEvery), false);
  assert.equal(c.off("never.seen", onEvery), false);
  // A handler that throws is reported and the others still run.
  const after = [];
  const quiet = console.error;
  console.error = () => {};
  try {
    c.on("echo.reply", () => {
      throw new Error("a bug in a handler");
    });
    c.on("echo.reply", (frame) => after.push(frame.content.content));
    await c.request("echo", 4);
  } finally {
    console.error = quiet;
  }
  assert.deepEqual(after, [4]);
});

test("too many bad frames close with 4400: final, no reconnect", T, async () => {
  const { Tracked, made } = trackedWebSocket();
  const c = client({ WebSocket: Tracked });
  const events = record(c);
  const welcome = await within(c.connect(), 20000, "connect");
  // Each refusal spends the error budget; the one over it closes the connection.
  for (let n = 0; n <= welcome.limits.error_budget; n += 1) c.sendRaw("{not json");
  const [closed] = await events.wait("close");
  assert.equal(closed.code, 4400);
  assert.equal(closed.final, true);
  assert.equal(events.of("error").length, welcome.limits.error_budget + 1);
  assert.equal(events.of("error")[0].content.code, "malformed");
  assert.equal(c.connected, false);
  assert.deepEqual(events.of("reconnecting"), []);
  assert.equal(made.length, 1);
});

test("a lost connection reconnects and resumes, with no sessionStorage (Node)", T, async () => {
  // Node 18 to 24 have none (25 has one in memory): made without, as there.
  const saved = Object.getOwnPropertyDescriptor(globalThis, "sessionStorage");
  if (saved) delete globalThis.sessionStorage;
  const { Tracked, made } = trackedWebSocket();
  let c;
  try {
    assert.equal(typeof sessionStorage, "undefined");
    c = client({ WebSocket: Tracked });
  } finally {
    if (saved) Object.defineProperty(globalThis, "sessionStorage", saved);
  }
  const events = record(c);
  await within(c.connect(), 20000, "connect");
  const nick = await c.request("chat.nick", { nick: "ann" });
  assert.equal(nick.content.ok, true);
  const first = c.connId;
  // The network drops: no close frame, as a pulled cable (1006, worth reconnecting).
  made[0].socket.terminate();
  const [resumed] = await events.wait("resumed");
  const [closed] = events.of("close");
  assert.deepEqual(closed, { code: 1006, reason: "", final: false });
  assert.equal(events.of("reconnecting").length >= 1, true);
  assert.equal(resumed.alias, "ann");
  assert.notEqual(resumed.conn_id, first);
  await events.wait("welcome", 2);
  assert.equal(c.connId, resumed.conn_id);
  assert.equal(c.resumes, 1);
  assert.equal(c.resyncs, 0);
  assert.equal(c.resumeToken, resumed.token);
  // It sent the token it kept in memory: the gateway knew the session by it.
  const reply = await c.request("echo", "again");
  assert.equal(reply.content.sender.alias, "ann");
  assert.equal(reply.content.sender.conn_id, resumed.conn_id);
});

test("the storage option keeps the session for the next client, as across a reload", T, async () => {
  const storage = memoryStorage();
  const { Tracked, made } = trackedWebSocket();
  const first = client({ WebSocket: Tracked, storage, reconnect: false });
  const firstEvents = record(first);
  const welcome = await within(first.connect(), 20000, "connect");
  assert.equal((await first.request("chat.nick", { nick: "bob" })).content.ok, true);
  const key = "wsbus.session " + gateway.url;
  assert.equal(JSON.parse(storage.getItem(key)).token, welcome.resume.token);
  // The page goes away without close() (which would forget the session).
  made[0].socket.terminate();
  assert.deepEqual((await firstEvents.wait("close"))[0].final, true);
  const second = client({ storage });
  const events = record(second);
  await within(second.connect(), 20000, "connect (resuming)");
  const [resumed] = await events.wait("resumed");
  assert.equal(resumed.alias, "bob");
  assert.equal(second.resumes, 1);
  assert.equal(JSON.parse(storage.getItem(key)).token, resumed.token);
  // close() forgets it: the next one starts afresh.
  second.close();
  await events.wait("close");
  assert.equal(storage.getItem(key), null);
});

test("a storage that refuses everything costs the resume across reloads, nothing else", T, async () => {
  const refusing = {
    getItem() {
      throw new Error("SecurityError");
    },
    setItem() {
      throw new Error("QuotaExceededError");
    },
    removeItem() {
      throw new Error("SecurityError");
    },
  };
  const c = client({ storage: refusing });
  await within(c.connect(), 20000, "connect");
  assert.deepEqual((await c.request("echo", 5)).content.content, 5);
  assert.equal(typeof c.resumeToken, "string"); // kept in the object still
  c.close();
});

test("no resume storage at all (storage: null, resume: false) works too", T, async () => {
  const { Tracked, made } = trackedWebSocket();
  const c = client({ WebSocket: Tracked, storage: null, resume: false });
  const events = record(c);
  await within(c.connect(), 20000, "connect");
  made[0].socket.terminate();
  await events.wait("welcome", 2);
  // A new session each time, said by nothing: the application asked for no resume.
  assert.equal(c.resumes, 0);
  assert.deepEqual(events.of("resumed"), []);
  assert.deepEqual(events.of("resync"), []);
  assert.equal((await c.request("echo", 6)).content.content, 6);
});

test("a port nobody listens on rejects connect() with WsbusClosed 1006", T, async () => {
  const c = new WsbusClient("ws://127.0.0.1:9/", { WebSocket, reconnect: false });
  const events = record(c);
  await assert.rejects(within(c.connect(), 20000, "connect"), (err) => {
    assert.ok(err instanceof WsbusClosed);
    assert.equal(err.code, 1006);
    return true;
  });
  assert.deepEqual(events.of("close"), [{ code: 1006, reason: "", final: true }]);
});

test("globalThis.WebSocket is used when there is one; without any the error names ws", T, async () => {
  const saved = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  try {
    delete globalThis.WebSocket;
    assert.throws(
      () => new WsbusClient(gateway.url),
      (err) => {
        assert.ok(err instanceof TypeError);
        assert.match(err.message, /no WebSocket/);
        assert.match(err.message, /npm install ws/);
        assert.match(err.message, /new WsbusClient\(url, \{ WebSocket \}\)/);
        return true;
      },
    );
    assert.throws(() => new WsbusClient(gateway.url, { WebSocket: "ws" }), TypeError);
    // As in Node 22, a browser or Electron: the runtime's own.
    globalThis.WebSocket = WebSocket;
    const c = new WsbusClient(gateway.url);
    clients.push(c);
    const welcome = await within(c.connect(), 20000, "connect");
    assert.equal(welcome.codec, "wsbus.v1.json");
    c.close();
  } finally {
    delete globalThis.WebSocket;
    if (saved) Object.defineProperty(globalThis, "WebSocket", saved);
  }
});

test("without CustomEvent (Node 18) events still carry their detail", T, async () => {
  const saved = Object.getOwnPropertyDescriptor(globalThis, "CustomEvent");
  try {
    delete globalThis.CustomEvent;
    assert.equal(typeof CustomEvent, "undefined");
    const c = client();
    const events = record(c);
    const welcome = await within(c.connect(), 20000, "connect");
    assert.deepEqual(events.of("welcome"), [welcome]);
    c.close();
    assert.deepEqual((await events.wait("close"))[0].code, 1000);
  } finally {
    if (saved) Object.defineProperty(globalThis, "CustomEvent", saved);
  }
});
