"""bench/run --sweep: every target side by side over a grid of load points.

Owns the grid (its axes, the default subset, the full cross product), the targets of
a sweep and their start and stop, one measured run (warm-up, calibrated length, load,
arrivals at the common sink, CPU, peak RSS, noise), the repeats with progress and an
ETA, the summaries (median, spread, ratios to the wire limit and to Postfix) and the
JSON that bench/report.py renders. bench/run owns the CLI and how mta and the aiosmtpd
baseline are started (it hands them over as a `Rig`).

A run at one point: a warm-up of `--warmup-seconds` with loadgen (pipelining as the
point's generator does it) when the target is fresh or sees more sessions than
before; then the measured load, `--run-seconds` long: loadgen starts no message
after that soft deadline, smtp-source (which has none) is stopped then and the
target's own count says what it accepted; then, for a target that relays, the wait
until the sink has counted every accepted message.

Invariants: every process a sweep starts is stopped before it returns (targets after
their last point, the sink at the end, load generators by their own caps); every wait
is bounded (loadgen's soft deadline and hard cap, smtp-source's cap, the arrival
timeout); a target that fails to start or dies is FAILED runs, never an exception;
all traffic stays on 127.0.0.1 and no target asks the machine's DNS resolver.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Final, Protocol

import peer_opensmtpd
import sourcegen
from peers import (E2E_DOMAIN, HOST, POSTFIX_INSTALL_COMMANDS, SMTP_SINK, CountingSink,
                   PostfixInstance, become_subreaper, install_postfix, log,
                   postfix_installed, postfix_version, reap_orphans)
from procstat import (group_cpu_seconds, group_rss_bytes, listen_drops,
                      machine_busy_seconds, machine_interrupt_seconds,
                      reaped_children_cpu_seconds, self_cpu_seconds)

BENCH_DIR: Final = Path(__file__).resolve().parent
LOADGEN: Final = BENCH_DIR / "loadgen.py"
RESULTS_DIR: Final = BENCH_DIR / "results"  # git-ignored (.gitignore: bench/results/)
RCPT: Final = f"user@{E2E_DOMAIN}"

# ---------------------------------------------------------------------------
# The grid

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

# Run sizing: at most this many messages (and body bytes) per run; smtp-source gets
# rate x run_seconds messages, at least MIN_MESSAGES (and one per session).
MIN_MESSAGES: Final = 20
MAX_MESSAGES: Final = 200_000
MAX_RUN_BYTES: Final = 512 * 1024**2  # body bytes per run: 512 x 1 MiB at most
START_TIMEOUT_SECONDS: Final = 20.0
ARRIVAL_TIMEOUT_SECONDS: Final = 60.0  # from the run's first connect to its last arrival
QUIET_SECONDS: Final = 0.3  # no arrival for this long: the run has settled
RSS_SAMPLE_SECONDS: Final = 0.1
NOISY_SPREAD: Final = 0.15  # (max - min) / median of the msg/s over the repeats
OTHER_BUSY_CPU_SHARE: Final = 0.15
CLIENT_BOUND_CPU_SHARE: Final = 0.85
# Latency CDF: the value at each of these quantiles, per run (nearest rank).
QUANTILES: Final = (0.001, 0.002, 0.005, *[i / 100 for i in range(1, 100)],
                    0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)


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
        return (f"{self.generator}/s{self.sessions}/{size_label(self.size)}/p{self.per_session}"
                + ("" if self.workers is None else f"/w{self.workers}"))

    def peer(self) -> Point:
        """The same point without the workers axis: what the other targets ran."""
        return replace(self, workers=None)


def size_label(size: int) -> str:
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


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


# ---------------------------------------------------------------------------
# Targets


class TargetProcess(Protocol):
    """A started target, whatever it is: how to measure it, check it and stop it."""

    def cpu_seconds(self) -> float: ...
    def alive(self) -> bool: ...
    def stop(self) -> object: ...
    def log_tail(self) -> str: ...


class ServerProcess(TargetProcess, Protocol):
    """bench/run's Server: spawned in its own session (its pid is the group's id)."""

    proc: subprocess.Popen

    def wait_ready(self, timeout: float) -> str | None: ...


@dataclass
class Rig:
    """What bench/run hands over: how mta and the aiosmtpd baseline are started.

    Each returns bench/run's Server, already spawned; the sweep waits for its
    greeting."""

    start_mta: Callable[[int, Path, int, int], ServerProcess]  # port, workdir, workers, sink port
    start_aiosmtpd: Callable[[int, Path], ServerProcess]  # port, workdir


@dataclass
class Target:
    """One row family of the sweep: a target kind, and for mta its worker count."""

    kind: str
    workers: int | None = None
    skipped: str = ""  # why it never ran (not installed, could not be fetched)
    detail: str = ""  # version, or how it was found

    @property
    def name(self) -> str:
        return f"mta-{self.workers}w" if self.kind == "mta" else self.kind

    @property
    def relays(self) -> bool:
        """Has a next hop: its end-to-end rate is measured at the common sink."""
        return self.kind in ("mta", "postfix", "opensmtpd")


class Started:
    """A running target: its process group (for CPU and RSS), port and handle."""

    def __init__(self, target: Target, port: int, pgid: int, handle: TargetProcess,
                 workdir: Path):
        self.target = target
        self.port = port
        self.pgid = pgid
        self.handle = handle
        self.workdir = workdir
        self.warm_sessions = 0  # the most sessions a warm-up has run on it

    def accepted_count(self) -> int | None:
        """What the target itself has accepted so far, where it says: the wire's
        count of messages, the baseline's files. None for a relay (its count is the
        common sink's)."""
        if isinstance(self.handle, _SinkHandle):
            return self.handle.sink.count()
        if self.target.kind == "aiosmtpd":
            try:
                return sum(1 for _ in os.scandir(self.workdir / "spool"))
            except OSError:
                return 0  # nothing written yet
        return None

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.pgid)

    def rss_bytes(self) -> int:
        return group_rss_bytes(self.pgid)


