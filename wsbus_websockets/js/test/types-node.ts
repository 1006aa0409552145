// The client in a Node 18 or 20 program in TypeScript: no DOM library, the "ws" package's
// WebSocket passed in, an in-memory storage. `npm run typecheck` checks it with
// test/tsconfig.node.json. Nothing runs at import.
import { WebSocket } from "ws";
import { WsbusClient, type WsbusStorage } from "wsbus-client";

const items = new Map<string, string>();
const storage: WsbusStorage = {
  getItem: (key) => items.get(key) ?? null,
  setItem: (key, value) => void items.set(key, value),
  removeItem: (key) => void items.delete(key),
};

export async function echo(url: string): Promise<unknown> {
  const client = new WsbusClient(url, { WebSocket, storage });
  const welcome = await client.connect();
  client.addEventListener("welcome", (event) => console.log(event.detail.conn_id));
  const reply = await client.request<{ content: unknown }>("echo", { from: welcome.conn_id });
  client.close();
  return reply.content.content;
}

export function wrong(): WsbusClient {
  // @ts-expect-error: the WebSocket option is a class, not a module
  return new WsbusClient("ws://127.0.0.1:8765/", { WebSocket: { WebSocket } });
}
