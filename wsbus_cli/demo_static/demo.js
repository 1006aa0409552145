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

// The panel gets one line per change of the connection's state, not one per reconnect
// attempt; the status line above shows each attempt.
let connState = "connecting";
function changeState(state, text, cls) {
  if (state === connState) return;
  connState = state;
  show(state, text, cls);
}

client.addEventListener("welcome", (event) => {
  setStatus("open", `connected as ${event.detail.conn_id} (${event.detail.codec})`);
  changeState("open", ` connection ${event.detail.conn_id}`, "welcome");
});
client.addEventListener("close", (event) => {
  const { code, reason, final } = event.detail;
  setStatus("closed", `closed (${code})${final ? "" : ": reconnecting…"}`);
  if (final) changeState("closed", ` code ${code} ${reason || ""}: not reconnecting`, "error state");
  else changeState("reconnecting", ` lost (code ${code} ${reason || ""}): reconnecting…`, "error state");
});
client.addEventListener("reconnecting", (event) => {
  setStatus("closed", `reconnecting (attempt ${event.detail.attempt})…`);
});

// Which action an ack or error answers: the type sent with that id.
function answers(ref) {
  const type = client.sentType(ref);
  return type ? ` ${type}` : "";
}
client.addEventListener("ack", (event) => {
  const ref = event.detail.content.ref;
  show("ack", `${answers(ref)} (ref ${ref})`);
});
client.addEventListener("error", (event) => {
  const c = event.detail.content;
  const about = c.ref ? `${answers(c.ref)} (ref ${c.ref})` : "";
  show("error", ` ${c.code}: ${c.message}${about ? ` —${about}` : ""}`);
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

// chat.say is answered only when refused (not in the room, a bad room name).
client.on("chat.say.reply", (frame) => {
  if (!frame.content.ok) {
    $("say-result").textContent = frame.content.error;
    show("refused", ` chat.say: ${frame.content.error}`, "error");
  }
});

$("say-form").addEventListener("submit", (event) => {
  event.preventDefault();
  $("say-result").textContent = "";
  try {
    client.send("chat.say", { room: $("room").value, text: $("text").value }, { id: client.nextId() });
    $("text").value = "";
  } catch (err) {
    $("say-result").textContent = `not sent: ${err.message}`;
  }
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
