"""bench/run --syscalls: system calls per relayed message, per process kind and syscall.

The figure that travels between machines (a syscall's cost varies a lot from one to
the next; their count per message does not). Set up as --e2e (e2e.py): one counting
sink, mta and a private Postfix relaying e2e.test to it, one after the other. Per
target: a fresh server, the warm-up waited for at the sink, then syscounts.Tracer
(`strace -f`) attached to every process of the server (mta: its process group, kinds
from the titles "mta: master", "mta: inbound#1 ...", ...; Postfix: its master's group
and every process with its config in the environment, kinds by program name; the
daemons the master forks meanwhile are followed), the load (--messages one-message
connections over --sessions), the wait for every accepted message at the sink, the
tracer stopped. Each count is divided by the messages that arrived at the sink
meanwhile; the table shows, per kind, calls per message in all and for the target's
top syscalls, and the JSON keeps every kind's count of every syscall. With --repeat N,
N runs per target (interleaved): the table shows the median run whole (results.py
median_run), its heading every run's total.

Tracing slows every call a lot (each one stops the process twice), so the run's rates
are not reported: only counts. A run is FAILED unless every accepted message arrived.
With --against DIR, each mta row is followed by the same row run by DIR's code
(e2e.py, against.py), and the report adds calls per message per kind of both builds.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Final

from against import render_syscalls_comparison, syscalls_comparison_json
from clients import loadgen_run
from e2e import (
    E2E_QUIET_SECONDS,
    E2E_RCPT,
    POSTFIX_TARGET,
    START_TIMEOUT_SECONDS,
    check_other_build,
    start_fresh,
    warm_up,
)
from peers import (
    POSTFIX_INSTALL_COMMANDS,
    CountingSink,
    postfix_installed,
    postfix_version,
)
from procs import HOST, become_subreaper, free_port, log, reap_orphans, tail
from procstat import machine_line, process_kind
from results import Outcome, Summary, failed_note, md_row, notes_cell, report_text
from syscounts import Tracer, strace_installed

TOP_SYSCALLS: Final = 10  # columns of the table; the JSON has them all
MTA_KINDS: Final = ("master", "inbound", "scheduler", "delivery", "control")


@dataclass
class SyscallSummary(Summary):
    skipped: str = ""  # why this target never ran (Postfix not installed)


def per_message(count: int, messages: int) -> float:
    return round(count / messages, 2) if messages else 0.0


def syscall_result(calls: dict[str, dict[str, int]], tasks: dict[str, int], messages: int) -> dict:
    """The JSON of one traced run: per kind and per syscall, counts and per message."""
    by_syscall: dict[str, int] = {}
    for per in calls.values():
        for name, n in per.items():
            by_syscall[name] = by_syscall.get(name, 0) + n
    total = sum(by_syscall.values())
    return {
        "messages_counted": messages,
        "syscalls_total": total,
        "syscalls_per_message": per_message(total, messages),
        "by_syscall_per_message": {name: per_message(n, messages)
                                   for name, n in sorted(by_syscall.items(), key=lambda kv: -kv[1])},
        "by_kind": {kind: {"tasks": tasks.get(kind, 0), "syscalls_total": sum(per.values()),
                           "syscalls_per_message": per_message(sum(per.values()), messages),
                           "calls": dict(sorted(per.items(), key=lambda kv: -kv[1]))}
                    for kind, per in sorted(calls.items(), key=lambda kv: -sum(kv[1].values()))},
    }


def wait_for_titles(pids: Callable[[], list[int]], deadline: float) -> str | None:
    """Until every mta kind has a process with its own title: a child still showing the
    master's title (forked, not yet set; the control process starts last) would be
    counted as the master. None, or why not."""
    while True:
        seen = {process_kind(pid) for pid in pids()}
        missing = [kind for kind in MTA_KINDS if kind not in seen]
        if not missing:
            return None
        if time.monotonic() > deadline:
            return f"no process titled as {', '.join(missing)} after the warm-up"
        time.sleep(0.05)


def measure_syscalls(target: str, args: argparse.Namespace, scratch: Path, sink: CountingSink,
                     repeat: int = 1) -> Outcome:
    """One traced run of one target: fresh server, warm-up, tracer on, load, arrivals, tracer off."""
    label = f"{target} --syscalls" + (f" repeat {repeat}/{args.repeat}" if args.repeat > 1 else "")
    handle, port, why = start_fresh(target, label, f"syscalls-{target}-", args, scratch, sink)
    tracer = None
    try:
        if why is None:
            why = warm_up(label, port, args.size, args, sink)
        if why is not None:
            return Outcome(target, repeat, ok=False, error=why, stderr_tail=handle.log_tail())
        assert handle.pids is not None  # every e2e target says which processes it has
        if target != POSTFIX_TARGET:
            why = wait_for_titles(handle.pids, time.monotonic() + START_TIMEOUT_SECONDS)
            if why is not None:
                return Outcome(target, repeat, ok=False, error=why, stderr_tail=handle.log_tail())
        tracer = Tracer(handle.pids(), Path(tempfile.mkdtemp(prefix=f"strace-{target}-", dir=scratch)))
        why = tracer.wait_attached()
        if why is not None:
            return Outcome(target, repeat, ok=False, error=why, stderr_tail=handle.log_tail())
        log(f"{label}: strace attached to {len(tracer.pids)} processes; {args.messages} messages, "
            f"{args.sessions} sessions, {args.size} bytes")
        base = sink.count()
        result = loadgen_run(port, args, args.messages, quiet=args.quiet, rcpt=E2E_RCPT)
        accepted = result["accepted"]
        arrival = (sink.wait_for(base + accepted, result["started_monotonic"] + args.timeout_seconds)
                   if accepted else None)
        sink.wait_quiet(E2E_QUIET_SECONDS, 5.0)
        arrived = sink.count() - base
        why = tracer.stop()
        calls, tasks = tracer.counts()
        result.update(arrived=arrived, **syscall_result(calls, tasks, min(arrived, accepted)))
        outcome = Outcome(target, repeat, ok=accepted > 0 and arrival is not None and why is None, result=result)
        if why is not None:
            outcome.error = why
        elif accepted == 0 or arrival is None:
            outcome.error = (f"{arrived} of {accepted} accepted messages arrived within "
                             f"{args.timeout_seconds:.0f}s under strace")
            outcome.stderr_tail = handle.log_tail()
        log(f"{label}: {accepted}/{args.messages} accepted, {arrived} arrived; "
            f"{result['syscalls_per_message']:.1f} syscalls per message")
        return outcome
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        return Outcome(target, repeat, ok=False, error=f"load run failed: {exc}", stderr_tail=handle.log_tail())
    finally:
        if tracer is not None:
            tracer.stop()
        left = handle.stop()
        if left:
            log(f"{label}: had to SIGKILL {left} after `postfix stop`")


def kind_order(target: str, kinds: dict) -> list[str]:
    """mta's kinds in the order a message meets them; Postfix's by calls, most first."""
    if target == POSTFIX_TARGET:
        return list(kinds)
    return [k for k in MTA_KINDS if k in kinds] + [k for k in kinds if k not in MTA_KINDS]


def render_target_table(s: SyscallSummary) -> str:
    """Kinds x top syscalls, calls per relayed message, with the target's total row."""
    result = s.median_run("syscalls_per_message")
    top = list(result["by_syscall_per_message"])[:TOP_SYSCALLS]
    messages = result["messages_counted"]
    runs = sorted(r["syscalls_per_message"] for r in s.good)
    median = (f"; the median of {len(runs)} runs: {', '.join(f'{v:.1f}' for v in runs)}"
              if len(runs) > 1 else "")
    rows = [(f"**{s.target}**: {result['syscalls_per_message']:.1f} syscalls per relayed message "
             f"({result['syscalls_total']} calls, {messages} messages{median})\n"),
            "| kind | tasks | all | " + " | ".join(top) + " | others |",
            "|---|---:|---:|" + "---:|" * (len(top) + 1)]
    for kind in kind_order(s.target, result["by_kind"]):
        row = result["by_kind"][kind]
        shown = [row["calls"].get(name, 0) for name in top]
        rows.append(md_row(kind, row["tasks"], f"{row['syscalls_per_message']:.1f}",
                           *(f"{per_message(n, messages):.1f}" for n in shown),
                           f"{per_message(row['syscalls_total'] - sum(shown), messages):.1f}"))
    by_syscall = result["by_syscall_per_message"]
    rows.append(md_row("**total**", sum(r["tasks"] for r in result["by_kind"].values()),
                       f"**{result['syscalls_per_message']:.1f}**",
                       *(f"{by_syscall[name]:.1f}" for name in top),
                       f"{result['syscalls_per_message'] - sum(by_syscall[n] for n in top):.1f}"))
    return "\n".join(rows)


