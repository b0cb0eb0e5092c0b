// Building the page: h() makes elements (text always as text nodes, never parsed as
// HTML), and small formatting helpers shared by the views.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class" || el instanceof SVGElement) el.setAttribute(key, String(value));
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

let ids = 0;
export function uid(prefix) { ids += 1; return `${prefix}-${ids}`; }

// A labelled input: [label, input] with the label's for= pointing at the input.
export function field(label, attrs = {}) {
  const id = uid("f");
  const { tag = "input", ...rest } = attrs;
  const input = h(tag, { ...rest, id });
  return { input, wrap: h("div", { class: "field" }, h("label", { for: id, text: label }), input) };
}

export function selectField(label, options, value = "") {
  const id = uid("f");
  const select = h("select", { id }, options.map(([v, text]) => h("option", { value: v, text, selected: v === value })));
  return { input: select, wrap: h("div", { class: "field" }, h("label", { for: id, text: label }), select) };
}

// A table in a horizontally scrollable, focusable region (phones). A head entry is
// its text (or element), or [text, class] ("num": right-aligned).
export function table(caption, head, rows) {
  const t = h("table", {},
    h("caption", { text: caption }),
    h("thead", {}, h("tr", {}, head.map((c) => (Array.isArray(c) ? h("th", { scope: "col", class: c[1] }, c[0]) : h("th", { scope: "col" }, c))))),
    h("tbody", {}, rows));
  return h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": caption }, t);
}

export function emptyRow(columns, text) {
  return h("tr", {}, h("td", { colspan: String(columns), class: "empty", text }));
}

export function hiddenText(text) { return h("span", { class: "sr-only", text }); }

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return i === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  let s = Math.max(0, Math.round(seconds));
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    if (s >= size) { parts.push(`${Math.floor(s / size)} ${unit}`); s %= size; }
  }
  if (s || !parts.length) parts.push(`${s} s`);
  return parts.slice(0, 2).join(" ");
}

export function when(iso) {
  if (!iso) return "-";
  return String(iso).replace("T", " ").slice(0, 19);
}

// "10M", "1.5G", "2048" -> bytes; "" -> undefined; NaN for anything else.
export function parseSize(text) {
  const t = String(text).trim();
  if (!t) return undefined;
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(t);
  if (!m) return NaN;
  const scale = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2].toLowerCase()];
  return Math.round(Number(m[1]) * scale);
}

export function words(text) {
  return String(text).split(/[\s,]+/).filter(Boolean);
}
