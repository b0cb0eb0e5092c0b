"""The text of bench/run --queue-scale's report: one table row per queue size, then the
per-process figures and the commands each figure comes from.

Rows are the dicts queuescale.measure returns (the JSON keeps them whole); the first is
the reference on an empty queue, whose ingest and end-to-end rates the ratios divide by.
A view this checkout's mta does not have reads "n/a (not built yet)".
"""

from __future__ import annotations

import argparse
from typing import Final

from procstat import machine_line
from results import OTHER_BUSY_CPU_SHARE, md_row, notes_cell

NOT_BUILT: Final = "n/a (not built yet)"
MIB: Final = 1024 * 1024


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def view_cell(view: dict | None, built: bool) -> str:
    if view is None:
        return NOT_BUILT if not built else "-"
    failed = "" if view["status"] in (0, 200) else f" (status {view['status']})"
    return f"{view['seconds']:.2f}{failed}"


def scheduler_of(sample: dict[str, int] | None) -> int | None:
    """The scheduler's entry of a title -> value sample (its title carries its index)."""
    found = [v for t, v in (sample or {}).items() if t.startswith("scheduler")]
    return found[0] if found else None


def notes(row: dict) -> list[str]:
    out = [f"FAILED: {row['error']}"] if row.get("error") else []
    idle = row.get("idle") or {}
    if idle.get("replaced"):
        out.append(f"replaced during the idle window: {', '.join(idle['replaced'])}")
    busy = [(name, part["other_cpu_share"]) for name, part in (("idle", idle), ("ingest", row.get("ingest") or {}))
            if part.get("other_cpu_share") is not None and part["other_cpu_share"] > OTHER_BUSY_CPU_SHARE]
    out += [f"other processes used {share:.0%} of a core during {name}" for name, share in busy]
    drained = row.get("drain") or {}
    if drained.get("retry", {}).get("status") not in (None, 0):
        out.append(f"`{drained['retry']['command']}` on the running server exited "
                   f"{drained['retry']['status']} after {drained['retry']['seconds']:.1f} s"
                   + ("; drained after an offline retry and a restart" if drained.get("via") == "offline" else ""))
    if drained.get("extra_arrivals"):
        out.append(f"{drained['extra_arrivals']} extra arrival(s) at the sink")
    return out