def render_syscalls(summaries: list[SyscallSummary]) -> str:
    parts = []
    for s in summaries:
        if s.good:
            parts.append(render_target_table(s))
        else:
            notes = ([s.skipped] if s.skipped else []) + failed_note(s)
            parts.append(f"**{s.target}**: {notes_cell(notes) or 'no run'}")
    totals = {s.target: s.median_run("syscalls_per_message")["syscalls_per_message"] for s in summaries if s.good}
    if totals.get(POSTFIX_TARGET) and len(totals) > 1:
        parts.append("Against Postfix: " + "; ".join(
            f"{t} {v:.1f} per message, {v / totals[POSTFIX_TARGET]:.2f}x Postfix's "
            f"{totals[POSTFIX_TARGET]:.1f}" for t, v in totals.items() if t != POSTFIX_TARGET) + ".")
    return "\n\n".join(parts)


def run_syscalls(args: argparse.Namespace, scratch: Path) -> tuple[str, dict, bool]:
    """Every target traced once against one shared sink: (the report, the JSON part, all ok)."""
    if not strace_installed():
        raise SystemExit("bench: --syscalls needs strace (apt-get install strace)")
    targets = list(args.target_list)
    skipped = ""
    if POSTFIX_TARGET in targets and not postfix_installed():
        skipped = "SKIPPED: Postfix is not installed"
        log(f"{skipped}; to install it as root: " + "; ".join(POSTFIX_INSTALL_COMMANDS)
            + " (or run bench/run with --install-peers)")
    summaries = [SyscallSummary(t, skipped=skipped if t == POSTFIX_TARGET else "") for t in targets]
    check_other_build(args, scratch)
    become_subreaper()  # Postfix's master daemonizes: adopt and reap its last children
    sink = CountingSink(args.sink, free_port(), scratch)
    log(f"syscalls: common sink {sink.kind} on {HOST}:{sink.port}")
    try:
        why = sink.wait_ready(START_TIMEOUT_SECONDS)
        if why is not None:
            raise SystemExit(f"bench: the sink did not start: {why}\n{tail(sink.stderr_path)}")
        for repeat in range(1, args.repeat + 1):  # targets interleaved, as --e2e does
            for s in summaries:
                if not s.skipped:
                    s.outcomes.append(measure_syscalls(s.target, args, scratch, sink, repeat))
                    reap_orphans(keep={sink.proc.pid})
    finally:
        sink.stop()
    build = args.against_build
    pf = f"Postfix {postfix_version()}" if any(s.target == POSTFIX_TARGET and s.good for s in summaries) else "no Postfix"
    report = report_text(f"mta bench --syscalls: {args.messages} messages of {args.size} B, {args.sessions} "
                         f"sessions, {args.per_session} per connection, warm-up {args.warmup} (not traced), "
                         f"{args.repeat} run(s) per target (the median run shown); "
                         f"strace -f on every server process, calls per message that arrived at the sink "
                         f"({sink.kind}); mta: {args.delivery_workers} delivery worker(s); {pf}; {machine_line()}",
                         render_syscalls(summaries), summaries,
                         render_syscalls_comparison(summaries, build, MTA_KINDS) if build else "")
    doc = {"sink": sink.kind, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "targets": [{"target": s.target, "skipped": s.skipped or None,
                        "syscalls_per_message": (s.median_run("syscalls_per_message")["syscalls_per_message"]
                                                 if s.good else None),
                        "runs": [vars(o) for o in s.outcomes]} for s in summaries]}
    if build is not None:
        doc["against"] = syscalls_comparison_json(summaries, build)
    ok = all(o.ok for s in summaries for o in s.outcomes) and any(s.outcomes for s in summaries)
    if skipped and not args.smoke_syscalls:
        ok = False
    return report, doc, ok
