// #/mailboxes: virtual mailboxes (GET/POST /api/mailboxes...): list with usage and
// quota, add, change quota, delete. The server applies the rules of `mta mailbox`.

import { get } from "./api.js";
import { bytes, emptyRow, field, h, hiddenText, parseSize, table, words } from "./dom.js";
import { attempt, change, confirmDelete, onSubmit } from "./ui.js";

function usage(used, quota, format) {
  return quota ? `${format(used || 0)} of ${format(quota)}` : `${format(used || 0)} (no quota)`;
}

// The quota fields of a form as the API wants them, or a message saying what to fix.
function quotas(sizeInput, countInput) {
  const size = parseSize(sizeInput.value);
  const count = countInput.value.trim() ? Number(countInput.value.trim()) : undefined;
  if (Number.isNaN(size)) return "write the size quota as a number of bytes, or with K, M or G (e.g. 500M)";
  if (count !== undefined && !Number.isInteger(count)) return "write the message quota as a whole number";
  const body = {};
  if (size !== undefined) body.quota_bytes = size;
  if (count !== undefined) body.quota_messages = count;
  return body;
}

export function render(container) {
  const listing = h("div", {});
  const address = field("Address", { type: "email", autocomplete: "off", spellcheck: "false", required: true });
  const size = field("Size quota (e.g. 500M; empty: none)", { type: "text", spellcheck: "false" });
  const count = field("Message quota (empty: none)", { type: "number", min: "0", step: "1" });
  const aliases = field("Aliases (separated by spaces or commas; optional)", { type: "text", spellcheck: "false" });
  const addForm = h("form", { class: "stack card", "aria-labelledby": "h-addbox" },
    h("h2", { id: "h-addbox", text: "Add a mailbox" }), address.wrap, size.wrap, count.wrap, aliases.wrap,
    h("div", {}, h("button", { type: "submit", text: "Add mailbox" })));
  const which = field("Mailbox", { type: "email", autocomplete: "off", spellcheck: "false", required: true });
  const newSize = field("New size quota (e.g. 1G; 0: none)", { type: "text", spellcheck: "false" });
  const newCount = field("New message quota (0: none)", { type: "number", min: "0", step: "1" });
  const quotaForm = h("form", { class: "stack card", "aria-labelledby": "h-quota" },
    h("h2", { id: "h-quota", text: "Change a quota" }), which.wrap, newSize.wrap, newCount.wrap,
    h("div", {}, h("button", { type: "submit", text: "Change quota" })));
  container.append(h("h1", { text: "Mailboxes" }), listing, h("div", { class: "forms" }, addForm, quotaForm));

  onSubmit(addForm, () => {
    const body = quotas(size.input, count.input);
    if (typeof body !== "string") {
      body.address = address.input.value.trim();
      const list = words(aliases.input.value);
      if (list.length) body.aliases = list;
    }
    change("/api/mailboxes/add", body, `Added mailbox ${body.address}.`, { form: addForm, after: load });
  });

  onSubmit(quotaForm, () => {
    const body = quotas(newSize.input, newCount.input);
    if (typeof body !== "string") body.address = which.input.value.trim();
    change("/api/mailboxes/quota", body, `Changed the quota of ${body.address}.`, { form: quotaForm, after: load });
  });

  async function remove(box) {
    if (await confirmDelete(`Delete mailbox ${box}? Mail to it is refused from then on.`)) {
      change("/api/mailboxes/delete", { address: box }, `Deleted mailbox ${box}.`, { after: load });
    }
  }

  async function load() {
    const data = await attempt(() => get("/api/mailboxes"));
    if (!data || !container.isConnected) return;
    const rows = data.mailboxes.map((m) => h("tr", {},
      h("td", { class: "addr", text: m.address }),
      h("td", { class: "addr", text: (m.aliases || []).join(", ") || "-" }),
      h("td", { text: usage(m.used_bytes, m.quota_bytes, bytes) }),
      h("td", { text: usage(m.used_messages, m.quota_messages, String) }),
      h("td", { class: "buttons" },
        h("button", { type: "button", onclick: () => { which.input.value = m.address; newSize.input.focus(); } },
          "Change quota", hiddenText(` of ${m.address}`)),
        h("button", { type: "button", class: "danger", onclick: () => remove(m.address) }, "Delete", hiddenText(` mailbox ${m.address}`)))));
    listing.replaceChildren(table("Mailboxes, their usage and quotas", ["Address", "Aliases", "Size", "Messages", "Actions"],
      rows.length ? rows : emptyRow(5, "No mailboxes yet.")));
  }

  load();
  return null;
}
