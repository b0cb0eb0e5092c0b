#!/usr/bin/env python3
"""Soak: hours of churn through a private mta; spool, RSS and fds must stay bounded.

Owns the soak procedure (issue 7): start a private mta (temp config, loopback only),
a counting next hop (peers.CountingSink) and a deferring next hop; offer a steady load
for --duration; every --interval seconds sample the spool's size on disk, the live
queue data, the RSS and open fds of every mta process and the message counts; then
judge every series and print a verdict table. Exit 0 when every series stayed
bounded, 1 when one did not (or the run itself failed), 130 when interrupted.

Churn, per second of the run (one "batch"): --rate messages through loadgen.run_load,
bodies of 1, 8, 32 and 100 KiB (55/25/15/5 %), --sessions connections per batch, 5
messages per connection. 1 - --defer-share of them go to user@soak.test, routed to
the counting sink; the rest to user@defer.test, routed to a second sink that answers
450 to every RCPT (`smtp-sink -r RCPT`; without smtp-sink, a closed port: refused,
deferred alike). Deferred recipients are retried after 15-60 s, and every
--delete-every seconds the soak deletes every defer.test message through the admin
API (POST /api/queue/delete {"domain": "defer.test"}). So the queue sees receive,
deliver, defer, retry and delete all the time. At most MAX_BATCHES_IN_FLIGHT batches
run at once: when mta falls behind, later batches are skipped and counted, never
queued up in the soak process.

The boundedness rule. Warm-up is the first 10 % of the run ("at 10%" in the table is
the first sample at or after it) and is never judged. For each series, with M the
median of the samples in the middle third of the run and L the median of those in
the last third, the series is bounded iff

    L <= M * 1.10 + slack

Medians, not maxima: fds and queue depth swing with the sessions and the deferred
backlog open at the instant of a sample; one burst must not fail a run, a rising
floor must. The slack is what may legitimately differ between two thirds:
  RSS of each process   8 MiB (allocator arenas; spool pages mapped by readers)
  fds of each process   8
  live data, messages   the deferred backlog between two deletes plus 2 s of traffic:
                        rate * (defer_share * delete_every + 2 s) [* mean body size]
  spool size on disk    16 MiB, and in addition the spool must satisfy
                        max(on disk) <= 4 * max(live data) + 64 MiB
                        (LMDB is copy-on-write: up to 2x for the old and new copy of
                        every page, up to 2x more for page rounding of bodies and
                        half-full B-tree leaves; 64 MiB for the freelist, the pages a
                        long reader pins and the file's growth steps).
A leak is caught once it grows by more than 10 % + slack over a third of the run: a
longer run catches a slower leak. An mta process replaced during the run (another pid
under the same title) fails its series: its history is cut, and a crash is a finding.
After the load stops, the queue must drain (every defer.test message deleted once
more) and the sink must have received every message accepted for soak.test.

Modules: soak_mta.py (mta and the deferring peer), soak_load.py (the churn),
soak_samples.py (what is sampled), soak_verdict.py (the rule); this file owns the
procedure and the command line.

Invariants: every process it starts is stopped before it exits (mta by its process
group: SIGTERM, then SIGKILL; the sinks by pid), on Ctrl-C too; every wait is
bounded; all traffic stays on 127.0.0.1 and [dns] points at a loopback port where
nothing listens; it restarts nothing, writes only its temp dir and --csv (created,
never overwritten), and deletes only its temp dir.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from peers import CountingSink
from procs import HOST, free_port, log, set_log_name
from soak_load import Churn, LoadTally
from soak_mta import DEFER_DOMAIN, SINK_DOMAIN, DeferPeer, Mta
from soak_samples import CsvOut, Sample, mib, progress_line, take_sample
from soak_verdict import (FDS_SLACK, GROWTH_TOLERANCE, MIN_SAMPLES_PER_THIRD, RSS_SLACK_BYTES, SPOOL_LIVE_FACTOR,
                          SPOOL_MAP_SLACK_BYTES, SPOOL_SLACK_BYTES, TRAFFIC_SLACK_SECONDS, WARMUP_SHARE,
                          render_verdicts, verdicts)

START_TIMEOUT_SECONDS: Final = 30.0
DRAIN_TIMEOUT_SECONDS: Final = 60.0
SMOKE_DURATION_SECONDS: Final = 60.0
SMOKE_INTERVAL_SECONDS: Final = 5.0
SMOKE_DELETE_EVERY_SECONDS: Final = 10.0


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1h30m' -> seconds."""
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smh]?)+", text.strip())
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 10m, 2h, got {text!r}")
    seconds = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smh]?)", text):
        seconds += float(number) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be > 0")
    return seconds


