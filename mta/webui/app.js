// The admin page: log in (token or admin user), then hash routes, one view at a time:
//   #/overview  #/queue  #/message/<id>  #/users  #/mailboxes
// Each view module exports render(container, arg) and may return a cleanup function
// (the overview's 10 s refresh timer). No inline script or style: CSP allows only 'self'.

import { call, setSession, whenLoggedOut } from "./api.js";
import { attempt, clearNotices, onSubmit, showError } from "./ui.js";
import * as overview from "./overview.js";
import * as queue from "./queue.js";
import * as message from "./message.js";
import * as users from "./users.js";
import * as mailboxes from "./mailboxes.js";

const ROUTES = { overview, queue, message, users, mailboxes };
const TITLES = { overview: "Overview", queue: "Queue", message: "Message", users: "Users", mailboxes: "Mailboxes" };
const $ = (id) => document.getElementById(id);

let loggedIn = false;
let cleanup = null;

// focus: move the focus to the Token field (after a logout or an expired session; on the
// first load the focus stays at the top, where the skip link is).
function showLogin(reason, focus = true) {
  loggedIn = false;
  setSession("");
  if (cleanup) { cleanup(); cleanup = null; }
  $("view").replaceChildren();
  $("nav").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  document.title = "Log in - mta administration";
  if (reason) showError(reason);
  if (focus) $("token").focus();
}

function showApp(session) {
  loggedIn = true;
  setSession(session.csrf);
  $("login").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = `Logged in as ${session.user}`;
  $("token").value = "";
  $("password").value = "";
  route();
}

function route() {
  if (!loggedIn) return;
  const hash = location.hash || "#/overview";
  if (!hash.startsWith("#/")) return;  // an in-page anchor, not a route
  const [name, ...rest] = hash.slice(2).split("/");
  const view = ROUTES[name];
  if (!view) { location.hash = "#/overview"; return; }
  if (cleanup) { cleanup(); cleanup = null; }
  clearNotices();
  for (const link of $("nav").querySelectorAll("a")) {
    const current = link.getAttribute("href") === `#/${name === "message" ? "queue" : name}`;
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name]} - mta administration`;
  const container = document.createElement("div");
  $("view").replaceChildren(container);
  cleanup = view.render(container, decoded(rest.join("/"))) || null;
}

// A bad escape in a typed or pasted address ("#/queue/50%off") stays as typed (decodeURIComponent throws).
function decoded(text) {
  try { return decodeURIComponent(text); } catch (_badEscape) { return text; }
}

async function login(body) {
  clearNotices();
  const session = await attempt(() => call("POST", "/ui/login", body));
  if (session) showApp(session);
}

async function logout() {
  await attempt(() => call("POST", "/ui/logout", {}, "none"));
  showLogin("");
}

function skipToMain(event) {
  event.preventDefault();  // keep the route in the hash
  $("main").focus();
}

async function start() {
  whenLoggedOut(() => showLogin("Your session has ended (logged out, idle too long, a new token, or mta serve "
    + "restarted): log in again."));
  $("skip").addEventListener("click", skipToMain);
  $("logout").addEventListener("click", logout);
  onSubmit($("login-token"), () => login({ token: $("token").value }));
  onSubmit($("login-user"), () => login({ user: $("user").value, password: $("password").value }));
  window.addEventListener("hashchange", route);
  try {
    showApp(await call("GET", "/ui/session"));
  } catch (_notLoggedIn) {
    showLogin("", false);
  }
}

start();
