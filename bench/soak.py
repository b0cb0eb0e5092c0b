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

Invariants: every process it starts is stopped before it exits (mta by its process
group: SIGTERM, then SIGKILL; the sinks by pid), on Ctrl-C too; every wait is
bounded; all traffic stays on 127.0.0.1 and [dns] points at a loopback port where
nothing listens; it restarts nothing, writes only its temp dir and --csv (created,
never overwritten), and deletes only its temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Final, TextIO

from loadgen import run_load
from peers import CountingSink
from procstat import group_titles

try:
    import uvloop
except ImportError:  # the stdlib loop works, only slower
    uvloop = None  # type: ignore[assignment]

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
HOST: Final = "127.0.0.1"
SMTP_SINK: Final = Path("/usr/sbin/smtp-sink")
SINK_DOMAIN: Final = "soak.test"
DEFER_DOMAIN: Final = "defer.test"
SENDER: Final = "soak@client.test"
SIZE_MIX: Final = ((1024, 0.55), (8 * 1024, 0.25), (32 * 1024, 0.15), (100 * 1024, 0.05))
MEAN_SIZE_BYTES: Final = sum(size * share for size, share in SIZE_MIX)
BATCH_SECONDS: Final = 1.0
PER_SESSION: Final = 5
MAX_BATCHES_IN_FLIGHT: Final = 3
LOAD_TIMEOUT_SECONDS: Final = 30.0  # one run_load call, from first connect to last reply
IO_TIMEOUT_SECONDS: Final = 20.0
START_TIMEOUT_SECONDS: Final = 30.0
STOP_GRACE_SECONDS: Final = 15.0  # above the config's drain_timeout_seconds
HTTP_TIMEOUT_SECONDS: Final = 10.0
DRAIN_TIMEOUT_SECONDS: Final = 60.0
MIN_SAMPLES_PER_THIRD: Final = 3
SMOKE_DURATION_SECONDS: Final = 60.0
SMOKE_INTERVAL_SECONDS: Final = 5.0
SMOKE_DELETE_EVERY_SECONDS: Final = 10.0

# The boundedness rule (module header).
WARMUP_SHARE: Final = 0.10
GROWTH_TOLERANCE: Final = 0.10
RSS_SLACK_BYTES: Final = 8 * 1024**2
FDS_SLACK: Final = 8
SPOOL_SLACK_BYTES: Final = 16 * 1024**2
SPOOL_LIVE_FACTOR: Final = 4
SPOOL_MAP_SLACK_BYTES: Final = 64 * 1024**2
TRAFFIC_SLACK_SECONDS: Final = 2.0

SPOOL_FILES: Final = ("data.mdb", "lock.mdb")
TITLE: Final = re.compile(r"mta: (\w+(?:#\d+)?)(?: gen\d+)?$")
METRIC_LINE: Final = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)")