# ---------------------------------------------------------------------------
# The procedure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak a private mta with hours of churn (receive, deliver, defer, "
                    "delete); judge whether spool size, RSS and fds stay bounded.")
    p.add_argument("--duration", type=parse_duration, default=None, metavar="TIME",
                   help="length of the load: 90s, 10m, 2h, 1h30m (default 2h)")
    p.add_argument("--rate", type=float, default=300.0,
                   help="offered messages per second (default %(default)s)")
    p.add_argument("--interval", type=parse_duration, default=None, metavar="TIME",
                   help="seconds between samples (default 30)")
    p.add_argument("--csv", metavar="FILE", help="write every sample here (must not exist)")
    p.add_argument("--workers", type=int, default=2,
                   help="[server] inbound_workers (default %(default)s)")
    p.add_argument("--sessions", type=int, default=8,
                   help="concurrent SMTP sessions per one-second batch (default %(default)s)")
    p.add_argument("--defer-share", type=float, default=0.10,
                   help="share of messages to the deferring destination (default %(default)s)")
    p.add_argument("--delete-every", type=parse_duration, default=None, metavar="TIME",
                   help="delete defer.test's messages through the admin API this often "
                        "(default 60s; 10s with --smoke)")
    p.add_argument("--sink", choices=("auto", "smtp-sink", "python"), default="auto",
                   help="the counting next hop: Postfix's smtp-sink, bench/sink.py, or "
                        "the first if installed (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help=f"a CI-sized run: {SMOKE_DURATION_SECONDS:.0f}s, a sample every "
                        f"{SMOKE_INTERVAL_SECONDS:.0f}s")
    args = p.parse_args(argv)
    if args.smoke and args.duration is not None:
        p.error("--smoke runs 60 s; leave out --duration")
    if args.duration is None:
        args.duration = SMOKE_DURATION_SECONDS if args.smoke else 7200.0
    if args.interval is None:
        args.interval = SMOKE_INTERVAL_SECONDS if args.smoke else 30.0
    if args.delete_every is None:
        args.delete_every = SMOKE_DELETE_EVERY_SECONDS if args.smoke else 60.0
    if args.rate <= 0 or args.workers < 1 or args.sessions < 1:
        p.error("--rate must be > 0, --workers and --sessions >= 1")
    if not 0 <= args.defer_share < 1:
        p.error("--defer-share must be in [0, 1)")
    samples_per_third = args.duration / args.interval / 3
    if samples_per_third < MIN_SAMPLES_PER_THIRD:
        p.error(f"--duration / --interval gives {samples_per_third:.1f} samples per third of "
                f"the run; the verdict needs {MIN_SAMPLES_PER_THIRD}")
    if args.csv and os.path.exists(args.csv):
        p.error(f"--csv {args.csv} exists; soak never overwrites a file")
    return args


