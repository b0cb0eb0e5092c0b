// #/message/<id>: one message -- its envelope, recipients with states and last
// replies, its header block and its body. The stored bytes are shown only through
// textContent in a <pre>: whatever they hold (<script>, <img onerror>) is text.

import { ApiError, call, get } from "./api.js";
import { bytes, h, table, when } from "./dom.js";
import { opButtons, runOp } from "./queue.js";
import { attempt } from "./ui.js";

const SHOWN_BYTES = 512 * 1024;

// The stored bytes as text: UTF-8 when they are, else Latin-1 (every byte one character).
function decode(buffer) {
  const data = new Uint8Array(buffer, 0, Math.min(buffer.byteLength, SHOWN_BYTES));
  try {
    return { text: new TextDecoder("utf-8", { fatal: true }).decode(data), charset: "UTF-8" };
  } catch (_notUtf8) {
    return { text: Array.from(data, (b) => String.fromCharCode(b)).join(""), charset: "Latin-1 (not valid UTF-8)" };
  }
}

// The client that sent it: {ip, port, helo, listener, protocol, ...} as one line.
function client(c) {
  if (!c || typeof c !== "object") return c ? String(c) : "-";
  const where = c.ip ? `[${c.ip}]${c.port ? `:${c.port}` : ""}` : "";
  const rest = Object.entries(c).filter(([k]) => k !== "ip" && k !== "port").map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
  return [where, ...rest].filter(Boolean).join(" ") || "-";
}

function split(text) {
  const m = /\r?\n\r?\n/.exec(text);
  return m ? [text.slice(0, m.index), text.slice(m.index + m[0].length)] : [text, ""];
}

export function render(container, id) {
  const head = h("h1", {}, "Message ", h("span", { class: "mono", text: id }));
  const actions = h("div", { class: "toolbar", role: "group", "aria-label": "Act on this message" },
    opButtons(async (op) => {
      const result = await runOp(op, { ids: [id] }, `message ${id}`);
      if (result && op === "delete") location.hash = "#/queue";
      else if (result) load();
    }));
  const body = h("div", {});
  container.append(h("p", {}, h("a", { href: "#/queue", text: "Back to the queue" })), head, actions, body);

  // The message, or null once it left the queue (delivered, bounced, deleted): said in the page.
  async function fetchOr404(fetcher) {
    try {
      return await fetcher();
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 404) throw err;
      actions.hidden = true;
      body.replaceChildren(h("p", { class: "gone", text: `Message ${id} is not in the queue (any more): it was delivered, bounced or deleted.` }));
      return null;
    }
  }

  async function load() {
    const message = await attempt(() => fetchOr404(() => get(`/api/queue/${encodeURIComponent(id)}`)));
    if (!message || !container.isConnected) return;
    const raw = await attempt(() => fetchOr404(() => call("GET", `/api/queue/${encodeURIComponent(id)}/body`, undefined, "bytes")));
    if (raw === null || !container.isConnected) return;
    const envelope = [["Sender", message.sender || "<> (a bounce)"], ["Arrival (UTC)", when(message.arrival)],
      ["Size", bytes(message.size)], ["Attempts", message.attempts], ["Next attempt (UTC)", when(message.next_attempt)],
      ["Client", client(message.client)], ["Envelope id", message.envid || "-"], ["Return", message.ret || "-"],
      ["Body type", message.body || "-"], ["SMTPUTF8", message.smtputf8 ? "yes" : "no"], ["Priority", message.priority]];
    const recipients = message.recipients.map((r) => h("tr", {},
      h("td", { class: "addr", text: r.address }), h("td", { text: r.state }), h("td", { class: "num", text: String(r.attempts) }),
      h("td", { class: "reply", text: r.last_reply || "-" })));
    const parts = [
      h("section", { "aria-labelledby": "h-env" }, h("h2", { id: "h-env", text: "Envelope" }),
        h("dl", { class: "figures" }, envelope.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v ?? "-") })]))),
      h("section", { "aria-labelledby": "h-rcpt" }, h("h2", { id: "h-rcpt", text: "Recipients" }),
        table("Recipients, their states and last replies", ["Recipient", "State", ["Attempts", "num"], "Last reply"], recipients)),
    ];
    if (raw !== undefined) {  // undefined: the body could not be read (the alert says why)
      const { text, charset } = decode(raw);
      const [headers, content] = split(text);
      const cut = raw.byteLength > SHOWN_BYTES ? ` (the first ${bytes(SHOWN_BYTES)} of ${bytes(raw.byteLength)})` : "";
      parts.push(
        h("section", { "aria-labelledby": "h-head" }, h("h2", { id: "h-head", text: "Headers" }),
          h("pre", { class: "raw", tabindex: "0", "aria-label": "Headers", text: headers })),
        h("section", { "aria-labelledby": "h-body" }, h("h2", { id: "h-body", text: "Body" }),
          h("p", { class: "muted", text: `Shown as text, ${charset}${cut}; nothing in it is run or loaded.` }),
          h("pre", { class: "raw", id: "message-body", tabindex: "0", "aria-label": "Body", text: content })));
    }
    body.replaceChildren(...parts);
  }

  load();
  return null;
}