class _SinkHandle:
    """smtp-sink (or sink.py) as the wire-limit target."""

    def __init__(self, sink: CountingSink):
        self.sink = sink

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.sink.proc.pid)

    def alive(self) -> bool:
        return self.sink.alive()

    def stop(self) -> None:
        self.sink.stop()

    def log_tail(self) -> str:
        try:
            return self.sink.stderr_path.read_text(errors="replace")[-2000:]
        except OSError as exc:
            return f"(cannot read {self.sink.stderr_path}: {exc})"


def start_target(target: Target, rig: Rig, workdir: Path, sink_port: int,
                 args: argparse.Namespace) -> tuple[Started | None, TargetProcess | None, str | None]:
    """Start one target; (started, handle to stop even if not ready, why not ready)."""
    port = free_port()
    if target.kind == "wire":
        sink = CountingSink(args.sink, port, workdir)
        handle: TargetProcess = _SinkHandle(sink)
        why = sink.wait_ready(START_TIMEOUT_SECONDS)
        target.detail = sink.kind
        return (None if why else Started(target, port, sink.proc.pid, handle, workdir)), handle, why
    if target.kind == "postfix":
        pf = PostfixInstance(workdir, port, sink_port, args.postfix_in_flow_delay)
        why = pf.start(START_TIMEOUT_SECONDS)
        if why is not None or pf.master_pid is None:
            return None, pf, why or "no master pid"
        return Started(target, port, pf.master_pid, pf, workdir), pf, None
    if target.kind == "opensmtpd":
        root = peer_opensmtpd.locate()
        assert root is not None  # find_peers() skipped the target otherwise
        inst = peer_opensmtpd.OpenSmtpdInstance(root, workdir, port, sink_port,
                                                args.opensmtpd_limits)
        why = inst.start(START_TIMEOUT_SECONDS)
        if why is not None or inst.pgid is None:
            return None, inst, why or "not started"
        return Started(target, port, inst.pgid, inst, workdir), inst, None
    server: ServerProcess
    if target.kind == "mta":
        assert target.workers is not None  # plan() gives every mta target its count
        server = rig.start_mta(port, workdir, target.workers, sink_port)
    else:
        server = rig.start_aiosmtpd(port, workdir)
    why = server.wait_ready(START_TIMEOUT_SECONDS)
    return (None if why else Started(target, port, server.proc.pid, server, workdir)), server, why


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_peers(kinds: list[str], args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """kind -> (why it is skipped or "", detail): installs or locates each peer."""
    found: dict[str, tuple[str, str]] = {}
    for kind in kinds:
        if kind == "postfix" or (kind == "wire" and args.sink != "python"):
            if not postfix_installed() and args.install_peers:
                install_postfix()
        if kind == "postfix":
            found[kind] = (("", f"Postfix {postfix_version()}") if postfix_installed() else
                           ("Postfix is not installed (bench/run --install-peers, or: "
                            + "; ".join(POSTFIX_INSTALL_COMMANDS) + ")", ""))
        elif kind == "opensmtpd":
            root, how = peer_opensmtpd.locate_or_fetch()
            log(f"opensmtpd: {how}")
            found[kind] = (("", f"OpenSMTPD {peer_opensmtpd.version_of(root)}, limits "
                                f"{args.opensmtpd_limits}") if root else (how, ""))
        elif kind == "aiosmtpd":
            if importlib.util.find_spec("aiosmtpd") is None and args.install_peers:
                log("installing aiosmtpd: pip install aiosmtpd")
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd"],
                               stdin=subprocess.DEVNULL, check=False, timeout=300)
                importlib.invalidate_caches()
            found[kind] = (("", "bench/baseline_aiosmtpd.py")
                           if importlib.util.find_spec("aiosmtpd") else
                           ("aiosmtpd is not importable (pip install aiosmtpd)", ""))
        elif kind == "wire":
            found[kind] = ("", "smtp-sink" if SMTP_SINK.exists() and args.sink != "python"
                           else "bench/sink.py (smtp-sink not installed)")
        else:
            found[kind] = ("", "")
    return found


