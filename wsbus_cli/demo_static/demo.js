// The demo page: chat rooms with nicknames and who is in them, echo, and a panel of what
// the gateway says. A reload resumes the session (wsbus.js keeps the resume token and the
// last position per room in sessionStorage): nickname and rooms come back, and the
// messages sent meanwhile are replayed. The page keeps the messages it showed in
// sessionStorage too, so a reload shows them again, then the missed ones, once each.
import { WsbusClient, WsbusError } from "./wsbus.js";

const $ = (id) => document.getElementById(id);
// The gateway's endpoint is where the page is: "/" for `wsbus demo`, "/ws/" for the page
// served by a gateway mounted at /ws/ in an ASGI application (docs/asgi.md).
const wsPath = location.pathname.replace(/[^/]*$/, "");
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${wsPath}`;
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

// The messages shown, kept for a reload (the last KEPT of them).
const KEPT = 200;
const SHOWN_KEY = "wsbus.demo.messages";

function loadShown() {
  try {
    const value = JSON.parse(sessionStorage.getItem(SHOWN_KEY) || "[]");
    return Array.isArray(value) ? value : [];
  } catch (err) {
    return [];
  }
}
const shown = loadShown();

function render({ room, from, text }) {
  const item = document.createElement("li");
  const roomSpan = Object.assign(document.createElement("span"), { className: "room", textContent: `#${room}` });
  const fromSpan = Object.assign(document.createElement("span"), { className: "from", textContent: from });
  item.append(roomSpan, fromSpan, document.createTextNode(text));
  $("messages").append(item);
  $("messages").scrollTop = $("messages").scrollHeight;
}
for (const message of shown) render(message);

client.on("chat.message", (frame) => {
  const { room, from, text } = frame.content;
  render({ room, from, text });
  shown.push({ room, from, text });
  if (shown.length > KEPT) shown.splice(0, shown.length - KEPT);
  try {
    sessionStorage.setItem(SHOWN_KEY, JSON.stringify(shown));
  } catch (err) {
    // storage full or refused: a reload shows only what it missed
  }
});

// Who is in each room the page joined: room -> Map(conn_id -> {alias, user}). Filled by a
// chat.members request, kept current by wsbus.presence frames (the rooms send them).
const rooms = new Map();

function renderMembers() {
  const box = $("members");
  box.replaceChildren();
  for (const [room, members] of [...rooms].sort((a, b) => a[0].localeCompare(b[0]))) {
    const title = Object.assign(document.createElement("h3"), { textContent: `#${room}` });
    const list = document.createElement("ul");
    list.dataset.room = room;
    const sorted = [...members].sort((a, b) => (a[1].alias || a[0]).localeCompare(b[1].alias || b[0]));
    for (const [connId, member] of sorted) {
      const item = Object.assign(document.createElement("li"), { className: "member" });
      item.dataset.conn = connId;
      item.textContent = member.alias || connId;
      if (connId === client.connId) {
        const you = Object.assign(document.createElement("span"), { className: "you", textContent: " (you)" });
        item.append(you);
      }
      list.append(item);
    }
    box.append(title, list);
  }
}

async function fetchMembers(room) {
  try {
    const reply = await client.request("chat.members", { room });
    if (!reply.content.ok || !rooms.has(room)) return;
    const members = reply.content.members.map((m) => [m.conn_id, { alias: m.alias, user: m.user }]);
    rooms.set(room, new Map(members));
    renderMembers();
  } catch (err) {
    show("error", ` could not list #${room}: ${err.message}`);
  }
}

function roomOf(group) {
  return typeof group === "string" && group.startsWith("room.") ? group.slice(5) : null;
}

client.on("wsbus.presence", (frame) => {
  const { group, event, conn_id: connId, alias, user } = frame.content;
  const members = rooms.get(roomOf(group));
  if (!members) return;
  if (event === "join") members.set(connId, { alias, user });
  else members.delete(connId);
  renderMembers();
});

// A reload or a reconnect that resumed: nickname and rooms are back; who is in the rooms
// may have changed meanwhile, so ask again.
client.addEventListener("resumed", (event) => {
  const { alias, groups } = event.detail;
  if (alias) {
    $("nick").value = alias;
    $("nick-result").textContent = `you are ${alias}`;
  }
  const back = (groups || []).map(roomOf).filter((room) => room !== null);
  rooms.clear();
  for (const room of back) rooms.set(room, new Map());
  if (back.length) {
    $("room").value = back[back.length - 1];
    $("room-result").textContent = `back in #${back.join(", #")}`;
  }
  renderMembers();
  const where = back.length ? ` in #${back.join(", #")}` : "";
  show("resumed", ` session resumed${alias ? ` as ${alias}` : ""}${where}`);
  for (const room of back) fetchMembers(room);
});

// What a resume could not bring back.
client.addEventListener("resync", (event) => {
  const { groups, restored, message } = event.detail;
  if (!restored) {
    rooms.clear();
    renderMembers();
    $("nick-result").textContent = "";
    $("room-result").textContent = "session not resumed: set your nickname and join again";
    show("resync", ` ${message}`, "error resync");
    return;
  }
  for (const room of groups.map(roomOf).filter((r) => r !== null)) {
    show("resync", ` #${room}: some messages missed meanwhile could not be replayed`, "error resync");
    fetchMembers(room);
  }
});

// Messages may have been lost: presence frames among them.
client.addEventListener("gap", () => {
  for (const room of rooms.keys()) fetchMembers(room);
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
    if (!reply.content.ok) return;
    if (type === "chat.join") {
      if (!rooms.has(reply.content.room)) rooms.set(reply.content.room, new Map());
      fetchMembers(reply.content.room);
    } else {
      rooms.delete(reply.content.room);
      renderMembers();
    }
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
