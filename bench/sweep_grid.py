"""bench/run --sweep's grid: the load points, the target kinds, the sweep's options.

A Point is (generator, sessions, size, messages per session, and for mta its inbound
workers). The default sweep is the reference point (1 KiB, 50 sessions, one message
per connection, one worker) and each axis varied alone around it (smtp-source: only
sessions and workers); `--sweep full` is the cross product. `--grid AXIS=V,V` replaces
an axis's values. bench/run's parser calls add_arguments and finish_arguments;
`--smoke` runs smoke_args's two points.

Pure: no I/O but the temp report directory smoke_args makes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Final

import peer_opensmtpd
from report_markdown import size_label

GENERATORS: Final = ("loadgen", "smtp-source")
AXES: Final = ("sessions", "size", "per_session", "workers")
FULL_AXES: Final[dict[str, tuple[int, ...]]] = {
    "sessions": (1, 10, 50, 200),
    "size": (1024, 10240, 102400, 1048576),
    "per_session": (1, 100),
    "workers": tuple(range(1, (os.cpu_count() or 1) + 1)),  # mta's inbound workers
}
# The point every default-sweep axis is varied around, one axis at a time.
REFERENCE: Final = {"sessions": 50, "size": 1024, "per_session": 1, "workers": 1}
# The axes the default sweep varies per generator. smtp-source (one connection per
# message, no pipelining) tells most about concurrency; the size and per-session
# axes with it are in `--sweep full` (they would add a third to the default's time).
DEFAULT_AXES: Final = {"loadgen": AXES, "smtp-source": ("sessions", "workers")}

TARGET_KINDS: Final = ("wire", "mta", "postfix", "opensmtpd", "aiosmtpd")
DEFAULT_TARGETS: Final = TARGET_KINDS
# What each kind does with a message before its 250 (the durability bar).
DURABILITY: Final = {
    "wire": "stores nothing",
    "mta": "fsync before 250 (LMDB commit)",
    "postfix": "fsync before 250 (queue file)",
    "opensmtpd": "NO fsync before 250",
    "aiosmtpd": "fsync before 250 (file per message), no next hop",
}


@dataclass(frozen=True, order=True)
class Point:
    """One load point. `workers` is mta's inbound workers; None for every other target."""

    generator: str
    sessions: int
    size: int
    per_session: int
    workers: int | None = None

    @property
    def key(self) -> str:
        return (f"{self.generator}/s{self.sessions}/{size_label(self.size, sep='')}/p{self.per_session}"
                + ("" if self.workers is None else f"/w{self.workers}"))

    def peer(self) -> Point:
        """The same point without the workers axis: what the other targets ran."""
        return replace(self, workers=None)


