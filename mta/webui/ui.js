// What every view shares: the error (role="alert") and status (role="status") notices,
// the delete confirmation <dialog>, and running an API call with its error shown.

import { ApiError, post } from "./api.js";

const $ = (id) => document.getElementById(id);

export function showError(message) {
  const box = $("error");
  box.replaceChildren();
  box.classList.toggle("shown", Boolean(message));
  if (!message) return;
  box.append(document.createTextNode(message));
  const dismiss = document.createElement("button");
  dismiss.type = "button";
  dismiss.className = "dismiss";
  dismiss.textContent = "Dismiss";
  dismiss.addEventListener("click", () => showError(""));
  box.append(" ", dismiss);
}

export function showStatus(message) {
  const box = $("status");
  box.textContent = message || "";
  box.classList.toggle("shown", Boolean(message));
}

export function clearNotices() { showError(""); showStatus(""); }

// Runs `action` (async); an ApiError or a network failure is shown in the alert region.
// Resolves to the action's value, or undefined when it failed.
export async function attempt(action) {
  try {
    const value = await action();
    showError("");
    return value;
  } catch (err) {
    if (err instanceof ApiError) { if (!err.handled) showError(err.message); }
    else { showError(`the page failed: ${err.message}`); console.error(err); }
    return undefined;
  }
}

// A change through the API: POST `body` to `path`; once done, say `done`, reset `form`
// and call `after` (each if given). A string `body` is the user's mistake, shown instead.
export async function change(path, body, done, { form = null, after = null } = {}) {
  if (typeof body === "string") { showError(body); return; }
  if ((await attempt(() => post(path, body))) === undefined) return;
  showStatus(done);
  if (form) form.reset();
  if (after) after();
}

export function onSubmit(form, handler) {
  form.addEventListener("submit", (event) => { event.preventDefault(); handler(); });
}

// Asks "text" in the modal dialog; resolves true for Delete, false for Cancel or Escape.
export function confirmDelete(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const ok = $("confirm-ok");
    const cancel = $("confirm-cancel");
    const finish = (answer) => {
      ok.removeEventListener("click", yes);
      cancel.removeEventListener("click", no);
      dialog.removeEventListener("close", no);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const yes = () => finish(true);
    const no = () => finish(false);
    ok.addEventListener("click", yes);
    cancel.addEventListener("click", no);
    dialog.addEventListener("close", no);
    dialog.showModal();
    cancel.focus();
  });
}

export function plural(n, one, many = `${one}s`) { return `${n} ${n === 1 ? one : many}`; }
