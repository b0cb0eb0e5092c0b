#!/usr/bin/env python3
"""The --sweep report: Markdown tables and PNG plots from the sweep's JSON document.

Owns how a sweep is shown: results.json (the document bench/sweep.py builds, written
here unchanged), report.md (its text is report_markdown.py's) and the plots
(matplotlib, Agg backend): throughput against concurrency and against size, the
latency CDF at the reference point, mta's scaling by inbound workers, CPU per message
against size. Without matplotlib the report is written without plots and says how to
get them.

Usable as a library (`write(doc, dir)`) and as a CLI that re-renders a saved sweep:
`python3 bench/report.py bench/results/2025-01-01/results.json [--out DIR]`.
Pure presentation: it reads the document and writes files, it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from report_markdown import (AXIS_TITLES, PLOTS_HINT, axis_label, axis_slice, reference_summaries, reference_title,
                             render_markdown)

# ---------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None, "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, ""


def _style(kind: str, workers: int | None) -> dict:
    colors = {"wire": "#7f7f7f", "mta": "#1f77b4", "postfix": "#d62728",
              "opensmtpd": "#2ca02c", "aiosmtpd": "#9467bd"}
    return {"color": colors.get(kind, "#000000"), "marker": "o" if kind != "wire" else "s"}


def _series(rows: list[dict], axis: str, key: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for s in rows:
        m = s["metrics"].get(key)
        if m:
            out.setdefault(s["target"], []).append((s[axis], m["median"], m["min"], m["max"],
                                                    s["kind"], s["workers"]))
    return out


def _plot_axis(plt, doc: dict, axis: str, key_pairs: list[tuple[str, str]], ylabel: str,
               path: Path, title: str, logy: bool = True) -> bool:
    gens = [g for g in doc["generators"]
            if len({s[axis] for s in axis_slice(doc, g, axis)}) > 1]
    if not gens:
        return False
    fig, axes = plt.subplots(1, len(gens), figsize=(6.5 * len(gens), 4.8), squeeze=False)
    for ax, gen in zip(axes[0], gens):
        rows = axis_slice(doc, gen, axis)
        for key, style in key_pairs:
            for name, pts in _series(rows, axis, key).items():
                pts.sort()
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                label = name if len(key_pairs) == 1 else f"{name} {style}"
                ax.errorbar(xs, ys, yerr=err, label=label, capsize=3,
                            linestyle="-" if key_pairs.index((key, style)) == 0 else "--",
                            **_style(pts[0][4], pts[0][5]))
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ticks = sorted({s[axis] for s in rows})
        ax.set_xticks(ticks, [axis_label(axis, v) for v in ticks])
        ax.minorticks_off()
        ax.set_xlabel(AXIS_TITLES[axis])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {gen}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> bool:  # type: ignore[no-untyped-def]
    """Lay out, write the PNG, free the figure: every plot ends here."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_cdf(plt, doc: dict, path: Path) -> bool:
    quantiles = doc.get("quantiles")
    rows = [s for s in reference_summaries(doc, "loadgen") if s.get("latency_cdf_ms")]
    if not rows or not quantiles:
        return False
    fig, (ax, tail) = plt.subplots(1, 2, figsize=(12, 4.8))
    for s in rows:
        style = {"label": s["target"], "color": _style(s["kind"], s["workers"])["color"],
                 "linestyle": ":" if s["kind"] == "wire" else "-"}
        ax.plot(s["latency_cdf_ms"], quantiles, **style)
        # The tail: the share of messages slower than x, on a log scale (p99 = 1e-2).
        pairs = [(x, 1 - q) for x, q in zip(s["latency_cdf_ms"], quantiles) if q < 1]
        tail.plot([x for x, _ in pairs], [y for _, y in pairs], **style)
    for a in (ax, tail):
        a.set_xscale("log")
        a.set_xlabel("final reply after DATA, ms")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("share of messages at most this slow")
    tail.set_yscale("log")
    tail.set_ylabel("share of messages slower (1 - CDF)")
    ax.set_title(f"Latency CDF, loadgen, {reference_title(doc)}", fontsize=8)
    tail.set_title("its tail: p99 at 1e-2, p999 at 1e-3", fontsize=8)
    return _save(plt, fig, path)


