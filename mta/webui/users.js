// #/users: SMTP AUTH users (GET/POST /api/users...): list, add, change password, delete.
// The server applies the rules of `mta users`; its refusals are shown as they come.

import { get } from "./api.js";
import { emptyRow, field, h, hiddenText, table, words } from "./dom.js";
import { attempt, change, confirmDelete, onSubmit } from "./ui.js";

export function render(container) {
  const listing = h("div", {});
  const name = field("Name", { type: "text", autocomplete: "off", spellcheck: "false", required: true });
  const password = field("Password", { type: "password", autocomplete: "new-password", required: true });
  const senders = field("Senders (addresses or @domains, separated by spaces or commas; optional)", { type: "text", spellcheck: "false" });
  const addForm = h("form", { class: "stack card", "aria-labelledby": "h-add" },
    h("h2", { id: "h-add", text: "Add a user" }), name.wrap, password.wrap, senders.wrap,
    h("div", {}, h("button", { type: "submit", text: "Add user" })));
  const who = field("User", { type: "text", autocomplete: "off", spellcheck: "false", required: true });
  const fresh = field("New password", { type: "password", autocomplete: "new-password", required: true });
  const passForm = h("form", { class: "stack card", "aria-labelledby": "h-pass" },
    h("h2", { id: "h-pass", text: "Change a password" }), who.wrap, fresh.wrap,
    h("div", {}, h("button", { type: "submit", text: "Change password" })));
  container.append(h("h1", { text: "Users" }), listing, h("div", { class: "forms" }, addForm, passForm));

  onSubmit(addForm, () => {
    const user = name.input.value.trim();
    const body = { name: user, password: password.input.value };
    const list = words(senders.input.value);
    if (list.length) body.senders = list;
    change("/api/users/add", body, `Added user ${user}.`, { form: addForm, after: load });
  });

  onSubmit(passForm, () => {
    const user = who.input.value.trim();
    change("/api/users/password", { name: user, password: fresh.input.value }, `Changed the password of ${user}.`,
      { form: passForm });
  });

  async function remove(user) {
    if (await confirmDelete(`Delete user ${user}? They can no longer log in over SMTP AUTH.`)) {
      change("/api/users/delete", { name: user }, `Deleted user ${user}.`, { after: load });
    }
  }

  async function load() {
    const data = await attempt(() => get("/api/users"));
    if (!data || !container.isConnected) return;
    const rows = data.users.map((u) => h("tr", {},
      h("td", { text: u.name }),
      h("td", { class: "addr", text: (u.senders || []).join(", ") || (u.name.includes("@") ? u.name : "-") }),
      h("td", { class: "buttons" },
        h("button", { type: "button", onclick: () => { who.input.value = u.name; fresh.input.focus(); } },
          "Change password", hiddenText(` of ${u.name}`)),
        h("button", { type: "button", class: "danger", onclick: () => remove(u.name) }, "Delete", hiddenText(` user ${u.name}`)))));
    listing.replaceChildren(table("SMTP AUTH users", ["Name", "Senders", "Actions"],
      rows.length ? rows : emptyRow(3, "No users yet.")));
  }

  load();
  return null;
}
