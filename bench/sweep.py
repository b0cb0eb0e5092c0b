"""bench/run --sweep: every target side by side over a grid of load points.

Owns the sweep itself: the run order (light points first on each target), the
repeats with progress and an ETA, the summaries (median, spread, ratios to the wire
limit and to Postfix, the notes) and the JSON document bench/report.py renders. The
grid and the sweep's options are sweep_grid.py's, the targets sweep_targets.py's, one
measured run sweep_run.py's; bench/run owns the CLI and how mta and the aiosmtpd
baseline are started (it hands them over as a `Rig`).

Invariants: every process a sweep starts is stopped before it returns (targets after
their last point, the sink at the end, load generators by their own caps); every wait
is bounded; a target that fails to start or dies is FAILED runs, never an exception;
all traffic stays on 127.0.0.1 and no target asks the machine's DNS resolver.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Final

import peer_opensmtpd
import sourcegen
from peers import CountingSink
from procs import BENCH_DIR, HOST, become_subreaper, free_port, log, reap_orphans
from procstat import machine_info
from report_markdown import main_table_text
from results import CLIENT_BOUND_CPU_SHARE, OTHER_BUSY_CPU_SHARE
from sweep_grid import DURABILITY, Point, build_grid, reference_values
from sweep_run import QUANTILES, Context, measure
from sweep_targets import START_TIMEOUT_SECONDS, Rig, Target, find_peers, start_target

RESULTS_DIR: Final = BENCH_DIR / "results"  # git-ignored (.gitignore: bench/results/)
NOISY_SPREAD: Final = 0.15  # (max - min) / median of the msg/s over the repeats


# ---------------------------------------------------------------------------
# Summaries


def _values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if r.get("ok") and r.get(key) is not None]


def summarize_metric(runs: list[dict], key: str) -> dict | None:
    values = _values(runs, key)
    if not values:
        return None
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "n": len(values),
            "spread": (hi - lo) / med if med else 0.0}


METRICS: Final = ("ingest_per_second", "e2e_per_second", "latency_p50_ms", "latency_p99_ms",
                  "latency_p999_ms", "cpu_seconds_per_1000", "peak_rss_bytes",
                  "tail_seconds", "client_cpu_share", "other_cpu_share", "listen_drops")
RATIO_METRICS: Final = ("ingest_per_second", "e2e_per_second", "latency_p50_ms",
                        "latency_p99_ms", "latency_p999_ms", "cpu_seconds_per_1000",
                        "peak_rss_bytes")


def summarize(target: Target, point: Point, runs: list[dict]) -> dict:
    summary = {"target": target.name, "kind": target.kind, "workers": target.workers,
               "point": point.key, **asdict(point),
               "runs": len(runs), "ok_runs": sum(1 for r in runs if r.get("ok")),
               "failed": [r["error"] for r in runs if not r.get("ok")],
               "metrics": {k: summarize_metric(runs, k) for k in METRICS}}
    cdfs = [r["latency_cdf_ms"] for r in runs if r.get("ok") and r.get("latency_cdf_ms")]
    # Pooled CDF over the repeats: the median value at each quantile.
    summary["latency_cdf_ms"] = ([statistics.median(v) for v in zip(*cdfs)] if cdfs else None)
    summary["messages"] = sorted({r["accepted"] for r in runs if r.get("ok")})
    notes = []
    for key, label in (("ingest_per_second", "ingest"), ("e2e_per_second", "end-to-end")):
        m = summary["metrics"][key]
        if m and m["n"] > 1 and m["spread"] > NOISY_SPREAD:
            notes.append(f"noisy: {label} spread {m['spread']:.0%} of the median")
    busy = _values(runs, "other_cpu_share")
    if busy and max(busy) > OTHER_BUSY_CPU_SHARE:
        notes.append(f"machine busy: other processes used up to {max(busy):.0%} of a core")
    client = _values(runs, "client_cpu_share")
    if point.generator == "loadgen" and client and statistics.median(client) > CLIENT_BOUND_CPU_SHARE:
        notes.append("loadgen near a full core: client-bound")
    summary["noisy"] = bool(notes)
    drops = _values(runs, "listen_drops")
    if drops and max(drops) > 0:
        notes.append(f"listen queue full: up to {max(drops):.0f} connection attempts dropped "
                     f"(clients retry after 1 s)")
    capped = [r for r in runs if r.get("ok") and r.get("timed_out")]
    if capped:
        notes.append(f"{len(capped)} run(s) cut at the hard cap")
    nothing = [r for r in runs if r.get("ok") and r.get("nothing_accepted")]
    if nothing:
        notes.append(f"{len(nothing)} run(s) got no message accepted within --run-seconds "
                     f"(counted as 0 msg/s)")
    upper = [r for r in runs if r.get("ok") and r.get("accepted_is_upper_bound")]
    if upper:
        notes.append(f"{len(upper)} run(s): smtp-source stopped, messages counted at DATA "
                     f"(an upper bound)")
    lost = [(r["messages"] - r["accepted"] - r.get("unsent", 0), r) for r in runs
            if r.get("ok") and r.get("messages") and not r.get("timed_out")
            and not (r["generator"] == "smtp-source" and r.get("stopped_at_deadline"))]
    lost = [(n, r) for n, r in lost if n > 0]
    if lost:
        kinds = sorted({k for _, r in lost for k in [*r["rejected_by_code"], *r["errors_by_kind"]]})
        notes.append(f"up to {max(n for n, _ in lost)} message(s) not accepted "
                     f"({', '.join(kinds) or 'see JSON'})")
    extra = [r.get("extra_arrivals", 0) for r in runs if r.get("ok") and r.get("extra_arrivals")]
    if extra:
        notes.append(f"up to {max(extra)} extra arrival(s) at the sink")
    if summary["failed"]:
        notes.append(f"FAILED {len(summary['failed'])}/{len(runs)}: {summary['failed'][0]}")
    summary["notes"] = notes
    return summary


def add_ratios(summaries: list[dict]) -> None:
    """ratios[ref][metric] = this median / ref's median, ref in (wire, postfix), at the
    same point (mta's points compared at the same point without the workers axis)."""
    medians = {(s["target"], s["point"]): {k: (m["median"] if m else None)
                                           for k, m in s["metrics"].items()}
               for s in summaries}
    for s in summaries:
        peer = Point(s["generator"], s["sessions"], s["size"], s["per_session"]).key
        s["ratios"] = {}
        for ref in ("wire", "postfix"):
            base = medians.get((ref, peer))
            if base is None:
                continue
            ratios = {}
            for key in RATIO_METRICS:
                mine = s["metrics"][key]["median"] if s["metrics"][key] else None
                # The wire has no next hop: end-to-end is compared with its ingest.
                theirs = base.get("ingest_per_second" if ref == "wire" and key == "e2e_per_second"
                                  else key)
                ratios[key] = mine / theirs if mine is not None and theirs else None
            s["ratios"][ref] = ratios


# ---------------------------------------------------------------------------
# The sweep


def plan(args: argparse.Namespace, found: dict[str, tuple[str, str]]) -> list[tuple[Target, list[Point]]]:
    """(target, its points) in run order; mta is one target per worker count."""
    points = build_grid(args.sweep, args.grid_axes, args.generator_list)
    if not sourcegen.available():
        points = [p for p in points if p.generator != "smtp-source"]
    peer_points = sorted({p.peer() for p in points}, key=weight)
    order = []
    for kind in args.sweep_targets:
        skipped, detail = found.get(kind, ("", ""))
        if kind == "mta":
            for workers in sorted({p.workers for p in points if p.workers is not None}):
                order.append((Target("mta", workers, skipped, detail),
                              sorted((p for p in points if p.workers == workers), key=weight)))
        else:
            order.append((Target(kind, None, skipped, detail), peer_points))
    return order


def weight(point: Point) -> tuple:
    """Run order on one target: light points first. A target keeps what a heavy point
    made it allocate (peak RSS is the whole tree's), so light points come before."""
    return (point.size, point.sessions, point.per_session, point.generator)


def estimate_left(runnable: list[tuple[Target, list[Point]]], took: dict[str, list[float]],
                  repeat: int, current: Target, point: Point, repeats: int,
                  average: float) -> float:
    """Seconds left: each run still to come at its target's mean so far (else the
    sweep's mean), plus a few seconds per target start."""
    left, seen_current = 0.0, False
    for r in range(repeat, repeats + 1):
        for target, points in runnable:
            if r == repeat and not seen_current:
                if target is current:
                    seen_current = True
                    n = len(points) - points.index(point) - 1
                else:
                    continue
            else:
                n = len(points)
                left += 3.0
            per_run = (statistics.mean(took[target.name]) if took.get(target.name)
                       else average)
            left += n * per_run
    return left


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def default_report_dir() -> Path:
    base = RESULTS_DIR / time.strftime("%Y-%m-%d")
    candidate, n = base, 1
    while (candidate / "results.json").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def run_sweep(args: argparse.Namespace, scratch: Path, rig: Rig) -> tuple[str, dict, bool]:
    """The whole sweep: (the report's main table as text, the JSON document, all ok)."""
    import report  # late: matplotlib (if any) is only imported when a report is written

    sweep_started = time.monotonic()
    found = find_peers(list(args.sweep_targets), args)
    order = plan(args, found)
    runnable = [(t, pts) for t, pts in order if not t.skipped]
    total = sum(len(pts) for _, pts in runnable) * args.repeat
    est = total * (args.run_seconds + args.warmup_seconds + 1.5) + len(runnable) * args.repeat * 3
    log(f"sweep ({args.sweep}): {total} runs = {len(runnable)} targets x their points x "
        f"{args.repeat} repeat(s); roughly {fmt_duration(est)}")
    for t, _ in order:
        if t.skipped:
            log(f"sweep: {t.name} SKIPPED: {t.skipped}")
    become_subreaper()
    sink_port = free_port()
    sink = CountingSink(args.sink, sink_port, scratch)
    log(f"sweep: common next hop {sink.kind} on {HOST}:{sink_port}")
    runs: list[dict] = []
    done = 0
    took: dict[str, list[float]] = {}  # target -> seconds per run so far (ETA)
    ctx = Context(args, sink)
    try:
        why = sink.wait_ready(START_TIMEOUT_SECONDS)
        if why is not None:
            raise SystemExit(f"bench: the sink did not start: {why}")
        for repeat in range(1, args.repeat + 1):
            for target, points in runnable:
                workdir = Path(tempfile.mkdtemp(prefix=f"sweep-{target.name}-r{repeat}-",
                                                dir=scratch))
                workdir.chmod(0o755)
                log(f"sweep: starting {target.name} (repeat {repeat}/{args.repeat})")
                started, handle, why = None, None, None
                try:
                    started, handle, why = start_target(target, rig, workdir, sink_port, args)
                except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                try:
                    for point in points:
                        if started is None:
                            run = {"target": target.name, "kind": target.kind,
                                   "point": point.key, **asdict(point), "repeat": repeat,
                                   "ok": False, "error": f"failed to start: {why}",
                                   "log_tail": handle.log_tail() if handle else None}
                        else:
                            run_started = time.monotonic()
                            try:
                                run = measure(started, point, repeat, ctx)
                            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                                run = {"target": target.name, "kind": target.kind,
                                       "point": point.key, **asdict(point), "repeat": repeat,
                                       "ok": False, "error": f"load run failed: {exc}",
                                       "log_tail": started.handle.log_tail()}
                        runs.append(run)
                        done += 1
                        if started is not None:
                            took.setdefault(target.name, []).append(
                                time.monotonic() - run_started)
                        elapsed = time.monotonic() - sweep_started
                        eta = estimate_left(runnable, took, repeat, target, point,
                                            args.repeat, elapsed / done)
                        log(f"[{done}/{total}] {done / total:4.0%} {fmt_duration(elapsed)} "
                            f"elapsed, ETA {fmt_duration(eta)}: {target.name} {point.key} "
                            f"r{repeat}: {describe(run)}")
                finally:
                    if handle is not None:
                        handle.stop()
                    reap_orphans(keep={sink.proc.pid})
    finally:
        sink.stop()
    summaries = []
    for target, points in order:
        for point in points:
            mine = [r for r in runs if r["target"] == target.name and r["point"] == point.key]
            s = summarize(target, point, mine)
            s["skipped"] = target.skipped or None
            summaries.append(s)
    add_ratios(summaries)
    doc = {
        "mode": args.sweep, "repeat": args.repeat, "run_seconds": args.run_seconds,
        "warmup_seconds": args.warmup_seconds, "generators": list(args.generator_list),
        "axes": {a: list(v) for a, v in args.grid_axes.items()},
        "reference": reference_values(args.grid_axes),
        "sink": sink.kind,
        "targets": [{"name": t.name, "kind": t.kind, "workers": t.workers,
                     "skipped": t.skipped or None, "detail": t.detail,
                     "durability": DURABILITY[t.kind], "relays": t.relays} for t, _ in order],
        "settings": {"postfix_in_flow_delay": args.postfix_in_flow_delay,
                     "opensmtpd_limits": args.opensmtpd_limits,
                     "opensmtpd_limits_conf": peer_opensmtpd.LIMITS[args.opensmtpd_limits],
                     "mta_delivery_workers": args.delivery_workers,
                     "smtp_source": sourcegen.available()},
        "machine": machine_info(loadavg=True),
        "elapsed_seconds": time.monotonic() - sweep_started,
        "quantiles": list(QUANTILES),  # the y of every latency_cdf_ms
        "summaries": summaries, "runs": runs,
    }
    out = Path(args.report) if args.report else default_report_dir()
    written = report.write(doc, out)
    log(f"sweep: report written to {written['markdown']}"
        + (f" with {len(written['plots'])} plot(s)" if written["plots"] else
           f" without plots ({written['no_plots']})"))
    doc["report_dir"] = str(out)
    optional = {"opensmtpd"} if args.smoke else set()
    ok = all(r["ok"] for r in runs if r["kind"] not in optional)
    required = {"wire", "postfix"} & set(args.sweep_targets)
    if not args.smoke and any(t.skipped for t, _ in order if t.kind in required):
        ok = False
    return main_table_text(doc) + f"\n\nReport: {written['markdown']}", doc, ok


def describe(run: dict) -> str:
    if not run.get("ok"):
        return f"FAILED: {run.get('error')}"
    parts = [f"{run['accepted']} msgs, ingest {run['ingest_per_second']:.0f} msg/s"]
    if run.get("e2e_per_second") is not None:
        parts.append(f"e2e {run['e2e_per_second']:.0f} msg/s")
    if run.get("latency_p99_ms") is not None:
        parts.append(f"p99 {run['latency_p99_ms']:.1f} ms")
    if run.get("cpu_seconds_per_1000") is not None:
        parts.append(f"CPU {run['cpu_seconds_per_1000']:.2f} s/1k")
    parts.append(f"RSS {run['peak_rss_bytes'] / 1024**2:.0f} MiB")
    if run.get("other_cpu_share", 0) > OTHER_BUSY_CPU_SHARE:
        parts.append(f"other {run['other_cpu_share']:.0%}")
    return ", ".join(parts)