def _plot_workers(plt, doc: dict, path: Path) -> bool:
    gens = [g for g in doc["generators"]
            if len({s["workers"] for s in axis_slice(doc, g, "workers")}) > 1]
    if not gens:
        return False
    fig, axes = plt.subplots(1, len(gens), figsize=(6.5 * len(gens), 4.8), squeeze=False)
    for ax, gen in zip(axes[0], gens):
        rows = axis_slice(doc, gen, "workers")
        for key, style in (("ingest_per_second", "-"), ("e2e_per_second", "--")):
            pts = sorted((s["workers"], s["metrics"][key]) for s in rows if s["metrics"][key])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["median"] for p in pts],
                            yerr=[[p[1]["median"] - p[1]["min"] for p in pts],
                                  [p[1]["max"] - p[1]["median"] for p in pts]],
                            label=f"mta {'ingest' if key.startswith('ingest') else 'end-to-end'}",
                            linestyle=style, capsize=3, **_style("mta", None))
        for ref in reference_summaries(doc, gen):
            if ref["kind"] in ("wire", "postfix"):
                for key, style in (("ingest_per_second", "-"), ("e2e_per_second", "--")):
                    m = ref["metrics"][key]
                    if m:
                        ax.axhline(m["median"], linestyle=style, linewidth=1,
                                   color=_style(ref["kind"], None)["color"],
                                   label=f"{ref['target']} {'ingest' if key.startswith('ingest') else 'end-to-end'}")
        ax.set_yscale("log")
        ax.set_xlabel("mta inbound workers")
        ax.set_xticks(sorted({s["workers"] for s in rows}))
        ax.set_ylabel("messages/s")
        ax.set_title(f"Scaling by inbound workers: {gen}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def write_plots(doc: dict, out: Path) -> tuple[list[tuple[str, str]], str]:
    """[(title, file name)] of the plots written, and why none if none."""
    plt, why = _pyplot()
    if plt is None:
        return [], why
    made = []
    rates = [("ingest_per_second", "ingest"), ("e2e_per_second", "end-to-end")]
    jobs = [
        ("Throughput against concurrency", "throughput_vs_sessions.png",
         lambda p: _plot_axis(plt, doc, "sessions", rates, "messages/s", p, "msg/s vs sessions")),
        ("Throughput against message size", "throughput_vs_size.png",
         lambda p: _plot_axis(plt, doc, "size", rates, "messages/s", p, "msg/s vs size")),
        ("Latency CDF at the reference point", "latency_cdf.png",
         lambda p: _plot_cdf(plt, doc, p)),
        ("Scaling by inbound workers", "scaling_workers.png",
         lambda p: _plot_workers(plt, doc, p)),
        ("CPU per 1000 messages against size", "cpu_vs_size.png",
         lambda p: _plot_axis(plt, doc, "size", [("cpu_seconds_per_1000", "")],
                              "CPU seconds / 1000 messages", p, "CPU vs size")),
    ]
    for title, name, job in jobs:
        if job(out / name):
            made.append((title, name))
    return made, "" if made else "no axis had more than one value"


# ---------------------------------------------------------------------------
# Entry points


def write(doc: dict, out: Path) -> dict:
    """results.json, report.md and the plots into `out`; what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    plots, no_plots = write_plots(doc, out)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(doc, plots, no_plots))
    return {"markdown": str(markdown), "plots": [name for _, name in plots],
            "no_plots": no_plots}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a sweep")
    p.add_argument("--out", help="directory for report.md and the plots (default: the "
                                 "results file's directory)")
    a = p.parse_args(argv)
    path = Path(a.results)
    doc = json.loads(path.read_text())
    out = Path(a.out) if a.out else path.parent
    written = write(doc, out)
    print(written["markdown"])
    if not written["plots"]:
        print(f"no plots: {written['no_plots']}; {PLOTS_HINT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