MTA_CONFIG_TEMPLATE: Final = """\
# Written by bench/soak.py for one soak run; private instance.
[server]
hostname = "mta.soak"
inbound_workers = {inbound_workers}
drain_timeout_seconds = 5

[[listener]]
address = "{host}:{port}"
mode = "smtp"

[queue]
path = "{spool}"
max_size_bytes = 4294967296

[limits]
max_connections_per_ip = 1000000

[relay]
relay_domains = ["{sink_domain}", "{defer_domain}"]

[delivery]
workers = 1
min_backoff_seconds = 15
max_backoff_seconds = 60

[domains."{sink_domain}"]
concurrency = 20

[routes]
"{sink_domain}" = "{host}:{sink_port}"
"{defer_domain}" = "{host}:{defer_port}"

[dns]
nameservers = ["{host}:{dns_port}"]
timeout_seconds = 1

[control]
listen = "{host}:{control_port}"
metrics_dir = "{metrics_dir}"

[local]
maildir_root = "{maildir_root}"

[cache]
path = "{cache}"
"""


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def greets(port: int, timeout: float = 1.0) -> bool:
    """True if 127.0.0.1:port answers with a 220 greeting (then we QUIT)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            ok = s.recv(512).startswith(b"220")
            if ok:
                s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


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


def mib(value: float) -> str:
    return f"{value / 1024**2:.1f} MiB"


# ---------------------------------------------------------------------------
# The processes: mta, the deferring peer (the counting sink is peers.CountingSink)


class Mta:
    """`python3 -m mta serve -c CONFIG` in its own session; stopped by process group."""

    def __init__(self, workdir: Path, workers: int, sink_port: int, defer_port: int):
        self.port = free_port()
        self.control_port = free_port()
        self.spool = workdir / "spool"
        self.workers = workers
        self.config = workdir / "mta.toml"
        self.stderr_path = workdir / "mta.stderr"
        self.config.write_text(MTA_CONFIG_TEMPLATE.format(
            host=HOST, port=self.port, spool=self.spool, inbound_workers=workers,
            sink_domain=SINK_DOMAIN, defer_domain=DEFER_DOMAIN, sink_port=sink_port,
            defer_port=defer_port, dns_port=free_port(), control_port=self.control_port,
            metrics_dir=workdir / "metrics", maildir_root=workdir / "mail",
            cache=workdir / "cache"))
        env = dict(os.environ)
        paths = [str(REPO_ROOT), str(REPO_ROOT / "queue")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # mta serve sets it from metrics_dir
        # No proxy for our own loopback HTTP (urllib honours *_proxy variables).
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with open(workdir / "mta.stdout", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mta", "serve", "-c", str(self.config)], cwd=REPO_ROOT,
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True)

    def expected_titles(self) -> set[str]:
        return {"master", "scheduler#1", "delivery#1", "control#1",
                *(f"inbound#{n}" for n in range(1, self.workers + 1))}

    def processes(self) -> dict[str, int]:
        """Title (without the generation) -> pid, for every mta process of the group."""
        found = {}
        for pid, raw in group_titles(self.proc.pid).items():
            match = TITLE.match(raw.decode(errors="replace"))
            if match:
                found[match.group(1)] = pid
        return found

    def wait_ready(self, timeout: float, stop: threading.Event) -> str | None:
        """None once it greets, serves /metrics and runs every expected process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop.is_set():
                return "interrupted while starting"
            if self.proc.poll() is not None:
                return f"mta exited with status {self.proc.returncode} while starting"
            if (greets(self.port) and self.expected_titles() <= set(self.processes())
                    and self.scrape() is not None):
                return None
            time.sleep(0.2)
        return (f"not ready within {timeout:.0f}s (greeting on {HOST}:{self.port}, /metrics "
                f"on {HOST}:{self.control_port}, processes {sorted(self.expected_titles())})")

    def scrape(self) -> dict[str, float] | None:
        """name or name{labels} -> value from /metrics; None if it does not answer."""
        try:
            with self._http.open(f"http://{HOST}:{self.control_port}/metrics",
                                 timeout=HTTP_TIMEOUT_SECONDS) as answer:
                text = answer.read().decode(errors="replace")
        except (OSError, urllib.error.URLError):
            return None
        values = {}
        for line in text.splitlines():
            match = METRIC_LINE.match(line)
            if match:
                try:
                    values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
                except ValueError:
                    continue  # not a sample line
        return values

    def delete_domain(self, domain: str) -> int | str:
        """POST /api/queue/delete {"domain": ...}: the count deleted, or why it failed."""
        request = urllib.request.Request(
            f"http://{HOST}:{self.control_port}/api/queue/delete", method="POST",
            data=json.dumps({"domain": domain}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with self._http.open(request, timeout=HTTP_TIMEOUT_SECONDS) as answer:
                return int(json.loads(answer.read())["count"])
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}: {exc.read()[:200]!r}"
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            return repr(exc)

    def spool_bytes(self) -> tuple[int, int]:
        """(on disk: st_blocks * 512, apparent: st_size) of the LMDB files, summed."""
        disk = apparent = 0
        for name in SPOOL_FILES:
            try:
                st = os.stat(self.spool / name)
            except FileNotFoundError:
                continue
            disk += st.st_blocks * 512
            apparent += st.st_size
        return disk, apparent

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group (the master drains), SIGKILL what is left."""
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            log(f"mta still running {STOP_GRACE_SECONDS:.0f}s after SIGTERM; SIGKILL")
        signal_group(pgid, signal.SIGKILL)  # workers that outlived the master
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            log(f"mta pid {pgid} did not exit after SIGKILL")

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(cannot read {self.stderr_path}: {exc})"


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone: that is the goal


class DeferPeer:
    """The next hop of defer.test: smtp-sink answering 450 to every RCPT, or, without
    smtp-sink, a port where nothing listens (connection refused: deferred as well)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        if not SMTP_SINK.exists():
            self.kind = "closed port (connection refused)"
            return
        argv = [str(SMTP_SINK), *(["-u", "nobody"] if os.geteuid() == 0 else []),
                "-r", "RCPT", f"{HOST}:{self.port}", "256"]
        with open(workdir / "defer-sink.stderr", "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        self.kind = "smtp-sink -r RCPT (450 to every RCPT)"

    def wait_ready(self, timeout: float) -> str | None:
        if self.proc is None:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"smtp-sink exited with status {self.proc.returncode}"
            if greets(self.port):
                return None
            time.sleep(0.05)
        return f"smtp-sink: no greeting on {HOST}:{self.port} within {timeout:.0f}s"

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
        log(f"smtp-sink pid {self.proc.pid} did not exit after SIGKILL")


# ---------------------------------------------------------------------------
# The churn: a steady offered load, one batch per second, in its own thread


@dataclass
class LoadTally:
    offered: int = 0
    skipped: int = 0  # offered while MAX_BATCHES_IN_FLIGHT were still running
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    accepted_by_domain: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)  # rejected codes, error kinds
    first_errors: list[str] = field(default_factory=list)


class Churn:
    """Offers `rate` messages per second to mta until stopped; thread-safe tallies."""

    def __init__(self, port: int, rate: float, sessions: int, defer_share: float):
        self.port = port
        self.sessions = sessions
        self.tally = LoadTally()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.failure: BaseException | None = None
        self.started = self.stopped = 0.0  # time.monotonic() of the first and last batch
        # (size, rcpt) -> messages per batch, fractional; credit carries the remainder.
        self.classes = {}
        for size, share in SIZE_MIX:
            for domain, dshare in ((SINK_DOMAIN, 1 - defer_share), (DEFER_DOMAIN, defer_share)):
                if share * dshare > 0:
                    self.classes[(size, f"user@{domain}")] = rate * BATCH_SECONDS * share * dshare
        self.credit = dict.fromkeys(self.classes, 0.0)
        self.thread = threading.Thread(target=self._run, name="soak-churn", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop offering; wait (bounded) for the batches in flight."""
        self.stop_event.set()
        self.thread.join(LOAD_TIMEOUT_SECONDS + IO_TIMEOUT_SECONDS + 10)
        if self.thread.is_alive():
            log("the load thread did not finish in time; its sessions die with the process")

    def snapshot(self) -> LoadTally:
        with self.lock:
            return LoadTally(**{k: (v.copy() if hasattr(v, "copy") else v)
                                for k, v in vars(self.tally).items()})

    def _run(self) -> None:
        self.started = time.monotonic()
        try:
            if uvloop is not None:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    runner.run(self._pace())
            else:
                asyncio.run(self._pace())
        except BaseException as exc:  # a bug here: the main thread reports it and stops
            self.failure = exc
            self.stop_event.set()
        finally:
            self.stopped = time.monotonic()

    def _plan(self) -> list[tuple[int, str, int]]:
        plan = []
        for key, per_batch in self.classes.items():
            self.credit[key] += per_batch
            n = int(self.credit[key])
            self.credit[key] -= n
            if n:
                plan.append((*key, n))
        return plan

    async def _pace(self) -> None:
        in_flight: set[asyncio.Task] = set()
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            plan = self._plan()
            total = sum(n for _, _, n in plan)
            for task in [t for t in in_flight if t.done()]:
                in_flight.discard(task)
                task.result()  # a bug in a batch surfaces here
            with self.lock:
                self.tally.offered += total
                if len(in_flight) >= MAX_BATCHES_IN_FLIGHT:
                    self.tally.skipped += total
                    plan = []
            if plan:
                in_flight.add(asyncio.create_task(self._batch(plan, total)))
            next_at += BATCH_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if in_flight:
            # run_load bounds each call by LOAD_TIMEOUT_SECONDS; this is a second fence.
            done, pending = await asyncio.wait(in_flight, timeout=LOAD_TIMEOUT_SECONDS + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()

    async def _batch(self, plan: list[tuple[int, str, int]], total: int) -> None:
        calls = [run_load(HOST, self.port, max(1, min(n, round(self.sessions * n / total))),
                          n, size, PER_SESSION, sender=SENDER, rcpt=rcpt,
                          timeout_seconds=LOAD_TIMEOUT_SECONDS,
                          io_timeout_seconds=IO_TIMEOUT_SECONDS, ehlo_name="client.test")
                 for size, rcpt, n in plan]
        results = await asyncio.gather(*calls)
        with self.lock:
            t = self.tally
            for (_, rcpt, _), r in zip(plan, results):
                t.sent += r.sent
                t.accepted += r.accepted
                t.rejected += r.rejected
                t.errors += r.errors
                t.accepted_by_domain[rcpt.split("@", 1)[1]] += r.accepted
                t.problems.update(r.rejected_by_code)
                t.problems.update(r.errors_by_kind)
                t.first_errors.extend(r.first_errors[:max(0, 5 - len(t.first_errors))])


# ---------------------------------------------------------------------------
# Samples


@dataclass
class ProcSample:
    pid: int
    rss_bytes: int
    rss_anon_bytes: int
    fds: int


@dataclass
class Sample:
    elapsed: float
    load: LoadTally
    delivered: int
    deleted: int
    spool_disk_bytes: int
    spool_apparent_bytes: int
    live_bytes: float | None
    queue_messages: float | None
    deferred_recipients: float | None
    procs: dict[str, ProcSample]


def read_proc(pid: int) -> ProcSample | None:
    """VmRSS, RssAnon (/proc/PID/status) and open fds of one process; None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"VmRSS", b"RssAnon"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    if b"VmRSS" not in fields:
        return None  # a zombie has no memory left
    return ProcSample(pid, fields[b"VmRSS"], fields.get(b"RssAnon", 0), fds)


def take_sample(elapsed: float, mta: Mta, churn: Churn, sink: CountingSink,
                deleted: int) -> Sample:
    procs = {}
    for title, pid in sorted(mta.processes().items()):
        read = read_proc(pid)
        if read is not None:
            procs[title] = read
    metrics = mta.scrape() or {}
    disk, apparent = mta.spool_bytes()
    return Sample(elapsed=elapsed, load=churn.snapshot(), delivered=sink.count(),
                  deleted=deleted, spool_disk_bytes=disk, spool_apparent_bytes=apparent,
                  live_bytes=metrics.get("mta_queue_stored_bytes"),
                  queue_messages=metrics.get("mta_queue_messages"),
                  deferred_recipients=metrics.get('mta_queue_recipients{state="deferred"}'),
                  procs=procs)


def progress_line(s: Sample, duration: float) -> str:
    rss = sum(p.rss_bytes for p in s.procs.values())
    fds = sum(p.fds for p in s.procs.values())
    fmt_num = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    return (f"{s.elapsed:6.0f}s/{duration:.0f}s sent={s.load.sent} accepted={s.load.accepted} "
            f"rejected={s.load.rejected} errors={s.load.errors} skipped={s.load.skipped} "
            f"delivered={s.delivered} deleted={s.deleted} queue={fmt_num(s.queue_messages)} "
            f"deferred={fmt_num(s.deferred_recipients)} "
            f"live={'-' if s.live_bytes is None else mib(s.live_bytes)} "
            f"spool={mib(s.spool_disk_bytes)} rss={mib(rss)} fds={fds} "
            f"procs={len(s.procs)}")


class CsvOut:
    """One row per sample, flushed at once; the columns are fixed by the first sample."""

    COMMON = ("elapsed_seconds", "offered", "skipped", "sent", "accepted", "rejected",
              "errors", "delivered", "deleted", "queue_messages", "deferred_recipients",
              "live_bytes", "spool_disk_bytes", "spool_apparent_bytes")

    def __init__(self, path: str | None):
        # "x": an existing file is the operator's; never overwrite it.
        self.file: TextIO | None = open(path, "x", newline="") if path else None
        self.writer = csv.writer(self.file) if self.file else None
        self.titles: list[str] | None = None

    def write(self, s: Sample) -> None:
        if self.writer is None:
            return
        if self.titles is None:
            self.titles = list(s.procs)
            self.writer.writerow([*self.COMMON, *(f"{col}:{t}" for t in self.titles
                                                  for col in ("pid", "rss_bytes",
                                                              "rss_anon_bytes", "fds"))])
        row = [f"{s.elapsed:.1f}", s.load.offered, s.load.skipped, s.load.sent,
               s.load.accepted, s.load.rejected, s.load.errors, s.delivered, s.deleted,
               s.queue_messages, s.deferred_recipients, s.live_bytes, s.spool_disk_bytes,
               s.spool_apparent_bytes]
        for t in self.titles:
            p = s.procs.get(t)
            row += [p.pid, p.rss_bytes, p.rss_anon_bytes, p.fds] if p else ["", "", "", ""]
        self.writer.writerow(["" if v is None else v for v in row])
        assert self.file is not None  # a writer exists only with its file
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------
# The verdict


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