class Interrupted:
    """SIGINT/SIGTERM only set a flag; the main loop stops and cleans up."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            log(f"{signal.Signals(signum).name}: stopping the load and every process "
                f"(bounded; the verdict covers what ran)")
        self.signum = signum
        self.event.set()


def wait_drained(mta: Mta, timeout: float) -> tuple[float | None, float | None, float, int]:
    """After the load: delete defer.test once more, wait (bounded) for an empty queue.
    Returns (queue messages, live bytes, seconds waited, messages deleted)."""
    started = time.monotonic()
    deadline = started + timeout
    messages = live = None
    deleted = 0
    while time.monotonic() < deadline:
        result = mta.delete_domain(DEFER_DOMAIN)  # again: deferrals that raced the last one
        deleted += result if isinstance(result, int) else 0
        metrics = mta.scrape() or {}
        messages = metrics.get("mta_queue_messages")
        live = metrics.get("mta_queue_stored_bytes")
        if messages == 0:
            break
        time.sleep(1.0)
    return messages, live, time.monotonic() - started, deleted


def soak(args: argparse.Namespace, workdir: Path, stop: Interrupted, out: CsvOut
         ) -> tuple[list[str], bool]:
    """The run itself: (report lines after the table, whether the run worked)."""
    notes: list[str] = []
    sink = defer = mta = churn = None
    try:
        sink = CountingSink(args.sink, free_port(), workdir)
        defer = DeferPeer(workdir)
        for what, why in (("counting sink", sink.wait_ready(START_TIMEOUT_SECONDS)),
                          ("deferring peer", defer.wait_ready(START_TIMEOUT_SECONDS))):
            if why is not None:
                return [f"{what} failed to start: {why}"], False
        mta = Mta(workdir, args.workers, sink.port, defer.port)
        log(f"mta on {HOST}:{mta.port} (control {HOST}:{mta.control_port}, {args.workers} "
            f"inbound workers, spool {mta.spool}); {SINK_DOMAIN} -> {sink.kind} on "
            f"{HOST}:{sink.port}; {DEFER_DOMAIN} -> {defer.kind} on {HOST}:{defer.port}")
        why = mta.wait_ready(START_TIMEOUT_SECONDS, stop.event)
        if why is not None:
            return [f"mta failed to start: {why}", "```", mta.stderr_tail(), "```"], False
        log(f"load: {args.rate:g} msg/s for {args.duration:.0f}s, {args.sessions} sessions per "
            f"batch, {1 - args.defer_share:.0%} to {SINK_DOMAIN}, {args.defer_share:.0%} to "
            f"{DEFER_DOMAIN} (deleted every {args.delete_every:.0f}s); a sample every "
            f"{args.interval:.0f}s")
        churn = Churn(mta.port, args.rate, args.sessions, args.defer_share)
        started = time.monotonic()
        churn.start()
        samples: list[Sample] = []
        deleted = 0
        delete_failures: list[str] = []
        # Deletes fall half an interval after a sample: a sample never races a delete,
        # and the samples do not all see the same phase of the deferred backlog.
        next_sample, next_delete = args.interval, args.delete_every + args.interval / 2
        while True:
            now = time.monotonic() - started
            if now >= next_delete and next_delete < args.duration:
                result = mta.delete_domain(DEFER_DOMAIN)
                if isinstance(result, int):
                    deleted += result
                else:
                    delete_failures.append(result)
                next_delete += args.delete_every
            if now >= next_sample:
                s = take_sample(now, mta, churn, sink, deleted)
                samples.append(s)
                out.write(s)
                log(progress_line(s, args.duration))
                next_sample += args.interval
                if next_sample > args.duration + 1e-6:
                    break
            if not mta.alive():
                notes.append(f"mta exited with status {mta.proc.returncode} during the run")
                notes += ["```", mta.stderr_tail(), "```"]
                break
            if churn.failure is not None or stop.event.is_set():
                break
            stop.event.wait(max(0.0, min(next_sample, next_delete) - (time.monotonic() - started)))
        churn.stop()
        ok = True
        if churn.failure is not None:
            notes.append(f"the load generator failed: {churn.failure!r}")
            ok = False
        if notes and not mta.alive():
            ok = False
        tally = churn.snapshot()
        drained = None
        if mta.alive() and not stop.event.is_set():
            log("load stopped; deleting defer.test once more and waiting for the queue to drain")
            drained = wait_drained(mta, DRAIN_TIMEOUT_SECONDS)
            deleted += drained[3]
            sink.wait_quiet(1.0, 10.0)
        delivered = sink.count()
        span = samples[-1].elapsed if samples else 0.0
        rows = verdicts(samples, span, args) if samples else []
        ok = ok and bool(rows) and all(v.ok for v in rows)
        notes[:0] = summary_lines(args, tally, churn.stopped - churn.started, delivered,
                                  deleted, delete_failures, samples, drained, defer)
        if drained is not None and drained[0] == 0 \
                and delivered < tally.accepted_by_domain[SINK_DOMAIN]:
            notes.append(f"**LOST**: {tally.accepted_by_domain[SINK_DOMAIN] - delivered} "
                         f"message(s) accepted for {SINK_DOMAIN} never reached the sink, "
                         f"though the queue is empty")
            ok = False
        if drained is not None and drained[0] != 0:
            notes.append(f"**the queue did not drain** within {DRAIN_TIMEOUT_SECONDS:.0f}s "
                         f"after the load: {drained[0]} message(s) left")
            ok = False
        if tally.accepted == 0:
            notes.append("no message was accepted: the run measured nothing")
            ok = False
        table = render_verdicts(rows) if rows else "(no samples)"
        return [table, "", *notes], ok
    finally:
        if churn is not None and churn.thread.is_alive():
            churn.stop()
        for what, peer in (("mta", mta), ("counting sink", sink), ("deferring peer", defer)):
            if peer is not None:
                peer.stop()


def summary_lines(args: argparse.Namespace, t: LoadTally, span: float, delivered: int,
                  deleted: int, delete_failures: list[str], samples: list[Sample],
                  drained: tuple[float | None, float | None, float, int] | None,
                  defer: DeferPeer) -> list[str]:
    lines = [f"load over {span:.0f}s: offered {t.offered}, skipped {t.skipped} (mta behind), "
             f"sent {t.sent}, accepted {t.accepted} ({t.accepted / max(span, 1e-9):.0f} msg/s; "
             f"{t.accepted_by_domain[SINK_DOMAIN]} for {SINK_DOMAIN}, "
             f"{t.accepted_by_domain[DEFER_DOMAIN]} for {DEFER_DOMAIN}), rejected "
             f"{t.rejected}, errors {t.errors}"
             + (f" ({', '.join(f'{k}: {n}' for k, n in t.problems.most_common(5))})"
                if t.problems else "")]
    if t.first_errors:
        lines.append(f"first errors: {'; '.join(t.first_errors[:3])}")
    extra = delivered - t.accepted_by_domain[SINK_DOMAIN]
    lines.append(f"delivered at the sink: {delivered}"
                 + (f" ({extra} more arrivals than messages accepted for {SINK_DOMAIN}: "
                    f"duplicates; mta delivers at least once)" if extra > 0 else "")
                 + f"; deleted through the admin API: "
                 f"{deleted} ({DEFER_DOMAIN}, {defer.kind})"
                 + (f"; {len(delete_failures)} delete call(s) failed, e.g. "
                    f"{delete_failures[0]}" if delete_failures else ""))
    if drained is not None:
        messages, live, waited, _ = drained
        lines.append(f"after the load: queue {'-' if messages is None else f'{messages:.0f}'} "
                     f"messages, {'-' if live is None else mib(live)} live data after "
                     f"{waited:.0f}s; spool on disk at the end of the load "
                     f"{mib(samples[-1].spool_disk_bytes) if samples else '-'}")
    lines.append(f"rule: after a {WARMUP_SHARE:.0%} warm-up, median of the last third ≤ "
                 f"median of the middle third x {1 + GROWTH_TOLERANCE:.2f} + slack "
                 f"(RSS {mib(RSS_SLACK_BYTES)}, fds {FDS_SLACK}, spool "
                 f"{mib(SPOOL_SLACK_BYTES)}, live data / messages: "
                 f"{args.defer_share * args.delete_every + TRAFFIC_SLACK_SECONDS:.0f} s of "
                 f"offered traffic); spool max ≤ {SPOOL_LIVE_FACTOR} x max live + "
                 f"{mib(SPOOL_MAP_SLACK_BYTES)}; a replaced process fails its series")
    return lines


def main(argv: list[str] | None = None) -> int:
    set_log_name("soak")
    args = parse_args(argv)
    stop = Interrupted()
    out = CsvOut(args.csv)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mta-soak-"))
    try:
        lines, ok = soak(args, workdir, stop, out)
    finally:
        out.close()
        shutil.rmtree(workdir, ignore_errors=True)  # ours alone: mkdtemp made it
    print(f"mta soak: {args.duration:.0f}s at {args.rate:g} msg/s offered, {args.workers} "
          f"inbound workers, 1 delivery worker, a sample every {args.interval:.0f}s; "
          f"{os.cpu_count()} CPUs\n")
    print("\n".join(lines))
    log(f"done in {time.monotonic() - began:.0f}s"
        + (f"; samples in {args.csv}" if args.csv else ""))
    if stop.signum is not None:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
