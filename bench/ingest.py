"""bench/run's default mode: accepted msg/s of each target, durably, on the same machine.

For every repeat and every target (interleaved, so slow drift of the machine hits
all of them alike): a fresh server on a free loopback port with a fresh temp spool,
a warm-up, one measured loadgen run with the same parameters for every target, the
server stopped. The table gives the median over the repeats and each target's msg/s
over the aiosmtpd baseline's. For `mta-<N>w` rows the prefork master's own CPU is
read right around the measured load and divided by the connections loadgen opened:
what the master's accept-and-hand-off costs.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from clients import loadgen_run
from procs import HOST, Server, free_port, log
from procstat import machine_busy_seconds, machine_line, reaped_children_cpu_seconds
from results import (Outcome, Summary, cell, failed_note, first_problems, fmt, machine_notes, md_row, notes_cell,
                     problem_kinds, report_text, share_cell, shortfalls, span, timeout_note)
from targets import BASELINE, MTA_ROW, MTA_WORKER_TITLE, launcher_for

START_TIMEOUT_SECONDS: Final = 15.0


def measure(target: str, repeat: int, args: argparse.Namespace, scratch: Path) -> Outcome:
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-r{repeat}-", dir=scratch))
    port = free_port()
    launch = launcher_for(target)(port, workdir, args)
    log(f"{target} repeat {repeat}/{args.repeat}: starting on {HOST}:{port}")
    server = Server(target, launch, workdir, port)
    try:
        why = server.wait_ready(START_TIMEOUT_SECONDS)
        if why is not None:
            return Outcome(target, repeat, ok=False, error=f"failed to start: {why}",
                           stderr_tail=server.log_tail())
        if args.warmup > 0:
            log(f"{target} repeat {repeat}/{args.repeat}: warm-up, {args.warmup} messages")
            loadgen_run(port, args, args.warmup, quiet=True)
        log(f"{target} repeat {repeat}/{args.repeat}: {args.messages} messages, "
            f"{args.sessions} sessions, {args.size} bytes, {args.per_session} per session")
        prefork = launch.prefork_workers is not None
        workers_seen = server.children_titled(MTA_WORKER_TITLE) if prefork else None
        busy0, loadgen_cpu0, wall0 = (machine_busy_seconds(), reaped_children_cpu_seconds(),
                                      time.monotonic())
        server_cpu0 = server.cpu_seconds()
        # Innermost reads: the master's own CPU, right around the load (warm-up excluded).
        master_cpu0 = server.leader_cpu_seconds() if prefork else None
        result = loadgen_run(port, args, args.messages, quiet=args.quiet)
        master_cpu1 = server.leader_cpu_seconds() if prefork else None
        server_cpu = server.cpu_seconds() - server_cpu0
        # What the rest of the machine used meanwhile: all busy CPU minus the server
        # group minus the whole loadgen process (its start-up included).
        other_cpu = (machine_busy_seconds() - busy0 - server_cpu
                     - (reaped_children_cpu_seconds() - loadgen_cpu0))
        result["other_cpu_share"] = max(other_cpu, 0.0) / max(time.monotonic() - wall0, 1e-9)
        client_cpu = result["cpu_seconds"]
        master_cpu = (master_cpu1 - master_cpu0
                      if master_cpu0 is not None and master_cpu1 is not None else None)
        result["mta_workers"] = launch.prefork_workers
        result["mta_workers_seen"] = workers_seen
        result["master_cpu_seconds"] = master_cpu
        result["master_cpu_us_per_connection"] = (
            master_cpu / result["connections"] * 1e6
            if master_cpu is not None and result["connections"] else None)
        wall = result["elapsed_seconds"]
        result["server_cpu_seconds"] = server_cpu
        result["server_cpu_us_per_message"] = (
            server_cpu / result["accepted"] * 1e6 if result["accepted"] else None)
        result["client_cpu_share"] = client_cpu / wall if wall > 0 else None
        outcome = Outcome(target, repeat, ok=result["accepted"] > 0, result=result)
        if not server.alive():
            outcome.ok = False
            outcome.error = f"server exited with status {server.proc.returncode} during the load"
            outcome.stderr_tail = server.log_tail()
        elif result["accepted"] == 0:
            outcome.error = "no message accepted: " + first_problems(result)
            outcome.stderr_tail = server.log_tail()
        log(f"{target} repeat {repeat}/{args.repeat}: {result['accepted']}/{args.messages} "
            f"accepted, {result['accepted_per_second']:.0f} msg/s, "
            f"p50 {fmt(result['latency_p50_ms'])} ms, p99 {fmt(result['latency_p99_ms'])} ms, "
            f"server CPU {server_cpu:.2f}s, loadgen CPU {client_cpu:.2f}s"
            + ("" if master_cpu is None else
               f", master CPU {master_cpu:.2f}s over {result['connections']} connections"))
        return outcome
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        return Outcome(target, repeat, ok=False, error=f"load run failed: {exc}",
                       stderr_tail=server.log_tail())
    finally:
        server.stop()


def render_table(summaries: list[Summary], args: argparse.Namespace) -> str:
    rates = {s.target: s.median("accepted_per_second") for s in summaries}
    base_rate = rates.get(BASELINE)
    one_worker_rate = rates.get("mta-1w")
    rows = ["| target | sessions | size | messages | accepted msg/s | p50 ms | p99 ms "
            "| vs aiosmtpd | server CPU µs/msg | master CPU µs/conn | loadgen CPU | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        rate = rates[s.target]
        ratio = f"{rate / base_rate:.2f}x" if rate is not None and base_rate else "-"
        mta_row = MTA_ROW.fullmatch(s.target)
        # Blank, not "-", for targets that have no prefork master.
        master_cell = cell(s, "master_cpu_us_per_connection", 0) if mta_row else ""
        notes = failed_note(s)
        if mta_row and mta_row.group(1) != "1" and rate is not None and one_worker_rate:
            notes.append(f"{rate / one_worker_rate:.2f}x mta-1w")
        if mta_row:
            expected = int(mta_row.group(1))
            seen = sorted({r["mta_workers_seen"] for r in s.good})
            if seen and seen != [expected]:
                notes.append(f"saw {'/'.join(map(str, seen))} inbound workers, "
                             f"expected {expected}")
        shorts = shortfalls(s, "messages", "accepted")
        if shorts and shorts[-1]:
            notes.append(f"{span(shorts)} not accepted ({problem_kinds(s)}; see JSON)")
        notes += timeout_note(s)
        if s.good and not all(r["pipelining_used"] for r in s.good) and args.pipelining:
            notes.append("no PIPELINING")
        notes += machine_notes(s, "loadgen", ": client-bound, msg/s is a lower bound")
        accepted = span([r["accepted"] for r in s.good] or [0])
        rows.append(md_row(
            s.target, args.sessions, args.size, f"{accepted}/{args.messages}", cell(s, "accepted_per_second", 0),
            cell(s, "latency_p50_ms", 2), cell(s, "latency_p99_ms", 2), ratio,
            cell(s, "server_cpu_us_per_message", 0), master_cell, share_cell(s.median("client_cpu_share")),
            notes_cell(notes)))
    return "\n".join(rows)


def run_inbound(args: argparse.Namespace, scratch: Path) -> tuple[str, dict, bool]:
    """The accept-and-commit comparison: (the report, the JSON part, all ok)."""
    summaries = {t: Summary(t) for t in args.target_list}
    for repeat in range(1, args.repeat + 1):
        for target in args.target_list:
            summaries[target].outcomes.append(measure(target, repeat, args, scratch))
    ordered = list(summaries.values())
    report = report_text(f"mta bench: {args.messages} messages x {args.repeat} repeat(s), "
                         f"{args.sessions} sessions, {args.size}-byte body, {args.per_session} per "
                         f"session, pipelining {'on' if args.pipelining else 'off'}, "
                         f"targets {', '.join(args.target_list)}; {machine_line()}",
                         render_table(ordered, args), ordered)
    doc = {"targets": [{"target": s.target,
                        "median_accepted_per_second": s.median("accepted_per_second"),
                        "median_latency_p50_ms": s.median("latency_p50_ms"),
                        "median_latency_p99_ms": s.median("latency_p99_ms"),
                        "median_server_cpu_us_per_message":
                            s.median("server_cpu_us_per_message"),
                        "median_master_cpu_us_per_connection":
                            s.median("master_cpu_us_per_connection"),
                        "runs": [vars(o) for o in s.outcomes]} for s in ordered]}
    return report, doc, all(o.ok for s in ordered for o in s.outcomes)
