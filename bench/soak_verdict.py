"""The soak's verdict: did every series stay bounded? (the rule is soak.py's header)

After a WARMUP_SHARE warm-up, for each series with M the median of the samples in
the middle third of the run and L the median of those in the last third: bounded iff
L <= M * (1 + GROWTH_TOLERANCE) + slack; the spool also within SPOOL_LIVE_FACTOR x
its max live data + SPOOL_MAP_SLACK_BYTES; a process replaced during the run fails
its series. Pure: judges the samples, prints nothing.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from soak_load import MEAN_SIZE_BYTES
from soak_samples import Sample, mib

MIN_SAMPLES_PER_THIRD: Final = 3
WARMUP_SHARE: Final = 0.10
GROWTH_TOLERANCE: Final = 0.10
RSS_SLACK_BYTES: Final = 8 * 1024**2
FDS_SLACK: Final = 8
SPOOL_SLACK_BYTES: Final = 16 * 1024**2
SPOOL_LIVE_FACTOR: Final = 4
SPOOL_MAP_SLACK_BYTES: Final = 64 * 1024**2
TRAFFIC_SLACK_SECONDS: Final = 2.0


@dataclass
class Verdict:
    series: str
    at_warm: float | None
    maximum: float | None
    final: float | None
    bound: str
    ok: bool
    why: str = ""
    judged: bool = True  # False: too few samples to apply the rule (fails the run too)


def judge_growth(points: list[tuple[float, float]], span: float, slack: float
                 ) -> tuple[bool, float | None, str]:
    """The growth rule: median(last third) <= median(middle third) * 1.10 + slack.
    Returns (bounded, the limit, why not when it could not be judged)."""
    middle = [v for t, v in points if span / 3 <= t < 2 * span / 3]
    last = [v for t, v in points if t >= 2 * span / 3]
    if len(middle) < MIN_SAMPLES_PER_THIRD or len(last) < MIN_SAMPLES_PER_THIRD:
        return False, None, (f"too few samples ({len(middle)} in the middle third, "
                             f"{len(last)} in the last; {MIN_SAMPLES_PER_THIRD} needed)")
    limit = statistics.median(middle) * (1 + GROWTH_TOLERANCE) + slack
    return statistics.median(last) <= limit, limit, ""


def verdicts(samples: list[Sample], span: float, args: argparse.Namespace) -> list[Verdict]:
    """One verdict per series; `span` is the run's length as sampled."""
    def values(get: Callable[[Sample], float | None]) -> list[tuple[float, float]]:
        return [(s.elapsed, v) for s in samples if (v := get(s)) is not None]

    def row(name: str, points: list[tuple[float, float]], slack: float,
            show: Callable[[float], str]) -> Verdict:
        warm = next((v for t, v in points if t >= WARMUP_SHARE * span), None)
        if not points:
            return Verdict(name, None, None, None, "-", False, "no samples")
        ok, limit, why = judge_growth(points, span, slack)
        return Verdict(name, warm, max(v for _, v in points), points[-1][1],
                       "-" if limit is None else f"median ≤ {show(limit)}", ok, why,
                       judged=limit is not None)

    def show_count(v: float) -> str:
        return f"{v:.0f}"

    backlog_seconds = args.defer_share * args.delete_every + TRAFFIC_SLACK_SECONDS
    out = []
    spool = row("spool on disk (data.mdb + lock.mdb)", values(lambda s: s.spool_disk_bytes),
                SPOOL_SLACK_BYTES, mib)
    live_points = values(lambda s: s.live_bytes)
    if spool.maximum is not None and live_points:
        ceiling = SPOOL_LIVE_FACTOR * max(v for _, v in live_points) + SPOOL_MAP_SLACK_BYTES
        spool.bound += f"; max ≤ {mib(ceiling)} ({SPOOL_LIVE_FACTOR} x max live + 64 MiB)"
        if spool.maximum > ceiling:
            spool.ok = False
            spool.why = spool.why or "on disk beyond 4 x max live data + 64 MiB"
    out.append(spool)
    out.append(row("live data (mta_queue_stored_bytes)", live_points,
                   args.rate * backlog_seconds * MEAN_SIZE_BYTES, mib))
    out.append(row("queue messages (mta_queue_messages)", values(lambda s: s.queue_messages),
                   args.rate * backlog_seconds, show_count))
    titles = sorted({t for s in samples for t in s.procs}, key=title_order)
    for title in titles:
        pids: list[int] = []
        for s in samples:
            p = s.procs.get(title)
            if p is not None and (not pids or pids[-1] != p.pid):
                pids.append(p.pid)
        rss = [(s.elapsed, float(s.procs[title].rss_bytes)) for s in samples if title in s.procs]
        fds = [(s.elapsed, float(s.procs[title].fds)) for s in samples if title in s.procs]
        for v in (row(f"RSS {title}", rss, RSS_SLACK_BYTES, mib),
                  row(f"fds {title}", fds, FDS_SLACK, show_count)):
            if len(pids) > 1:
                v.ok = False
                v.why = f"process replaced during the run (pids {', '.join(map(str, pids))})"
            out.append(v)
    return out


def title_order(title: str) -> tuple[int, str]:
    kinds = ("master", "inbound", "scheduler", "delivery", "control")
    kind = title.split("#", 1)[0]
    return (kinds.index(kind) if kind in kinds else len(kinds), title)


def render_verdicts(rows: list[Verdict]) -> str:
    def cell(name: str, v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.0f}" if name.startswith(("fds", "queue")) else mib(v)

    lines = ["| series | at 10% | max | final | bound (last third) | verdict |",
             "|---|---:|---:|---:|---|---|"]
    for v in rows:
        verdict = ("bounded" if v.ok else
                   f"**{'UNBOUNDED' if v.judged else 'not judged'}**"
                   f"{': ' + v.why if v.why else ''}")
        lines.append(f"| {v.series} | {cell(v.series, v.at_warm)} | {cell(v.series, v.maximum)} "
                     f"| {cell(v.series, v.final)} | {v.bound} | {verdict} |")
    return "\n".join(lines)
