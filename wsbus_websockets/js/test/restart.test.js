// Close codes and reconnects across gateway restarts: a real `wsbus serve` process stopped
// (its clients get 1001) and started again on the same port.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import { WebSocket } from "ws";

import { WsbusClient } from "../wsbus.js";
import { startGateway, within } from "./gateway.js";
import { record, trackedWebSocket } from "./record.js";

const gateways = [];
const clients = [];

after(async () => {
  for (const client of clients) client.close();
  for (const gateway of gateways) await gateway.stop();
});

async function gatewayOn(port, options = {}) {
  const gateway = await startGateway({ port, ...options });
  gateways.push(gateway);
  return gateway;
}

test("a restart closes 1001; the client reconnects, and stops at a refusal", { timeout: 120000 }, async () => {
  const first = await gatewayOn(0);
  const { Tracked, made } = trackedWebSocket();
  // A token no one checks yet: the first two gateways take anonymous clients.
  const client = new WsbusClient(first.url, {
    WebSocket: Tracked,
    token: "not-a-real-one",
    backoff: [20, 200],
    maxAttempts: 1000,
  });
  clients.push(client);
  const events = record(client);
  const welcome = await within(client.connect(), 20000, "connect");
  await first.stop();
  const [closed] = await events.wait("close");
  assert.deepEqual(closed, { code: 1001, reason: "server shutting down", final: false });
  // Nothing listens until the next one starts: lost attempts (1006) go on with backoff.
  await events.wait("reconnecting", 2);
  const second = await gatewayOn(first.port);
  const [, again] = await events.wait("welcome", 2);
  assert.notEqual(again.conn_id, welcome.conn_id);
  // The new process cannot resume the old one's session (its key was the old process's):
  // the client says so once, as a resync of nothing restored.
  const [resync] = await events.wait("resync");
  assert.equal(resync.restored, false);
  assert.equal(resync.reason, "resume_failed");
  assert.deepEqual((await client.request("echo", "back")).content.content, "back");
  const attempts = events.of("reconnecting");
  assert.equal(attempts.every((a, i) => a.attempt === i + 1 && a.delay >= 0 && a.delay <= 200), true);
  // The third gateway checks tokens and refuses this one: 4401 is final, no more attempts.
  await second.stop();
  await gatewayOn(first.port, { env: { WSBUS_TOKENS: "ann:s3cret" } });
  const refused = await events.find("close", (detail) => detail.code === 4401);
  assert.deepEqual(refused, { code: 4401, reason: "authentication failed", final: true });
  const sockets = made.length;
  const reconnects = events.of("reconnecting").length;
  // Longer than the largest backoff delay (200 ms) several times over: a retry would show.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.equal(made.length, sockets);
  assert.equal(events.of("reconnecting").length, reconnects);
  assert.equal(client.connected, false);
  assert.deepEqual(made.at(-1).protocols, ["wsbus.v1.json", "wsbus.token.not-a-real-one"]);
});
