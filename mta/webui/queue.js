// #/queue (and #/queue/<domain>): the paged table of GET /api/queue with its filters,
// row selection, and Hold / Release / Retry / Delete on the selection or on every
// message of the filtered domain (POST /api/queue/<op>). Deletes ask first.

import { get, post } from "./api.js";
import { bytes, emptyRow, field, h, hiddenText, selectField, table, when } from "./dom.js";
import { attempt, confirmDelete, onSubmit, plural, showStatus } from "./ui.js";

export const OPS = [["hold", "Hold"], ["release", "Release"], ["retry", "Retry"], ["delete", "Delete"]];
const DONE = { hold: "Held", release: "Released", retry: "Scheduled for retry", delete: "Deleted" };
const PAGE = 50;
const STATES = [["", "Any"], ["ready", "Ready"], ["deferred", "Deferred"], ["held", "Held"], ["active", "Active"]];

// Kept while the page is open, so coming back from a message shows the same listing.
const filters = { state: "", domain: "", sender: "", recipient: "" };

// Runs op on {"ids": [...]} or {"domain": d}, asking first for a delete; the count, or undefined.
export async function runOp(op, which, what) {
  if (op === "delete" && !(await confirmDelete(`Delete ${what}? This cannot be undone.`))) return undefined;
  const result = await attempt(() => post(`/api/queue/${op}`, which));
  if (result) showStatus(`${DONE[op]}: ${plural(result.count, "message")}.`);
  return result;
}

export function opButtons(onClick, suffix = "") {
  return OPS.map(([op, name]) => h("button", { type: "button", class: op === "delete" ? "danger" : "", onclick: () => onClick(op) },
    name, suffix ? hiddenText(suffix) : null));
}

function states(message) {
  const counts = {};
  for (const r of message.recipients) counts[r.state] = (counts[r.state] || 0) + 1;
  return Object.entries(counts).map(([s, n]) => (n > 1 ? `${s} x${n}` : s)).join(", ");
}

export function render(container, domainArg) {
  if (domainArg) Object.assign(filters, { state: "", domain: domainArg, sender: "", recipient: "" });
  let cursor = null;  // null: the first page
  let selected = new Set();
  const state = selectField("State", STATES, filters.state);
  const domain = field("Destination domain", { type: "text", value: filters.domain, spellcheck: "false" });
  const sender = field("Sender contains", { type: "text", value: filters.sender, spellcheck: "false" });
  const recipient = field("Recipient contains", { type: "text", value: filters.recipient, spellcheck: "false" });
  const form = h("form", { class: "filters", "aria-label": "Filters" }, state.wrap, domain.wrap, sender.wrap, recipient.wrap,
    h("div", { class: "buttons" }, h("button", { type: "submit", text: "Apply filters" }),
      h("button", { type: "button", text: "Clear filters", onclick: () => { form.reset(); domain.input.value = sender.input.value = recipient.input.value = ""; state.input.value = ""; apply(); } })));
  const selectionBar = h("div", { class: "toolbar", role: "group", "aria-label": "Act on the selected messages" });
  const domainBar = h("div", { class: "toolbar", role: "group", "aria-label": "Act on every message of the domain" });
  const listing = h("div", {});
  const pager = h("div", { class: "pager" });
  container.append(h("h1", { text: "Queue" }), form, selectionBar, domainBar, listing, pager);

  onSubmit(form, apply);

  function apply() {
    Object.assign(filters, { state: state.input.value, domain: domain.input.value.trim(),
      sender: sender.input.value.trim(), recipient: recipient.input.value.trim() });
    cursor = null;
    load();
  }

  async function act(op, which, what) {
    const result = await runOp(op, which, what);
    if (result) { selected = new Set(); load(); }
  }

  function bars() {
    const ids = [...selected];
    selectionBar.replaceChildren(h("span", { class: "muted", text: `${plural(ids.length, "message")} selected:` }),
      ...opButtons((op) => act(op, { ids }, plural(ids.length, "selected message"))));
    for (const b of selectionBar.querySelectorAll("button")) b.disabled = ids.length === 0;
    const d = filters.domain;
    domainBar.hidden = !d;
    domainBar.replaceChildren(...(d ? [h("span", { class: "muted", text: `Every message to ${d}:` }),
      ...OPS.map(([op, name]) => h("button", { type: "button", class: op === "delete" ? "danger" : "",
        text: `${name} all of ${d}`, onclick: () => act(op, { domain: d }, `every message to ${d}`) }))] : []));
  }

  async function load() {
    const query = new URLSearchParams({ limit: String(PAGE) });
    for (const [k, v] of Object.entries(filters)) if (v) query.set(k, v);
    if (cursor) query.set("cursor", cursor);
    const page = await attempt(() => get(`/api/queue?${query}`));
    if (!container.isConnected) return;
    // The selection never reaches past the rows on screen: no hidden message is acted on.
    selected = new Set(page ? page.messages.filter((m) => selected.has(m.id)).map((m) => m.id) : []);
    bars();
    if (!page) { listing.replaceChildren(); pager.replaceChildren(); return; }
    const all = h("input", { type: "checkbox", "aria-label": "Select every message on this page" });
    const boxes = [];
    const rows = page.messages.map((m) => {
      const box = h("input", { type: "checkbox", "aria-label": `Select ${m.id}`, checked: selected.has(m.id),
        onchange: () => { if (box.checked) selected.add(m.id); else selected.delete(m.id); bars(); } });
      boxes.push(box);
      return h("tr", {},
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/message/${m.id}`, class: "mono", text: m.id })),
        h("td", { text: states(m) }),
        h("td", { class: "nowrap", text: when(m.arrival) }),
        h("td", { class: "num", text: bytes(m.size) }),
        h("td", { class: "addr", text: m.sender || "<>" }),
        h("td", { class: "addr" }, m.recipients.map((r) => h("div", { text: r.address }))),
        h("td", { class: "num", text: String(m.attempts) }));
    });
    all.addEventListener("change", () => {
      for (const [i, m] of page.messages.entries()) {
        boxes[i].checked = all.checked;
        if (all.checked) selected.add(m.id); else selected.delete(m.id);
      }
      bars();
    });
    listing.replaceChildren(table(cursor ? "Queued messages (a later page)" : "Queued messages, oldest first",
      [all, "ID", "State", "Arrival (UTC)", ["Size", "num"], "Sender", "Recipients", ["Attempts", "num"]],
      rows.length ? rows : emptyRow(8, "No message matches.")));
    pager.replaceChildren(...[
      cursor ? h("button", { type: "button", text: "First page", onclick: () => { cursor = null; load(); } }) : null,
      page.next_cursor ? h("button", { type: "button", text: "Next page", onclick: () => { cursor = page.next_cursor; load(); } }) : null,
      h("button", { type: "button", text: "Refresh", onclick: load })].filter(Boolean));
  }

  bars();
  load();
  return null;
}