# ---------------------------------------------------------------------------
# One run


class RssSampler:
    """Peak of a process group's summed RSS, sampled every RSS_SAMPLE_SECONDS."""

    def __init__(self, pgid: int):
        self.pgid = pgid
        self.peak = group_rss_bytes(pgid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak = max(self.peak, group_rss_bytes(self.pgid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, group_rss_bytes(self.pgid))
        return self.peak


def run_loadgen(port: int, point: Point, messages: int, *, pipelining: bool,
                duration: float, hard_cap: float, latencies: bool) -> dict:
    argv = [sys.executable, str(LOADGEN), "--host", HOST, "--port", str(port),
            "--sessions", str(point.sessions), "--messages", str(messages),
            "--size", str(point.size), "--per-session", str(point.per_session),
            "--rcpt", RCPT, "--duration-seconds", f"{duration:.3f}",
            "--timeout-seconds", f"{hard_cap:.1f}", "--json", "--quiet",
            "--pipelining" if pipelining else "--no-pipelining"]
    if latencies:
        argv.append("--latencies")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          timeout=hard_cap + 60, check=False)
    try:
        result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise RuntimeError(f"loadgen exited {proc.returncode} without a JSON result "
                           f"({exc}); stdout: {proc.stdout[-300:]!r}") from exc
    result["generator"] = "loadgen"
    result["accepted_is_upper_bound"] = False
    return result


def quantiles(values: list[float]) -> list[float] | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    return [round(ordered[min(max(math.ceil(q * n), 1), n) - 1], 4) for q in QUANTILES]


def max_messages(point: Point) -> int:
    return min(MAX_MESSAGES, max(MAX_RUN_BYTES // max(point.size, 1), MIN_MESSAGES))


def source_messages(point: Point) -> int:
    """smtp-source's -m: more than a run can send (it is stopped at the deadline),
    except with -d, which sends every message of a session over one connection and
    lets fast sessions take more than their share: half of per_session each on
    average, so that none goes past per_session (OpenSMTPD answers the 101st message
    of a session with 452, and smtp-source stops at any non-2xx reply)."""
    upper = max_messages(point)
    if point.per_session > 1:
        upper = min(upper, point.sessions * point.per_session // 2)
    return max(upper, point.sessions)


@dataclass
class Context:
    args: argparse.Namespace
    sink: CountingSink


def warm_up(started: Started, point: Point, ctx: Context) -> str | None:
    """Unmeasured load at the point's sessions and size; None, or what went wrong.

    loadgen for both generators (with smtp-source's round trips when that is the
    point's generator), bounded by its soft deadline; a relaying target's warm-up
    messages must all arrive before the measured run starts."""
    args = ctx.args
    seconds = max(args.warmup_seconds, 0.05)
    base = ctx.sink.count()
    result = run_loadgen(started.port, point, max_messages(point),
                         pipelining=point.generator == "loadgen",
                         duration=seconds, hard_cap=seconds + 20, latencies=False)
    if result["accepted"] == 0:
        why = "; ".join(result["first_errors"][:2]) or str(result["rejected_by_code"])
        return f"warm-up: no message accepted ({why})"
    if started.target.relays:
        if ctx.sink.wait_for(base + result["accepted"],
                             time.monotonic() + ARRIVAL_TIMEOUT_SECONDS) is None:
            return (f"warm-up: {ctx.sink.count() - base} of {result['accepted']} "
                    f"messages arrived within {ARRIVAL_TIMEOUT_SECONDS:.0f}s")
        ctx.sink.wait_quiet(QUIET_SECONDS, 5.0)
    started.warm_sessions = max(started.warm_sessions, point.sessions)
    return None


def measure(started: Started, point: Point, repeat: int, ctx: Context) -> dict:
    """One measured run at one point; a flat dict (ok, error and every figure)."""
    args = ctx.args
    target = started.target
    run: dict = {"target": target.name, "kind": target.kind, "point": point.key,
                 **asdict(point), "repeat": repeat, "ok": False, "error": None}
    if not started.handle.alive():
        run["error"] = "the target is not running (it died at an earlier point)"
        return run
    if target.kind == "aiosmtpd":
        clear_spool(started.workdir / "spool")
    # A fresh target, or more sessions than it has seen: warm it up first. Otherwise
    # the previous point's run left it warm (and, relaying, with an empty queue).
    run["warmed_up"] = point.sessions > started.warm_sessions
    if run["warmed_up"]:
        why = warm_up(started, point, ctx)
        if why is not None:
            run["error"] = why
            run["log_tail"] = started.handle.log_tail()
            return run
    # Both generators stop at the deadline: loadgen starts no new message then,
    # smtp-source is stopped. The hard cap only ends a stuck run.
    messages = max_messages(point) if point.generator == "loadgen" else source_messages(point)
    run["messages"] = messages
    hard_cap = max(2 * args.run_seconds, args.run_seconds + 5)
    sink_base = ctx.sink.count()
    drops0 = listen_drops()
    irq0 = machine_interrupt_seconds()
    busy0, children0, self0 = (machine_busy_seconds(interrupts=False),
                               reaped_children_cpu_seconds(), self_cpu_seconds())
    sink_cpu0 = ctx.sink.cpu_seconds() if target.relays else 0.0
    wall0 = time.monotonic()
    sampler = RssSampler(started.pgid)
    cpu0 = started.cpu_seconds()
    if point.generator == "loadgen":
        result = run_loadgen(started.port, point, messages, pipelining=True,
                             duration=args.run_seconds, hard_cap=hard_cap, latencies=True)
        children_extra = 0.0
    else:
        count0 = started.accepted_count()
        result = sourcegen.run_source(HOST, started.port, point.sessions, messages, point.size,
                                      point.per_session, rcpt=RCPT, timeout_seconds=hard_cap,
                                      duration_seconds=args.run_seconds)
        # Reaped by os.wait4, not counted in RUSAGE_CHILDREN: subtract it by hand.
        children_extra = result["cpu_seconds"]
        if result["accepted_is_upper_bound"] and result["sent"]:
            # Stopped: its counter counts DATA commands. The server's own count is
            # exact: the sink's arrivals, the spool's files. At the stop, at most one
            # message per session was in flight.
            counted: int | None
            if target.relays:
                ctx.sink.wait_for(sink_base + max(result["sent"] - point.sessions, 0),
                                  result["started_monotonic"] + ARRIVAL_TIMEOUT_SECONDS)
                ctx.sink.wait_quiet(QUIET_SECONDS, 5.0)
                counted = ctx.sink.count() - sink_base
            else:
                time.sleep(QUIET_SECONDS)  # the last messages in flight land
                count1 = started.accepted_count()
                counted = (count1 - count0 if count0 is not None and count1 is not None
                           else None)
            if counted is not None:
                result["accepted"] = counted
                result["accepted_is_upper_bound"] = False
                result["accepted_per_second"] = counted / result["elapsed_seconds"]
    started_at = result["started_monotonic"]
    accepted = result["accepted"]
    arrival = None
    if target.relays and accepted:
        arrival = ctx.sink.wait_for(sink_base + accepted, started_at + ARRIVAL_TIMEOUT_SECONDS)
    cpu = started.cpu_seconds() - cpu0
    peak_rss = sampler.stop()
    now = time.monotonic()
    sink_cpu = (ctx.sink.cpu_seconds() - sink_cpu0) if target.relays else 0.0
    other = (machine_busy_seconds(interrupts=False) - busy0 - cpu - sink_cpu
             - (reaped_children_cpu_seconds() - children0) - children_extra
             - (self_cpu_seconds() - self0))
    drops1 = listen_drops()
    window = max(now - wall0, 1e-9)
    lat = result.pop("latencies_ms", None)
    run.update({
        "accepted": accepted,
        "accepted_is_upper_bound": result["accepted_is_upper_bound"],
        "ingest_per_second": result["accepted_per_second"],
        "elapsed_seconds": result["elapsed_seconds"],
        "latency_p50_ms": result["latency_p50_ms"], "latency_p99_ms": result["latency_p99_ms"],
        "latency_p999_ms": result["latency_p999_ms"], "latency_max_ms": result["latency_max_ms"],
        "latency_cdf_ms": quantiles(lat) if lat else None,
        "server_cpu_seconds": cpu,
        "cpu_seconds_per_1000": cpu / accepted * 1000 if accepted else None,
        "peak_rss_bytes": peak_rss,
        "client_cpu_share": result["cpu_seconds"] / max(result["elapsed_seconds"], 1e-9),
        "other_cpu_share": max(other, 0.0) / window,
        "interrupt_cpu_share": (machine_interrupt_seconds() - irq0) / window,
        "listen_drops": (drops1 - drops0) if drops0 is not None and drops1 is not None else None,
        "connections": result.get("connections"),
        "stopped_at_deadline": result.get("stopped_at_deadline", False),
        "unsent": result.get("unsent", 0),
        "given_back": result.get("given_back", 0),
        "timed_out": result["timed_out"],
        "rejected_by_code": result.get("rejected_by_code", {}),
        "errors_by_kind": result.get("errors_by_kind", {}),
        "first_errors": result.get("first_errors", []),
        "e2e_per_second": None, "e2e_seconds": None, "tail_seconds": None,
    })
    if target.relays:
        end = arrival if arrival is not None else now
        # Never shorter than the injection: a stopped smtp-source's count may have
        # arrived before the stop that ends its ingest window.
        end = max(end, started_at + result["elapsed_seconds"])
        arrived = min(ctx.sink.count() - sink_base, accepted)
        run["arrived"] = arrived
        run["e2e_seconds"] = end - started_at
        run["e2e_per_second"] = (accepted if arrival is not None else arrived) / max(end - started_at, 1e-9)
        run["tail_seconds"] = max(end - (started_at + result["elapsed_seconds"]), 0.0)
        ctx.sink.wait_quiet(QUIET_SECONDS, 5.0)
        run["extra_arrivals"] = max(ctx.sink.count() - sink_base - accepted, 0)
    if not started.handle.alive():
        run["error"] = "the target exited during the run"
    elif (result.get("exit_status") not in (None, 0) and not result["timed_out"]
          and not result["stopped_at_deadline"]):
        run["error"] = "smtp-source stopped: " + ("; ".join(run["first_errors"][:1])
                                                  or f"exit status {result['exit_status']}")
    elif accepted == 0 and (run["first_errors"] or run["rejected_by_code"]
                            or not result["stopped_at_deadline"]):
        run["error"] = "no message accepted: " + ("; ".join(run["first_errors"][:2])
                                                   or str(run["rejected_by_code"]))
    elif accepted == 0:
        # Nothing refused, nothing broken: the run's time passed before any message
        # got through (connects waiting on a full listen queue). A rate of 0 is the
        # measurement, not a failure.
        run["ok"] = True
        run["nothing_accepted"] = True
        if target.relays:
            run["e2e_per_second"] = 0.0
    elif target.relays and arrival is None:
        run["error"] = (f"only {run['arrived']} of {accepted} accepted messages arrived "
                        f"within {ARRIVAL_TIMEOUT_SECONDS:.0f}s")
    else:
        run["ok"] = True
    if not run["ok"]:
        run["log_tail"] = started.handle.log_tail()
    return run


def clear_spool(spool: Path) -> None:
    """aiosmtpd keeps every message (no next hop): empty its spool between points."""
    try:
        entries = list(os.scandir(spool))
    except OSError:
        return  # not created yet
    for entry in entries:
        try:
            os.unlink(entry.path)
        except OSError:
            continue  # being written right now: the next clear takes it


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
        "machine": machine_info(),
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
    return report.main_table_text(doc) + f"\n\nReport: {written['markdown']}", doc, ok


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


def machine_info() -> dict:
    import platform
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_at_end": os.getloadavg()}

