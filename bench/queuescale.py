"""bench/run --queue-scale N[,N...]: mta with a queue of N deferred messages.

For each N (after a reference run on an empty queue, same configuration, same
invocation): the spool is filled with N deferred 1 KiB messages for one destination
(bench/queuefill.py, straight into LMDB with the server stopped: SMTP would take hours
at a million), then mta is started on it and measured:

- restart: `mta serve` start -> first 220 greeting, -> the scheduler's `ready` log
  event (its own timestamp), -> the first arrival at the sink of the --due-at-start
  messages whose retry time has come (the first dispatch);
- RssAnon (/proc/PID/status) of every mta process once those arrived, and again after
  --idle-seconds of idle; CPU of every process over that idle window (schedstat);
- the operator's views: `mta queue list --limit 100`, `GET /api/queue?limit=100`,
  `mta queue shape`, wall time each ("n/a (not built yet)" where this checkout's mta
  has no such flag or command, or its API answers no page);
- ingest: loadgen's run (--messages, --sessions, --size as bench/run's other modes) to
  another domain routed to the same sink: accepted msg/s against the reference's;
- drain: the destination "comes back" (the sink accepts it all along; the messages are
  simply not due): `mta queue retry --domain scale.test`, then the time until every one
  of the N arrived, counted by distinct X-Bench-Fill values at the sink (bench/sink.py
  --ids), every one exactly once; msg/s against the reference's end-to-end rate.

mta here: as --e2e's (one counting sink as the route of both domains, concurrency 20,
a dead [dns]), plus [control] on a free port with a token of this run and [queue]
max_size_bytes sized for N. Everything runs on loopback and is stopped before return.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from clients import loadgen_run, run_json
from mtaconf import QUEUE_MAX_SIZE_BYTES, dead_dns, mta_launch, write_config
from peers import E2E_DOMAIN, CountingSink
from procs import BENCH_DIR, HOST, REPO_ROOT, Launch, Server, free_port, log, tail, wait_greeting
from procstat import (machine_busy_seconds, mta_processes, read_proc, reaped_children_cpu_seconds,
                      threads_runtime_seconds)
from queuescale_report import render_report

SCALE_DOMAIN: Final = "scale.test"
FILL_HEADER: Final = "X-Bench-Fill"
FILL_TOOL: Final = BENCH_DIR / "queuefill.py"
INGEST_RCPT: Final = f"user@{E2E_DOMAIN}"
VIEW_LIMIT: Final = 100
CLI_TIMEOUT_SECONDS: Final = 600.0
STOP_GRACE_SECONDS: Final = 30.0  # a scheduler holding a large queue takes a while to stop
SCHEDULER_READY: Final = re.compile(r"^ts=(\S+) proc=scheduler\S* pid=\d+ event=ready(?: |$)(.*)")
PROGRESS_SECONDS: Final = 5.0


def spool_room(messages: int, size: int) -> int:
    """[queue] max_size_bytes for `messages` of `size` body bytes: 3x their data (headers
    and envelope are under 1 KiB), at least bench/run's usual 4 GiB."""
    return max(QUEUE_MAX_SIZE_BYTES, 3 * messages * (size + 1024))


def scale_config(workdir: Path, port: int, control_port: int, token: str, room: int,
                 args: argparse.Namespace) -> Path:
    """mta relaying scale.test and e2e.test to the sink, [control] on its own port, a
    spool of `room` bytes."""
    return write_config(
        workdir, port, args.mta_worker_list[0], relay={"relay_domains": [SCALE_DOMAIN, E2E_DOMAIN]},
        delivery={"workers": args.delivery_workers},
        queue={"path": str(workdir / "spool"), "max_size_bytes": room},
        control={"listen": f"{HOST}:{control_port}", "metrics_dir": str(workdir / "metrics"), "token": token},
        routes={SCALE_DOMAIN: f"{HOST}:{args.sink_port}", E2E_DOMAIN: f"{HOST}:{args.sink_port}"},
        dns=dead_dns(), **{f'domains."{d}"': {"concurrency": 20} for d in (SCALE_DOMAIN, E2E_DOMAIN)})


