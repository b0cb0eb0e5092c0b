// The overview's per-minute chart: one SVG line per series, drawn from data with the
// DOM API (no innerHTML), an aria-label summing it up, and the same figures as a table.

import { h, svg } from "./dom.js";

export const SERIES = [
  ["accepted", "Accepted"], ["delivered", "Delivered"], ["deferred", "Deferred"], ["bounced", "Bounced"],
];
const W = 720, H = 220, LEFT = 44, RIGHT = 10, TOP = 10, BOTTOM = 28;

function clock(epoch) {
  const d = new Date(epoch * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

// The top of the scale: 4, 8, 12, 20, 40, 80, 120, 200, ... (a quarter of it is a whole number).
function niceMax(n) {
  for (let step = 1; ; step *= 10) {
    for (const m of [4, 8, 12, 20]) if (m * step >= n) return m * step;
  }
}

// minutes: [{t, accepted, ...}] oldest first (a minute without a row had no sample: its
// figures are in the row before); now: epoch seconds. The x axis is the last hour.
export function chart(minutes, now) {
  const totals = Object.fromEntries(SERIES.map(([key]) => [key, minutes.reduce((s, m) => s + (m[key] || 0), 0)]));
  const label = `Messages per minute over the last hour: ` +
    SERIES.map(([key, name]) => `${name.toLowerCase()} ${totals[key]}`).join(", ") + " in total.";
  const top = niceMax(Math.max(0, ...minutes.flatMap((m) => SERIES.map(([key]) => m[key] || 0))));
  const last = Math.floor(now / 60) * 60;
  const first = last - 59 * 60;
  const x = (t) => LEFT + ((Math.max(t, first) - first) * (W - LEFT - RIGHT)) / (last - first);
  const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / top);
  const grid = [0, 0.25, 0.5, 0.75, 1].map((f) => [
    svg("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(top * f), y2: y(top * f) }),
    svg("text", { class: "axis", x: LEFT - 6, y: y(top * f) + 4, "text-anchor": "end", text: String(top * f) }),
  ]);
  const ticks = [0, 15, 30, 45, 59].map((i) => svg("text", { class: "axis", x: x(first + i * 60), y: H - 8,
    text: clock(first + i * 60), "text-anchor": i === 0 ? "start" : i === 59 ? "end" : "middle" }));
  // The minute under way is drawn once it is over (its count so far would read as a drop);
  // the totals and the table have it.
  const drawn = minutes.length > 1 && minutes[minutes.length - 1].t >= last ? minutes.slice(0, -1) : minutes;
  const lines = SERIES.map(([key]) => svg("polyline", {
    class: `series ${key}`, fill: "none",
    points: drawn.map((m) => `${x(m.t).toFixed(1)},${y(m[key] || 0).toFixed(1)}`).join(" "),
  }));
  // A line needs two points: with few rows, each is a dot as well.
  const dots = drawn.length > 5 ? [] : SERIES.map(([key]) => drawn.map((m) =>
    svg("circle", { class: `dot ${key}`, cx: x(m.t).toFixed(1), cy: y(m[key] || 0).toFixed(1), r: 3 })));
  const picture = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label },
    svg("title", { text: label }), grid, ticks, lines, dots);
  const legend = h("ul", { class: "legend" },
    SERIES.map(([key, name]) => h("li", {}, h("span", { class: `swatch ${key}`, "aria-hidden": "true" }),
      `${name}: ${totals[key]}`)));
  return h("figure", { class: "chart-box" }, picture, legend, figuresTable(minutes));
}

function figuresTable(minutes) {
  const rows = minutes.filter((m) => SERIES.some(([key]) => m[key])).reverse()
    .map((m) => h("tr", {}, h("th", { scope: "row", text: clock(m.t) }), SERIES.map(([key]) => h("td", { class: "num", text: String(m[key] || 0) }))));
  return h("details", {},
    h("summary", { text: "The figures as a table (minutes with traffic, newest first)" }),
    h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Minute" }), SERIES.map(([, name]) => h("th", { scope: "col", text: name })))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: "5", text: "No traffic in this hour." })))));
}