def reference_values(axes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The reference point, moved to an axis's first value if an override left it out."""
    return {a: REFERENCE[a] if REFERENCE[a] in axes[a] else axes[a][0] for a in AXES}


def build_grid(mode: str, axes: dict[str, tuple[int, ...]],
               generators: tuple[str, ...]) -> list[Point]:
    """Every point of the sweep (workers set: mta's points; peers drop the axis).

    default: the reference point and each axis varied alone around it (for
    smtp-source only DEFAULT_AXES); full: the cross product of the axes."""
    if mode == "full":
        combos = [dict(zip(AXES, values)) for values in itertools.product(*(axes[a] for a in AXES))]
        return sorted({Point(g, **c) for g in generators for c in combos})
    ref = reference_values(axes)
    points = set()
    for g in generators:
        points.add(Point(g, **ref))
        for a in DEFAULT_AXES.get(g, AXES):
            points.update(Point(g, **dict(ref, **{a: v})) for v in axes[a])
    return sorted(points)


def parse_grid(overrides: list[str] | None) -> dict[str, tuple[int, ...]]:
    """FULL_AXES with `AXIS=V,V` overrides; raises ValueError on a bad one."""
    axes = dict(FULL_AXES)
    for item in overrides or []:
        name, _, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in AXES:
            raise ValueError(f"unknown axis {name!r} in --grid {item!r}; axes: {', '.join(AXES)}")
        parsed = tuple(sorted({int(v) for v in values.split(",") if v.strip()}))
        if not parsed or min(parsed) < (0 if name == "size" else 1):
            raise ValueError(f"--grid {item!r}: values must be >= 1 (size >= 0)")
        axes[name] = parsed
    return axes


# ---------------------------------------------------------------------------
# CLI pieces (bench/run's parser calls these)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", nargs="?", const="default", choices=("default", "full"),
                   help="every target side by side over a grid of load points, with a "
                        "Markdown report, plots and JSON (default: each axis varied alone "
                        "around 1 KiB / 50 sessions / 1 per session; full: the cross "
                        "product; see bench/README.md)")
    p.add_argument("--grid", action="append", metavar="AXIS=V[,V...]",
                   help="--sweep: replace one axis's values (sessions, size, per_session, "
                        "workers); repeatable")
    p.add_argument("--generators", default=",".join(GENERATORS),
                   help="--sweep: load generators, from loadgen, smtp-source "
                        "(default: %(default)s)")
    p.add_argument("--run-seconds", type=float, default=None,
                   help="--sweep: length each measured run is sized to (default 2; 0.5 "
                        "in --smoke)")
    p.add_argument("--warmup-seconds", type=float, default=None,
                   help="--sweep: warm-up before each run, also used to size it "
                        "(default 0.5; 0.25 in --smoke)")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="--sweep: where results.json, report.md and the plots go (default "
                        "bench/results/<date>/; a temp dir in --smoke)")
    p.add_argument("--opensmtpd-limits", choices=tuple(peer_opensmtpd.LIMITS), default="matched",
                   help="--sweep: OpenSMTPD's outbound limits: `matched` (20 connections to "
                        "the sink, no connect delays, as mta and Postfix) or `stock` "
                        "(as shipped; ~14 msg/s here) (default: %(default)s)")


def finish_arguments(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Validate and complete the --sweep arguments (also run for --smoke's sweep part)."""
    try:
        args.grid_axes = parse_grid(args.grid)
    except ValueError as exc:
        p.error(str(exc))
    args.generator_list = tuple(g.strip() for g in args.generators.split(",") if g.strip())
    unknown = [g for g in args.generator_list if g not in GENERATORS]
    if unknown or not args.generator_list:
        p.error(f"--generators: unknown {unknown}; choose from {', '.join(GENERATORS)}")
    if args.sweep:
        names = [t.strip() for t in (args.targets or ",".join(DEFAULT_TARGETS)).split(",")
                 if t.strip()]
        unknown = [t for t in names if t not in TARGET_KINDS]
        if unknown or not names:
            p.error(f"--sweep: unknown target(s) {unknown}; choose from "
                    f"{', '.join(TARGET_KINDS)}")
        args.sweep_targets = names
    if args.run_seconds is None:
        args.run_seconds = 0.5 if args.smoke else 2.0
    if args.warmup_seconds is None:
        args.warmup_seconds = 0.25 if args.smoke else 0.5
    if args.run_seconds <= 0 or args.warmup_seconds < 0:
        p.error("--run-seconds must be > 0 and --warmup-seconds >= 0")


def smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    """--smoke's sweep part: two points (one per generator), one repeat, every target
    that is there; a report with plots in a temp dir. Proves the harness, not speed."""
    smoke = argparse.Namespace(**vars(args))
    smoke.sweep = "default"
    smoke.sweep_targets = list(TARGET_KINDS)
    smoke.grid_axes = {"sessions": (10,), "size": (1024,), "per_session": (1,), "workers": (1,)}
    smoke.repeat = 1
    smoke.report = args.report or tempfile.mkdtemp(prefix="mta-bench-smoke-report-")
    return smoke
