"""The --sweep report's text: report.md and the main table, from the sweep's JSON document.

report.md: the reference point first, every figure with its ratio to the wire limit
and to Postfix, then one table per axis, every point, and the notes. Also the
formatting (sizes, rates, cells with their spread) and the document queries the plots
share (at, reference_summaries, axis_slice). Pure: reads the document, writes nothing.
"""

from __future__ import annotations

from typing import Final

PLOTS_HINT: Final = ("pip install matplotlib (or pip install -e '.[bench]'), then "
                     "re-render: python3 bench/report.py DIR/results.json")
TARGET_ORDER: Final = ("wire", "mta", "postfix", "opensmtpd", "aiosmtpd")
AXIS_TITLES: Final = {"sessions": "concurrency (sessions)", "size": "message size",
                      "per_session": "messages per session",
                      "workers": "mta inbound workers"}
GENERATOR_NOTES: Final = {
    "loadgen": "bench/loadgen.py (asyncio, pipelines MAIL/RCPT/DATA when offered)",
    "smtp-source": "Postfix's smtp-source (never pipelines; latency n/a: it measures none)",
}


# ---------------------------------------------------------------------------
# Formatting


def size_label(size: int, sep: str = " ") -> str:
    """1 KiB, 10 KiB, 1 MiB, 100 B (`sep=""`: 1KiB, the form of a point's key)."""
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{sep}{unit}"
    return f"{size}{sep}B"


def axis_label(axis: str, value: int | None) -> str:
    if value is None:
        return "-"
    return size_label(value) if axis == "size" else str(value)


