// The JSON API: one fetch wrapper that sends the session's CSRF token on every
// state-changing request and turns an API error into an ApiError with the API's message.

let csrf = "";
let onLoggedOut = () => {};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
    this.handled = false;  // true: the page already said it (the login form is back)
  }
}

export function setSession(token) { csrf = token || ""; }

export function whenLoggedOut(callback) { onLoggedOut = callback; }

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  const text = await response.text();
  try {
    const value = JSON.parse(text);
    if (value && typeof value.error === "string") message = value.error;
  } catch (_notJson) {
    if (text.trim()) message = `${message}: ${text.trim().slice(0, 300)}`;
  }
  return new ApiError(response.status, message);
}

// method, path (absolute, e.g. "/api/queue"), body (an object, sent as JSON).
// as: "json" (default), "bytes" (an ArrayBuffer) or "none" (204 and the like).
export async function call(method, path, body = undefined, as = "json") {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET" && method !== "HEAD") {
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = csrf;
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `the server did not answer (${err.message}); is mta running?`);
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && !path.startsWith("/ui/")) {
      error.handled = true;
      onLoggedOut();
    }
    throw error;
  }
  if (as === "bytes") return response.arrayBuffer();
  if (as === "none" || response.status === 204) return null;
  return response.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