class ScaleMta:
    """One mta under test: its config, its start, its CLI and admin API, its processes."""

    def __init__(self, workdir: Path, messages: int, args: argparse.Namespace):
        self.workdir = workdir
        self.port, self.control_port = free_port(), free_port()
        self.token = secrets.token_urlsafe(24)
        self.spool, self.room = workdir / "spool", spool_room(messages, args.size)
        self.config = scale_config(workdir, self.port, self.control_port, self.token, self.room, args)
        self.launch: Launch = mta_launch(self.config, args.mta_worker_list[0])
        self.launch.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # mta serve sets it from metrics_dir
        self.server: Server | None = None
        self.spawned_wall = self.spawned = 0.0

    def start(self) -> None:
        """`mta serve` (again: the last run's log is kept as server.stderr.N)."""
        if self.server is not None:
            kept = len(list(self.workdir.glob("server.stderr*")))
            self.server.stderr_path.rename(self.server.stderr_path.with_name(f"server.stderr.{kept}"))
        self.spawned_wall, self.spawned = time.time(), time.monotonic()
        self.server = Server("mta", self.launch, self.workdir, self.port, stop_grace_seconds=STOP_GRACE_SECONDS)

    def wait_greeting(self, timeout: float) -> float | None:
        """Seconds from start to the first 220; None (and why, logged) if none came."""
        assert self.server is not None
        why = wait_greeting(self.port, timeout, self.server.proc, poll_seconds=0.02)
        if why is not None:
            log(f"mta: {why}")
            return None
        return time.monotonic() - self.spawned

    def wait_scheduler_ready(self, timeout: float) -> tuple[float | None, str]:
        """Seconds from start to the scheduler's `ready` event (by the event's own
        timestamp) and the event's fields; None if it was not logged in time."""
        assert self.server is not None
        deadline, offset = time.monotonic() + timeout, 0
        while time.monotonic() < deadline and self.server.alive():
            with open(self.server.stderr_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                found = SCHEDULER_READY.match(line)
                if found:
                    stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S.%fZ")
                    at = stamp.replace(tzinfo=datetime.UTC).timestamp()
                    return at - self.spawned_wall, found.group(2)
            time.sleep(0.05)
        return None, ""

    def server_cpu(self) -> float:
        """CPU seconds of mta's whole process group so far."""
        return self.server.cpu_seconds() if self.server is not None else 0.0

    def processes(self) -> dict[str, int]:
        assert self.server is not None
        return mta_processes(self.server.proc.pid)

    def cli(self, *argv: str) -> dict:
        """`mta ARGV -c CONFIG` as an operator runs it: wall time, status, output size."""
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "mta", *argv, "-c", str(self.config)], cwd=REPO_ROOT,
                              env=self.launch.env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=CLI_TIMEOUT_SECONDS, check=False)
        return {"command": "mta " + " ".join(argv), "seconds": time.monotonic() - started,
                "status": done.returncode, "stdout_lines": done.stdout.count(b"\n"),
                "stdout_bytes": len(done.stdout), "stderr_tail": done.stderr.decode(errors="replace")[-300:]}

    def cli_offers(self, needle: str, *argv: str) -> bool:
        """Whether `mta ARGV --help` mentions `needle` (a flag or a subcommand)."""
        done = subprocess.run([sys.executable, "-m", "mta", *argv, "--help"], cwd=REPO_ROOT, env=self.launch.env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
        return needle in done.stdout.decode(errors="replace")

    def api_get(self, path: str) -> dict:
        """One admin API GET: wall time, status, and the answer's form ("page": a dict with
        `messages`, as issue 15's paging API answers; "list": today's whole listing)."""
        started = time.monotonic()
        conn = http.client.HTTPConnection(HOST, self.control_port, timeout=CLI_TIMEOUT_SECONDS)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
        seconds = time.monotonic() - started
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        form = ("page" if isinstance(doc, dict) and "messages" in doc else
                "list" if isinstance(doc, list) else "other")
        count = len(doc["messages"]) if form == "page" else len(doc) if form == "list" else None
        return {"command": f"GET {path}", "seconds": seconds, "status": status, "form": form,
                "messages": count, "bytes": len(body)}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def sample_processes(mta: ScaleMta) -> dict[str, dict]:
    """RssAnon and CPU run time (all threads, ns precision) of every mta process."""
    out = {}
    for title, pid in sorted(mta.processes().items()):
        proc = read_proc(pid)
        if proc is not None:
            out[title] = {"pid": pid, "rss_anon_bytes": proc.rss_anon_bytes, "rss_bytes": proc.rss_bytes,
                          "cpu_seconds": threads_runtime_seconds(pid)}
    return out


def idle_window(mta: ScaleMta, seconds: float) -> dict:
    """Nothing offered, nothing due: each process's share of a core over `seconds`, and
    the machine's other work meanwhile (a busy machine is noted, not hidden)."""
    before, busy0, wall0 = sample_processes(mta), machine_busy_seconds(interrupts=False), time.monotonic()
    time.sleep(seconds)
    after, busy1, wall = sample_processes(mta), machine_busy_seconds(interrupts=False), time.monotonic() - wall0
    cpu = {t: max(after[t]["cpu_seconds"] - before[t]["cpu_seconds"], 0.0) / wall
           for t in after if t in before and after[t]["pid"] == before[t]["pid"]}
    return {"seconds": wall, "cpu_share": cpu, "rss_anon_bytes": {t: p["rss_anon_bytes"] for t, p in after.items()},
            "other_cpu_share": max(busy1 - busy0 - sum(cpu.values()) * wall, 0.0) / wall,
            "replaced": sorted(t for t in after if t in before and after[t]["pid"] != before[t]["pid"])}


def views(mta: ScaleMta, offers: dict[str, bool]) -> dict[str, dict | None]:
    """The three views issue 15 pages, timed; None for one this mta does not have."""
    out: dict[str, dict | None] = {"list": None, "api": None, "shape": None}
    if offers["list"]:
        out["list"] = mta.cli("queue", "list", "--limit", str(VIEW_LIMIT))
    if offers["api"]:
        out["api"] = mta.api_get(f"/api/queue?limit={VIEW_LIMIT}")
    if offers["shape"]:
        out["shape"] = mta.cli("queue", "shape")
    for view in out.values():
        if view is not None:
            log(f"  {view['command']}: {view['seconds']:.2f}s, status {view['status']}")
    return out


def probe_views(mta: ScaleMta) -> dict[str, bool]:
    """Which views this checkout has: the CLI's help, and the API's answer to a page of an
    empty queue (a dict with `messages`; today's API ignores `limit` and answers a list)."""
    api = mta.api_get("/api/queue?limit=1")
    offers = {"list": mta.cli_offers("--limit", "queue", "list"), "shape": mta.cli_offers("shape", "queue"),
              "api": api["status"] == 200 and api["form"] == "page"}
    log("views built: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in offers.items()))
    return offers


def ingest(mta: ScaleMta, sink: CountingSink, args: argparse.Namespace) -> dict:
    """A warm-up, then loadgen's run to e2e.test: ingest msg/s, and end to end (every
    accepted message at the sink) over the same run."""
    if args.warmup:
        base = sink.count()
        warm = loadgen_run(mta.port, args, args.warmup, quiet=True, rcpt=INGEST_RCPT)
        sink.wait_for(base + warm["accepted"], time.monotonic() + args.timeout_seconds)
        sink.wait_quiet(0.5, 5.0)
    base, busy0, wall0 = sink.count(), machine_busy_seconds(interrupts=False), time.monotonic()
    server_cpu0, sink_cpu0, loadgen_cpu0 = mta.server_cpu(), sink.cpu_seconds(), reaped_children_cpu_seconds()
    run = loadgen_run(mta.port, args, args.messages, quiet=args.quiet, rcpt=INGEST_RCPT)
    started, accepted = run["started_monotonic"], run["accepted"]
    arrival = sink.wait_for(base + accepted, started + args.timeout_seconds) if accepted else None
    wall = time.monotonic() - wall0
    # The rest of the machine meanwhile: all busy CPU but interrupts, minus mta, the whole
    # loadgen process (a reaped child) and the sink (this driver's sink reader is a rounding error).
    other = (machine_busy_seconds(interrupts=False) - busy0 - (mta.server_cpu() - server_cpu0)
             - (reaped_children_cpu_seconds() - loadgen_cpu0) - (sink.cpu_seconds() - sink_cpu0))
    result = {"messages": args.messages, "accepted": accepted, "ingest_per_second": run["accepted_per_second"],
              "e2e_per_second": accepted / (arrival - started) if arrival is not None else None,
              "arrived": min(sink.count() - base, accepted), "latency_p99_ms": run["latency_p99_ms"],
              "other_cpu_share": max(other, 0.0) / max(wall, 1e-9), "errors": run["first_errors"][:2]}
    log(f"  ingest: {accepted}/{args.messages} accepted at {run['accepted_per_second']:.0f} msg/s, "
        + (f"end to end {result['e2e_per_second']:.0f} msg/s" if arrival is not None
           else f"only {result['arrived']} arrived within {args.timeout_seconds:.0f}s"))
    return result


def drain(mta: ScaleMta, sink: CountingSink, messages: int, ids_base: int, dups_base: int,
          args: argparse.Namespace) -> dict:
    """The destination comes back: `mta queue retry --domain scale.test`, then every one
    of the `messages` filled at the sink; msg/s over the ones still queued then.

    Should the retry fail on the running server (today's scheduler, busy for seconds
    with a large retry, is killed by the master's heartbeat watchdog and the retry is
    lost), the drain still gets measured, the other way an operator would: mta stopped,
    the same retry applied to the spool, mta started again; the clock starts then."""
    already = sink.ids()[0] - ids_base
    remaining = messages - already
    count_base = sink.count()
    cpu0, started = mta.server_cpu(), time.monotonic()
    retry = mta.cli("queue", "retry", "--domain", SCALE_DOMAIN)
    log(f"  {retry['command']}: {retry['seconds']:.2f}s, status {retry['status']}")
    result: dict = {"retry": retry, "via": "online"}
    if retry["status"] != 0:
        log(f"  the retry failed ({retry['stderr_tail'].strip()[-200:]}); stopping mta, retrying on the "
            "spool, starting mta again")
        mta.stop()
        cpu0, started = 0.0, time.monotonic()
        result["offline_retry"] = mta.cli("queue", "retry", "--domain", SCALE_DOMAIN)
        result["via"] = "offline"
        mta.start()
        if mta.wait_greeting(args.start_timeout_seconds + messages / 5000) is None:
            raise RuntimeError("mta did not start again after the offline retry")
    deadline = started + args.drain_timeout_seconds
    done_at = None
    while done_at is None and time.monotonic() < deadline and sink.alive():
        done_at = sink.wait_for_ids(ids_base + messages, min(deadline, time.monotonic() + PROGRESS_SECONDS))
        if done_at is None:
            got = sink.ids()[0] - ids_base - already
            elapsed = time.monotonic() - started
            log(f"  drain: {got}/{remaining} arrived in {elapsed:.0f}s ({got / max(elapsed, 1e-9):.0f} msg/s)")
    end = done_at if done_at is not None else time.monotonic()
    server_cpu = mta.server_cpu() - cpu0
    sink.wait_quiet(0.5, 5.0)
    distinct, dups = sink.ids()
    result |= {"remaining": remaining, "arrived_distinct": distinct - ids_base,
              "duplicates": dups - dups_base, "extra_arrivals": max(sink.count() - count_base - remaining, 0),
              "seconds": end - started, "timed_out": done_at is None,
              "per_second": remaining / max(end - started, 1e-9) if done_at is not None else None,
              "server_cpu_us_per_message": server_cpu / remaining * 1e6 if remaining > 0 else None}
    log(f"  drain: {result['arrived_distinct']}/{messages} distinct at the sink, {result['duplicates']} repeated, "
        + (f"{result['per_second']:.0f} msg/s over {result['seconds']:.1f}s" if done_at is not None
           else f"not all within {args.drain_timeout_seconds:.0f}s"))
    return result


def fill_spool(mta: ScaleMta, messages: int, tag: str, args: argparse.Namespace) -> dict:
    argv = [str(FILL_TOOL), "--spool", str(mta.spool), "--max-size-bytes", str(mta.room),
            "--messages", str(messages), "--domain", SCALE_DOMAIN, "--tag", tag, "--header", FILL_HEADER,
            "--size", str(args.size), "--due-now", str(min(args.due_at_start, messages)), "--json"]
    log(f"filling the spool with {messages} deferred messages (bench/queuefill.py, server stopped)")
    result = run_json(argv, CLI_TIMEOUT_SECONDS + messages / 1000)
    data = mta.spool / "data.mdb"
    result["spool_disk_bytes"] = data.stat().st_blocks * 512 if data.exists() else None
    return result


def measure(messages: int, index: int, sink: CountingSink, scratch: Path, args: argparse.Namespace,
            offers: dict[str, bool] | None) -> tuple[dict, dict[str, bool] | None]:
    """One row: fill (unless 0), start, restart figures, idle, views, ingest, drain."""
    workdir = Path(tempfile.mkdtemp(prefix=f"queue-scale-{messages}-", dir=scratch))
    mta = ScaleMta(workdir, messages, args)
    row: dict = {"queued": messages, "ok": False, "error": None}
    ids_base, dups_base = sink.ids()
    try:
        if messages:
            row["fill"] = fill_spool(mta, messages, f"q{index}", args)
        log(f"queue-scale {messages}: starting mta on {HOST}:{mta.port} (control {HOST}:{mta.control_port})")
        mta.start()
        row["greeting_seconds"] = mta.wait_greeting(args.start_timeout_seconds + messages / 5000)
        if row["greeting_seconds"] is None:
            row["error"] = "no 220 greeting"
            return row, offers
        ready, fields = mta.wait_scheduler_ready(args.start_timeout_seconds + messages / 1000)
        row["scheduler_ready_seconds"], row["scheduler_ready_fields"] = ready, fields
        due = min(args.due_at_start, messages)
        if due:
            reached = sink.wait_for_ids(ids_base + due, time.monotonic() + args.timeout_seconds)
            first = sink.first_arrival_after(mta.spawned)
            row["first_dispatch_seconds"] = first - mta.spawned if first is not None else None
            row["due_arrived_seconds"] = reached - mta.spawned if reached is not None else None
        log(f"  220 after {row['greeting_seconds']:.2f}s, scheduler ready after "
            + (f"{ready:.2f}s ({fields})" if ready is not None else "- (no ready event)")
            + (f", first arrival after {row['first_dispatch_seconds']:.2f}s"
               if row.get("first_dispatch_seconds") is not None else ""))
        sink.wait_quiet(0.5, 5.0)
        row["after_start"] = {t: p["rss_anon_bytes"] for t, p in sample_processes(mta).items()}
        log(f"  idle for {args.idle_seconds:.0f}s")
        row["idle"] = idle_window(mta, args.idle_seconds)
        if offers is None:
            offers = probe_views(mta)
        row["views"] = views(mta, offers)
        row["ingest"] = ingest(mta, sink, args)
        if messages:
            row["drain"] = drain(mta, sink, messages, ids_base, dups_base, args)
        row["ok"] = row_ok(row, messages)
        if not mta.server or not mta.server.alive():
            row["ok"], row["error"] = False, "mta exited during the run"
        return row, offers
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row, offers
    finally:
        if not row["ok"] and mta.server is not None:
            row["stderr_tail"] = mta.server.log_tail()
        mta.stop()
        if mta.spool.exists():
            shutil.rmtree(mta.spool)  # a million messages are ~2 GB of scratch


def row_ok(row: dict, messages: int) -> bool:
    """Everything measured, everything accepted arrived, every filled message exactly once, and
    every operator command (the views, the retry) answered."""
    problems = []
    if row.get("scheduler_ready_seconds") is None:
        problems.append("no scheduler ready event")
    if row["ingest"]["e2e_per_second"] is None:
        problems.append("not every ingested message arrived")
    drained = row.get("drain")
    if drained is not None and (drained["arrived_distinct"] != messages or drained["duplicates"]):
        problems.append(f"{drained['arrived_distinct']}/{messages} filled messages arrived, "
                        f"{drained['duplicates']} twice")
    problems += [f"`{v['command']}` answered {v['status']}" for v in [*row["views"].values(), (drained or {}).get("retry")]
                 if v is not None and v["status"] not in (0, 200)]
    row["error"] = "; ".join(problems) or None
    return not problems


def run_queue_scale(args: argparse.Namespace, scratch: Path) -> tuple[str, dict, bool]:
    """The reference (empty queue), then one row per N: (the report, the JSON part, all ok)."""
    args.sink_port = free_port()
    sink = CountingSink("python", args.sink_port, scratch, ids_header=FILL_HEADER)
    log(f"queue-scale: counting sink {sink.kind} on {HOST}:{args.sink_port}")
    rows: list[dict] = []
    offers: dict[str, bool] | None = None
    try:
        why = sink.wait_ready(15.0)
        if why is not None:
            raise SystemExit(f"bench: the sink did not start: {why}\n{tail(sink.stderr_path)}")
        log("queue-scale: reference run on an empty queue")
        reference, offers = measure(0, 0, sink, scratch, args, None)
        rows.append(reference)
        for index, messages in enumerate(args.queue_scale_list, start=1):
            row, offers = measure(messages, index, sink, scratch, args, offers)
            rows.append(row)
    finally:
        sink.stop()
    report = render_report(rows, args, sink.kind, offers or {})
    doc = {"sink": sink.kind, "fill_header": FILL_HEADER, "scale_domain": SCALE_DOMAIN,
           "ingest_domain": E2E_DOMAIN, "rows": rows}
    return report, doc, all(r["ok"] for r in rows)