def num(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "rate":
        return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"
    if kind == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if kind == "cpu":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    if kind == "mib":
        return f"{value / 1024**2:,.0f}" if value >= 10 * 1024**2 else f"{value / 1024**2:.1f}"
    if kind == "ratio":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def cell(summary: dict, key: str, kind: str) -> str:
    """median, with the spread over the repeats when there are several."""
    m = summary["metrics"].get(key)
    if not m:
        return "n/a"
    text = num(m["median"], kind)
    if m["n"] > 1 and m["median"]:
        text += f" ±{m['spread'] / 2:.0%}"
    return text


def ratio_cell(summary: dict, key: str) -> str:
    """×wire / ×postfix for one metric."""
    parts = []
    for ref in ("wire", "postfix"):
        r = summary.get("ratios", {}).get(ref, {}).get(key)
        parts.append("–" if r is None else num(r, "ratio"))
    return " / ".join(parts)


def escape(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def target_rank(summary: dict) -> tuple:
    kind = summary["kind"]
    return (TARGET_ORDER.index(kind) if kind in TARGET_ORDER else 99, summary["workers"] or 0)


# ---------------------------------------------------------------------------
# Selecting points


def at(doc: dict, **fixed) -> list[dict]:
    """Summaries whose point matches `fixed` (mta rows: workers=None means the reference)."""
    ref_workers = doc["reference"]["workers"]
    out = []
    for s in doc["summaries"]:
        if s.get("skipped"):
            continue
        ok = True
        for axis, value in fixed.items():
            if axis == "workers":
                mine = s["workers"] if s["kind"] == "mta" else None
                if value is None:
                    ok &= mine in (None, ref_workers)
                else:
                    ok &= s["kind"] == "mta" and mine == value
            else:
                ok &= s[axis] == value
        if ok:
            out.append(s)
    return sorted(out, key=target_rank)


def reference_summaries(doc: dict, generator: str) -> list[dict]:
    ref = doc["reference"]
    return at(doc, generator=generator, sessions=ref["sessions"], size=ref["size"],
              per_session=ref["per_session"], workers=None)


def axis_slice(doc: dict, generator: str, axis: str) -> list[dict]:
    """The points where only `axis` differs from the reference (all of its values)."""
    ref = doc["reference"]
    fixed = {a: ref[a] for a in ("sessions", "size", "per_session") if a != axis}
    if axis == "workers":
        rows = [s for s in at(doc, generator=generator, **fixed) if s["kind"] == "mta"]
    else:
        rows = at(doc, generator=generator, workers=None, **fixed)
    return sorted(rows, key=lambda s: (target_rank(s), s[axis] or 0))


# ---------------------------------------------------------------------------
# Markdown


MAIN_HEADER: Final = ("| target | stores before 250 | msgs/run | ingest msg/s | end-to-end msg/s "
                      "| p50 ms | p99 ms | p999 ms | CPU s / 1000 msgs | peak RSS MiB | notes |\n"
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
RATIO_HEADER: Final = ("| target | ingest | end-to-end | p50 | p99 | p999 | CPU / msg "
                       "| peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|")


def durability(doc: dict, kind: str) -> str:
    for t in doc["targets"]:
        if t["kind"] == kind:
            return t["durability"]
    return ""


def main_row(doc: dict, s: dict) -> str:
    msgs = s["messages"]
    count = "-" if not msgs else (str(msgs[0]) if len(msgs) == 1 else f"{msgs[0]}–{msgs[-1]}")
    return (f"| {s['target']} | {durability(doc, s['kind'])} | {count} "
            f"| {cell(s, 'ingest_per_second', 'rate')} | {cell(s, 'e2e_per_second', 'rate')} "
            f"| {cell(s, 'latency_p50_ms', 'ms')} | {cell(s, 'latency_p99_ms', 'ms')} "
            f"| {cell(s, 'latency_p999_ms', 'ms')} | {cell(s, 'cpu_seconds_per_1000', 'cpu')} "
            f"| {cell(s, 'peak_rss_bytes', 'mib')} | {escape('; '.join(s['notes']))} |")


def ratio_row(s: dict) -> str:
    return (f"| {s['target']} | {ratio_cell(s, 'ingest_per_second')} "
            f"| {ratio_cell(s, 'e2e_per_second')} | {ratio_cell(s, 'latency_p50_ms')} "
            f"| {ratio_cell(s, 'latency_p99_ms')} | {ratio_cell(s, 'latency_p999_ms')} "
            f"| {ratio_cell(s, 'cpu_seconds_per_1000')} | {ratio_cell(s, 'peak_rss_bytes')} |")


def reference_title(doc: dict) -> str:
    ref = doc["reference"]
    return (f"{size_label(ref['size'])}, {ref['sessions']} sessions, {ref['per_session']} "
            f"message(s) per session, mta with {ref['workers']} inbound worker(s)")


def main_table_text(doc: dict) -> str:
    """The reference point's table(s), one per generator: what bench/run prints."""
    parts = [f"mta bench --sweep ({doc['mode']}), reference point: {reference_title(doc)}; "
             f"median ±half the spread over {doc['repeat']} repeat(s)"]
    for gen in doc["generators"]:
        rows = reference_summaries(doc, gen)
        if not rows:
            continue
        parts.append(f"\n{gen}:\n\n{MAIN_HEADER}\n" + "\n".join(main_row(doc, s) for s in rows))
    return "\n".join(parts)


def axis_table(doc: dict, generator: str, axis: str) -> str:
    rows = axis_slice(doc, generator, axis)
    if len({s[axis] for s in rows}) < 2:
        return ""
    head = (f"| target | {AXIS_TITLES[axis]} | ingest msg/s | end-to-end msg/s | p99 ms "
            f"| CPU s / 1000 msgs | peak RSS MiB | e2e (ingest) ×wire / ×postfix | notes |\n"
            f"|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for s in rows:
        key = "e2e_per_second" if s["metrics"]["e2e_per_second"] else "ingest_per_second"
        lines.append(f"| {s['target']} | {axis_label(axis, s[axis])} "
                     f"| {cell(s, 'ingest_per_second', 'rate')} "
                     f"| {cell(s, 'e2e_per_second', 'rate')} | {cell(s, 'latency_p99_ms', 'ms')} "
                     f"| {cell(s, 'cpu_seconds_per_1000', 'cpu')} "
                     f"| {cell(s, 'peak_rss_bytes', 'mib')} | {ratio_cell(s, key)} "
                     f"| {escape('; '.join(s['notes']))} |")
    return "\n".join(lines)


def all_points_table(doc: dict) -> str:
    head = ("| target | generator | sessions | size | per session | ingest msg/s "
            "| end-to-end msg/s | p99 ms | CPU s / 1000 msgs | peak RSS MiB "
            "| ingest ×wire / ×postfix | e2e ×wire / ×postfix | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = sorted((s for s in doc["summaries"] if not s.get("skipped")),
                  key=lambda s: (s["generator"], target_rank(s), s["sessions"], s["size"],
                                 s["per_session"]))
    return head + "\n" + "\n".join(
        f"| {s['target']} | {s['generator']} | {s['sessions']} | {size_label(s['size'])} "
        f"| {s['per_session']} | {cell(s, 'ingest_per_second', 'rate')} "
        f"| {cell(s, 'e2e_per_second', 'rate')} | {cell(s, 'latency_p99_ms', 'ms')} "
        f"| {cell(s, 'cpu_seconds_per_1000', 'cpu')} | {cell(s, 'peak_rss_bytes', 'mib')} "
        f"| {ratio_cell(s, 'ingest_per_second')} | {ratio_cell(s, 'e2e_per_second')} "
        f"| {escape('; '.join(s['notes']))} |" for s in rows)


def render_markdown(doc: dict, plots: list[tuple[str, str]], no_plots: str) -> str:
    m = doc["machine"]
    lines = [f"# mta bench --sweep: {m['time']}", ""]
    lines.append(f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}; load average at "
                 f"the end {', '.join(f'{v:.2f}' for v in m['loadavg_at_end'])}. Mode "
                 f"`{doc['mode']}`, {doc['repeat']} repeat(s) per point, each run sized to "
                 f"~{doc['run_seconds']:g} s after a {doc['warmup_seconds']:g} s warm-up; "
                 f"{doc['elapsed_seconds'] / 60:.1f} min in all. Common next hop: "
                 f"{doc['sink']} on 127.0.0.1.")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    for t in doc["targets"]:
        state = f"SKIPPED: {t['skipped']}" if t["skipped"] else (t["detail"] or "")
        lines.append(f"- **{t['name']}**: {t['durability']}"
                     + ("; relays to the sink" if t["relays"] else "")
                     + (f" ({state})" if state else ""))
    lines.append("")
    lines.append("Generators: " + "; ".join(f"{g}: {GENERATOR_NOTES.get(g, g)}"
                                           for g in doc["generators"]) + ".")
    if not doc["settings"]["smtp_source"]:
        lines.append("smtp-source is not installed (it ships with Postfix): its points were "
                     "not run.")
    lines.append("")
    lines.append(f"## The reference point: {reference_title(doc)}")
    lines.append("")
    lines.append("Median over the repeats, ± half the spread (max − min) as a share of "
                 "the median. *wire* is the load tool against Postfix's `smtp-sink`: the "
                 "ceiling no relay on this machine can beat. End-to-end: from the first "
                 "connect to the arrival of the last accepted message at the sink (n/a: "
                 "no next hop). CPU: the target's whole process tree. RSS: summed over it, "
                 "peak of 100 ms samples.")
    for gen in doc["generators"]:
        rows = reference_summaries(doc, gen)
        if not rows:
            continue
        lines += ["", f"### {gen}", "", MAIN_HEADER, *[main_row(doc, s) for s in rows], "",
                  "Every figure as a ratio, ×wire / ×postfix (this target's median over the "
                  "wire limit's, over Postfix's; end-to-end ×wire is over the wire's ingest):",
                  "", RATIO_HEADER, *[ratio_row(s) for s in rows]]
    for axis in ("sessions", "size", "per_session", "workers"):
        tables = [(gen, axis_table(doc, gen, axis)) for gen in doc["generators"]]
        tables = [(g, t) for g, t in tables if t]
        if not tables:
            continue
        lines += ["", f"## By {AXIS_TITLES[axis]}"
                  + ("" if doc["mode"] == "default" else " (other axes at the reference)")]
        for gen, table in tables:
            lines += ["", f"### {gen}", "", table]
    if doc["mode"] == "full":
        lines += ["", "## All points", "", all_points_table(doc)]
    lines += ["", "## Plots", ""]
    if plots:
        for title, name in plots:
            lines += [f"![{title}]({name})", ""]
    else:
        lines += [f"No plots: {no_plots}. To get them: {PLOTS_HINT}.", ""]
    lines += ["## Notes", ""]
    settings = doc["settings"]
    notes = [
        "OpenSMTPD does **not** fsync a message before its 250 (mta, Postfix and the "
        "aiosmtpd baseline do): its ingest is not held to the same durability bar.",
        "OpenSMTPD 6.8 listens with a hard-coded backlog of 5: above a few concurrent "
        "connects the kernel drops SYNs and the client retries after 1 s; rows where "
        "that happened say `listen queue full`.",
        "OpenSMTPD's delivery waits up to 10 s at the start of a burst that outnumbers its "
        "sessions to the sink (its relay is re-checked 10 s later: a constant in its "
        "source): its end-to-end figures for these short runs are mostly that wait "
        "(`tail_seconds` in results.json).",
        f"OpenSMTPD outbound limits: `{settings['opensmtpd_limits']}`"
        + (f" (`{settings['opensmtpd_limits_conf']}`)" if settings["opensmtpd_limits_conf"]
           else " (as shipped)") + ".",
        f"Postfix: in_flow_delay = {settings['postfix_in_flow_delay']}, everything else as "
        f"shipped (see bench/README.md). mta: {settings['mta_delivery_workers']} delivery "
        f"worker(s), 20 sessions to the sink.",
        "aiosmtpd and the wire have no next hop: end-to-end is n/a.",
        "smtp-source measures no latency (n/a); it stops at its first non-2xx reply.",
        "Peak RSS sums the processes' resident sets: pages they share (libraries, a "
        "prefork parent's) count once per process. Each target runs its points light to "
        "heavy (size, then sessions) and keeps what they made it allocate: a row's RSS "
        "includes what lighter points before it left.",
        "`noisy` is a spread above 15% of the median; `machine busy` means processes "
        "other than the target, the sink, the load tool and bench/run used above 15% of "
        "a core: don't quote those rows.",
    ]
    lines += [f"- {n}" for n in notes]
    failures = [r for r in doc["runs"] if not r.get("ok")]
    if failures:
        lines += ["", "## Failed runs", ""]
        for r in failures[:30]:
            lines.append(f"- **{r['target']}** {r['point']} repeat {r['repeat']}: "
                         f"{escape(str(r.get('error')))}")
            if r.get("log_tail"):
                lines += ["", "```", r["log_tail"][-1500:], "```", ""]
        if len(failures) > 30:
            lines.append(f"- ... and {len(failures) - 30} more (results.json)")
    lines.append("")
    return "\n".join(lines)
