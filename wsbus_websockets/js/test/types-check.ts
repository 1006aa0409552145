// Uses the client as a browser or Electron page written in TypeScript would, through the
// package's own name (its "exports" map, "types" condition). `npm run typecheck` (tsc
// --noEmit) must pass: each @ts-expect-error line below is a wrong use that must fail.
// Nothing runs at import: a Node that runs TypeScript test files (22.18+) finds no tests here.
import {
  WsbusClient,
  WsbusClosed,
  WsbusError,
  WsbusTimeout,
  type CloseDetail,
  type Frame,
  type RequestOptions,
  type ResyncDetail,
  type Welcome,
  type WsbusClientOptions,
} from "wsbus-client";

interface EchoReply {
  content: { hi: number };
  sender: { type: "client"; conn_id: string; alias: string | null; user: string | null };
}

const options = (): WsbusClientOptions => ({
  token: "s3cret",
  backoff: [100, 5000],
  maxAttempts: 5,
  storage: sessionStorage,
  ackTypes: ["task.run"],
  onGap: (frame) => console.warn(frame.content.reason, frame.content.groups ?? "all"),
  onResync: (detail: ResyncDetail) => console.warn(detail.reason, detail.groups.join(", ")),
  WebSocket, // the browser's own
});

export async function chat(url: string): Promise<string> {
  const client = new WsbusClient(url, options());
  const welcome: Welcome = await client.connect();
  const limit: number = welcome.limits.rate;
  const token: string | undefined = welcome.resume?.token;
  client.addEventListener("close", (event) => {
    const detail: CloseDetail = event.detail;
    if (detail.final) console.log("closed for good", detail.code, detail.reason);
  });
  client.addEventListener("reconnecting", (event) => console.log(event.detail.attempt, event.detail.delay));
  client.addEventListener("error", (event) => console.log(event.detail.content.code, event.detail.content.ref));
  client.addEventListener("resumed", (event) => console.log(event.detail.alias, event.detail.recovered));
  client.addEventListener("custom", (event: Event) => console.log(event.type));
  const stop = client.on<{ text: string }>("chat.message", (frame) => console.log(frame.content.text));
  client.on("task.run", async (frame: Frame) => {
    await new Promise((resolve) => setTimeout(resolve, 10));
    return frame.id;
  });
  stop();
  try {
    const reply = await client.request<EchoReply>("echo", { hi: 1 }, { timeout: 5000 });
    const hi: number = reply.content.content.hi;
    const ack = await client.request("chat.say", { room: "lobby", text: "hi" }, { wait: "ack" });
    const ref: string = ack.content.ref;
    const wait: RequestOptions["wait"] = Math.random() < 0.5 ? "ack" : "reply";
    const either: Frame = await client.request("echo", null, { wait });
    client.send("chat.say", { room: "lobby", text: "fire and forget" }, { id: client.nextId() });
    console.log(limit, token, hi, ref, either.type, client.sentType(ref), client.positions["room.1"]);
  } catch (err) {
    if (err instanceof WsbusError && err.retry) return err.code;
    if (err instanceof WsbusClosed) return `closed ${err.code}`;
    if (err instanceof WsbusTimeout) return `no answer to ${err.type} in ${err.timeout} ms`;
    throw err;
  } finally {
    client.close(1000, "bye");
  }
  return client.connId ?? "not connected";
}

// -- wrong uses: each must be an error ------------------------------------------------------

export function wrong(client: WsbusClient, socket: WebSocket): void {
  // @ts-expect-error: the URL is required
  new WsbusClient();
  // @ts-expect-error: backoff is two numbers in ms, not a string
  new WsbusClient("ws://127.0.0.1:8765/", { backoff: "fast" });
  // @ts-expect-error: a misspelt option
  new WsbusClient("ws://127.0.0.1:8765/", { reconect: false });
  // @ts-expect-error: WebSocket must be a class, not an instance
  new WsbusClient("ws://127.0.0.1:8765/", { WebSocket: socket });
  // @ts-expect-error: wait is "reply" or "ack"
  void client.request("echo", null, { wait: "processed" });
  client.addEventListener("close", (event) => {
    // @ts-expect-error: a close detail has no conn_id
    console.log(event.detail.conn_id);
  });
  // @ts-expect-error: connect() resolves with the welcome, not a string
  const id: Promise<string> = client.connect();
  // @ts-expect-error: connected is read-only
  client.connected = true;
  console.log(id);
}
