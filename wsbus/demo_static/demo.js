// The demo page: chat rooms with nicknames, echo, and a panel of what the gateway says.
import { WsbusClient, WsbusError } from "./wsbus.js";

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
const client = new WsbusClient(wsUrl);

function show(kind, text, cls = kind) {
  const item = document.createElement("li");
  item.className = cls;
  const label = document.createElement("span");
  label.className = "kind";
  label.textContent = kind;
  item.append(label, document.createTextNode(text));
  $("events").prepend(item);
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

client.addEventListener("welcome", (event) => {
  setStatus("open", `connected as ${event.detail.conn_id} (${event.detail.codec})`);
  show("welcome", ` connection ${event.detail.conn_id}`, "welcome");
});
client.addEventListener("close", (event) => {
  setStatus("closed", `closed (${event.detail.code})${event.detail.final ? "" : ": reconnecting…"}`);
  show("close", ` code ${event.detail.code} ${event.detail.reason || ""}`, "error");
});
client.addEventListener("ack", (event) => show("ack", ` ref ${event.detail.content.ref}`));
client.addEventListener("error", (event) => {
  const c = event.detail.content;
  show("error", ` ${c.code}: ${c.message}${c.ref ? ` (ref ${c.ref})` : ""}`);
});

client.on("chat.message", (frame) => {
  const { room, from, text } = frame.content;
  const item = document.createElement("li");
  const roomSpan = Object.assign(document.createElement("span"), { className: "room", textContent: `#${room}` });
  const fromSpan = Object.assign(document.createElement("span"), { className: "from", textContent: from });
  item.append(roomSpan, fromSpan, document.createTextNode(text));
  $("messages").append(item);
  $("messages").scrollTop = $("messages").scrollHeight;
});

async function ask(type, content, resultId) {
  try {
    const reply = await client.request(type, content);
    return reply;
  } catch (err) {
    $(resultId).textContent = err instanceof WsbusError ? `refused: ${err.code}` : String(err.message);
    return null;
  }
}

$("nick-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const reply = await ask("chat.nick", { nick: $("nick").value }, "nick-result");
  if (reply) $("nick-result").textContent = reply.content.ok ? `you are ${reply.content.nick}` : reply.content.error;
});

async function membership(type) {
  const reply = await ask(type, { room: $("room").value }, "room-result");
  if (reply) {
    $("room-result").textContent = reply.content.ok
      ? `${type === "chat.join" ? "joined" : "left"} #${reply.content.room}`
      : reply.content.error;
  }
}
$("room-form").addEventListener("submit", (event) => {
  event.preventDefault();
  membership("chat.join");
});
$("leave").addEventListener("click", () => membership("chat.leave"));

$("say-form").addEventListener("submit", (event) => {
  event.preventDefault();
  client.send("chat.say", { room: $("room").value, text: $("text").value }, { id: client.nextId() });
  $("text").value = "";
});

$("echo-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const reply = await ask("echo", $("echo").value, "echo-result");
  if (reply) {
    const sender = reply.content.sender;
    $("echo-result").textContent = `echoed ${JSON.stringify(reply.content.content)}`;
    show("sender", ` the service saw ${JSON.stringify(sender)}`);
  }
});

$("bad-frame").addEventListener("click", () => {
  // A client can never choose its sender: the gateway refuses the frame.
  client.sendRaw(JSON.stringify({ type: "chat.say", sender: "service:auth", id: client.nextId() }));
});

client.connect().catch((err) => setStatus("closed", `could not connect: ${err.message}`));
window.wsbusClient = client; // for the console, and for tests
