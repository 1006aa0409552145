// The token option against a real gateway that checks tokens (WSBUS_TOKENS): it travels as a
// wsbus.token.<token> subprotocol beside the codec, which the gateway chooses.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WsbusClient, WsbusClosed } from "../wsbus.js";
import { startGateway, within } from "./gateway.js";
import { record, trackedWebSocket } from "./record.js";

let gateway;

before(async () => {
  gateway = await startGateway({ env: { WSBUS_TOKENS: "ann:s3cret" } });
});

after(async () => {
  await gateway?.stop();
});

test("a good token: the welcome names the user", { timeout: 60000 }, async () => {
  const { Tracked, made } = trackedWebSocket();
  const client = new WsbusClient(gateway.url, { WebSocket: Tracked, token: "s3cret" });
  try {
    const welcome = await within(client.connect(), 20000, "connect");
    assert.equal(welcome.user, "ann");
    assert.deepEqual(made[0].protocols, ["wsbus.v1.json", "wsbus.token.s3cret"]);
    // The gateway chose the codec, never the token.
    assert.equal(client.protocol, "wsbus.v1.json");
    const reply = await client.request("echo", null);
    assert.equal(reply.content.sender.user, "ann");
  } finally {
    client.close();
  }
});

test("a bad token: connect() rejects with 4401, final", { timeout: 60000 }, async () => {
  const { Tracked, made } = trackedWebSocket();
  const client = new WsbusClient(gateway.url, { WebSocket: Tracked, token: "wrong" });
  const events = record(client);
  await assert.rejects(within(client.connect(), 20000, "connect"), (err) => {
    assert.ok(err instanceof WsbusClosed);
    assert.equal(err.code, 4401);
    assert.equal(err.reason, "authentication failed");
    return true;
  });
  assert.deepEqual(events.of("close"), [{ code: 4401, reason: "authentication failed", final: true }]);
  assert.deepEqual(events.of("reconnecting"), []);
  assert.equal(made.length, 1);
  assert.equal(client.welcome, null);
});
