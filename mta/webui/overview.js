// #/overview: GET /api/overview every 10 s while shown -- the per-minute chart, the
// queue by state, the top destinations, the oldest message, inbound sessions, health.

import { get } from "./api.js";
import { chart } from "./chart.js";
import { bytes, duration, emptyRow, h, table } from "./dom.js";
import { attempt } from "./ui.js";

const REFRESH_MS = 10000;

function health(value) {
  const ok = value.ready && !value.drained && !value.draining && !(value.crash_looping || []).length;
  const items = [
    h("li", { text: value.ready ? "Ready: accepting and delivering." : "Not ready: see the server log." }),
    h("li", { text: value.drained ? "Drained (mta node drain): new SMTP sessions get 421; the queue is still delivered."
      : "Not drained: taking new SMTP sessions." }),
    value.draining ? h("li", { text: "Shutting down: finishing the sessions and deliveries under way." }) : null,
    h("li", { text: (value.crash_looping || []).length
      ? `Crash looping: ${value.crash_looping.join(", ")}.` : "No worker is crash looping." }),
  ];
  return h("section", { class: `card health ${ok ? "good" : "bad"}`, "aria-labelledby": "h-health" },
    h("h2", { id: "h-health", text: `Health: ${ok ? "good" : "needs attention"}` }), h("ul", {}, items));
}

function queueCard(q, oldest) {
  // The states count recipients (a message to three domains may be in three states).
  const rows = [["Messages", q.messages], ["Stored", bytes(q.bytes)], ["Oldest message", duration(oldest)],
    ["Recipients ready", q.ready], ["deferred", q.deferred], ["held", q.held], ["being delivered", q.active]];
  return h("section", { class: "card", "aria-labelledby": "h-queue" },
    h("h2", { id: "h-queue", text: "Queue" }),
    h("dl", { class: "figures" }, rows.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v ?? "-") })])));
}

function destinations(list) {
  const rows = list.map((d) => h("tr", {},
    h("td", {}, h("a", { href: `#/queue/${encodeURIComponent(d.domain)}`, text: d.domain })),
    h("td", { class: "num", text: String(d.recipients) }),
    h("td", { class: "num", text: `${d.connections} / ${d.limit ?? "-"}` })));
  return h("section", { class: "card wide", "aria-labelledby": "h-dest" },
    h("h2", { id: "h-dest", text: "Top destinations" }),
    table("Queued recipients and open connections per destination", ["Destination", ["Recipients", "num"], ["Connections / limit", "num"]],
      rows.length ? rows : emptyRow(3, "Nothing queued.")));
}

function inbound(list) {
  const rows = list.map((w) => h("tr", {}, h("td", { text: w.worker }), h("td", { class: "num", text: String(w.sessions) })));
  return h("section", { class: "card", "aria-labelledby": "h-inbound" },
    h("h2", { id: "h-inbound", text: "Inbound sessions" }),
    table("Open SMTP sessions per inbound worker", ["Worker", ["Sessions", "num"]], rows.length ? rows : emptyRow(2, "No inbound workers.")));
}

export function render(container) {
  const body = h("div", { class: "overview" });
  const stamp = h("p", { class: "muted", text: "Loading..." });
  container.append(h("h1", { text: "Overview" }), stamp, body);
  let open = false;  // keep the table of figures open across refreshes

  async function refresh() {
    const data = await attempt(() => get("/api/overview"));
    if (!data || !container.isConnected) return;
    const details = body.querySelector("details");
    open = details ? details.open : open;
    body.replaceChildren(
      h("section", { class: "card wide", "aria-labelledby": "h-chart" },
        h("h2", { id: "h-chart", text: "Messages per minute, last hour" }), chart(data.minutes || [], data.now || Date.now() / 1000)),
      queueCard(data.queue || {}, data.oldest_age_seconds),
      health(data.health || {}),
      inbound(data.inbound || []),
      destinations(data.destinations || []));
    body.querySelector("details").open = open;
    stamp.textContent = `Updated ${new Date((data.now || Date.now() / 1000) * 1000).toLocaleTimeString()}; refreshes every 10 s.`;
  }

  refresh();
  const timer = setInterval(refresh, REFRESH_MS);
  return () => clearInterval(timer);
}