def table(rows: list[dict], built: dict[str, bool]) -> str:
    reference = rows[0]
    ref_ingest = (reference.get("ingest") or {}).get("ingest_per_second")
    ref_e2e = (reference.get("ingest") or {}).get("e2e_per_second")
    lines = [("| queued | filled in s | 220 after s | scheduler ready after s | first dispatch after s "
              "| scheduler RssAnon MiB: start / idle | all RssAnon MiB (idle) | idle CPU: scheduler / all "
              "| list --limit 100 s | GET ?limit=100 s | shape s | ingest msg/s (x empty) "
              "| drain msg/s (x empty e2e) | filled at the sink, once / twice | notes |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        idle = row.get("idle") or {}
        ingest = row.get("ingest") or {}
        drained = row.get("drain")
        fill = row.get("fill")
        cpu = idle.get("cpu_share") or {}
        views = row.get("views") or {}
        if drained is None:  # the reference: its end-to-end rate is the drain's yardstick
            drain_cell = f"e2e {num(ingest.get('e2e_per_second'), 0)}" if ingest else "-"
            sink_cell = "-"
        else:
            drain_cell = (f"{num(drained['per_second'], 0)} ({ratio(drained['per_second'], ref_e2e)})"
                          if drained["per_second"] is not None else "timed out")
            sink_cell = f"{drained['arrived_distinct']:,}/{row['queued']:,} / {drained['duplicates']}"
        lines.append(md_row(
            f"{row['queued']:,}" + (" (reference)" if row is reference else ""),
            num(fill["seconds"], 1) if fill else "-", num(row.get("greeting_seconds")),
            num(row.get("scheduler_ready_seconds")), num(row.get("first_dispatch_seconds")),
            f"{mib(scheduler_of(row.get('after_start')))} / {mib(scheduler_of(idle.get('rss_anon_bytes')))}",
            mib(sum(idle["rss_anon_bytes"].values())) if idle else "-",
            f"{share(scheduler_of(cpu))} / {share(sum(cpu.values()) if cpu else None)}",
            *(view_cell(views.get(k), built.get(k, False)) for k in ("list", "api", "shape")),
            (f"{num(ingest.get('ingest_per_second'), 0)} ({ratio(ingest.get('ingest_per_second'), ref_ingest)})"
              if ingest else "-"),
            drain_cell, sink_cell, notes_cell(notes(row))))
    return "\n".join(lines)


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def per_process(rows: list[dict]) -> str:
    """Every process's RssAnon (after start, after the idle window) and idle CPU."""
    lines = []
    for row in rows:
        idle = row.get("idle")
        if not idle:
            continue
        start = row.get("after_start") or {}
        parts = [f"{t} {mib(start.get(t))} -> {mib(v)} MiB, {share(idle['cpu_share'].get(t))}"
                 for t, v in idle["rss_anon_bytes"].items()]
        lines.append(f"- {row['queued']:,} queued: " + "; ".join(parts))
    if not lines:
        return ""
    return ("RssAnon of every process after start -> after the idle window, and its CPU over that "
            "window (share of one core):\n\n" + "\n".join(lines))


def commands(rows: list[dict], args: argparse.Namespace, built: dict[str, bool]) -> str:
    """What each figure comes from, with this run's results of the operator's commands."""
    lines = [
        (f"- filled in: `bench/queuefill.py --messages N --domain scale.test --due-now "
         f"{args.due_at_start}` with mta stopped: LmdbBackend.commit, 2000 messages per transaction, "
         f"each {args.size} body bytes to one recipient at scale.test, deferred after 1 attempt; "
         f"arrivals over the last hour; the {args.due_at_start} oldest due now, the rest 2-4 h ahead"),
        ("- 220 after / scheduler ready after: `python3 -m mta serve -c CONFIG` started -> first 220 "
         "(polled every 20 ms) / -> the scheduler's `event=ready` log line (its own timestamp)"),
        "- first dispatch after: start -> the first arrival at the sink (of the messages due now)",
        (f"- idle: {args.idle_seconds:.0f} s with nothing offered or due, after those arrived: "
         "/proc/PID/task/*/schedstat and /proc/PID/status RssAnon of every mta process"),
        (f"- ingest: `bench/loadgen.py --sessions {args.sessions} --messages {args.messages} --size "
         f"{args.size} --per-session {args.per_session} --rcpt user@e2e.test` after a warm-up of "
         f"{args.warmup}; the reference's end-to-end rate is the same run's last arrival at the sink"),
        ("- drain: `mta queue retry --domain scale.test -c CONFIG`, then until every filled message "
         "arrived (distinct X-Bench-Fill values at the sink); msg/s over the messages not yet delivered. "
         "Should that retry fail on the running server: mta stopped, the same command (it then edits "
         "the spool), mta started again, and the clock starts then"),
    ]
    for name, command in (("list", "mta queue list --limit 100"), ("api", "GET /api/queue?limit=100"),
                          ("shape", "mta queue shape")):
         if not built.get(name):
             lines.append(f"- `{command}`: {NOT_BUILT} in this checkout")
    for row in rows:
        ran = [v for v in (row.get("views") or {}).values() if v is not None]
        drained = row.get("drain") or {}
        ran += [drained[k] for k in ("retry", "offline_retry") if drained.get(k)]
        if ran:
            lines.append(f"- {row['queued']:,} queued: " + "; ".join(
                f"`{v['command']}` {v['seconds']:.2f} s, status {v['status']}"
                + (f", {v['stdout_lines']} line(s) out" if "stdout_lines" in v else "")
                + (f", {v['messages']} messages ({v['form']})" if "form" in v else "")
                + (f": {v['stderr_tail'].strip()[-160:]}" if v["status"] not in (0, 200) and v.get("stderr_tail")
                   else "") for v in ran))
    return "How each figure is measured, and the commands run:\n\n" + "\n".join(lines)


def failures(rows: list[dict]) -> str:
    parts = [f"**{row['queued']:,} queued**: {row['error']}\n\n```\n{row['stderr_tail'] or '(stderr empty)'}\n```"
             for row in rows if row.get("stderr_tail") is not None]
    return "\n\n".join(parts)


def render_report(rows: list[dict], args: argparse.Namespace, sink_kind: str, built: dict[str, bool]) -> str:
    first = (f"mta bench --queue-scale {','.join(str(n) for n in args.queue_scale_list)}: N deferred "
             f"{args.size}-byte messages for scale.test, filled straight into the spool; ingest "
             f"{args.messages} messages x {args.sessions} sessions; mta: inbound_workers "
             f"{args.mta_worker_list[0]}, {args.delivery_workers} delivery worker(s); sink: {sink_kind}; "
             f"{machine_line()}")
    sections = [first + "\n", table(rows, built), per_process(rows), commands(rows, args, built), failures(rows)]
    return "\n\n".join(s for s in sections if s)
