"""One measured --sweep run at one point on one started target.

A warm-up of `--warmup-seconds` with loadgen (pipelining as the point's generator
does it) when the target is fresh or sees more sessions than before; then the
measured load, `--run-seconds` long: loadgen starts no message after that soft
deadline, smtp-source (which has none) is stopped then and the target's own count
says what it accepted; then, for a target that relays, the wait until the common sink
has counted every accepted message. Around it: the target's CPU, its peak RSS
(sampled), the rest of the machine's CPU, listen-queue drops. The run is one flat
dict: ok, error and every figure (bench/README.md, "The figures").

Invariant: every wait is bounded (loadgen's soft deadline and hard cap, smtp-source's
cap, the arrival timeout); a target that died is a FAILED run, never an exception.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import sourcegen
from clients import run_loadgen
from peers import E2E_DOMAIN, CountingSink
from procs import HOST
from procstat import (listen_drops, machine_busy_seconds, machine_interrupt_seconds, reaped_children_cpu_seconds,
                      self_cpu_seconds, group_rss_bytes)
from sweep_grid import Point
from sweep_targets import Started

RCPT: Final = f"user@{E2E_DOMAIN}"
# Run sizing: at most this many messages (and body bytes) per run; smtp-source gets
# rate x run_seconds messages, at least MIN_MESSAGES (and one per session).
MIN_MESSAGES: Final = 20
MAX_MESSAGES: Final = 200_000
MAX_RUN_BYTES: Final = 512 * 1024**2  # body bytes per run: 512 x 1 MiB at most
ARRIVAL_TIMEOUT_SECONDS: Final = 60.0  # from the run's first connect to its last arrival
QUIET_SECONDS: Final = 0.3  # no arrival for this long: the run has settled
RSS_SAMPLE_SECONDS: Final = 0.1
# Latency CDF: the value at each of these quantiles, per run (nearest rank).
QUANTILES: Final = (0.001, 0.002, 0.005, *[i / 100 for i in range(1, 100)],
                    0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)


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


def sweep_loadgen(port: int, point: Point, messages: int, *, pipelining: bool,
                  duration: float, hard_cap: float, latencies: bool) -> dict:
    result = run_loadgen(port, sessions=point.sessions, messages=messages, size=point.size,
                         per_session=point.per_session, pipelining=pipelining, timeout_seconds=hard_cap,
                         quiet=True, rcpt=RCPT, duration_seconds=duration, latencies=latencies)
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
    result = sweep_loadgen(started.port, point, max_messages(point),
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
        result = sweep_loadgen(started.port, point, messages, pipelining=True,
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
