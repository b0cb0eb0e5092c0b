"""bench/run --e2e: relaying end to end, mta against Postfix into one counting sink.

One counting sink (peers.CountingSink) is the next hop of every target: mta routes
e2e.test to it, a private Postfix relays everything to it (relayhost). For every
repeat, size and target (interleaved): a fresh target, a warm-up waited for at the
sink, then N messages; the clock runs from loadgen's first connect to the arrival of
the last accepted message at the sink. Rows are (target, size); the ratio is to
Postfix's end-to-end msg/s. With --half-load the same server then gets half the
messages paced at half the ingest rate it reached: the reply latency at a load it
can carry.

mta here: `[relay] relay_domains = ["e2e.test"]`, `[routes]` to the sink (no MX
lookup), `[domains."e2e.test"] concurrency = 20` with the default initial window of 5
(Postfix's default_destination_concurrency_limit and initial_destination_concurrency:
the same window on both sides), a dead `[dns]` (a bounce to client.test must not ask
the machine's resolver).

With --against DIR (against.py) every mta row is followed by the same row run by DIR's
own code (`mta-1w@<short commit>`) on this configuration, and the report adds this
build against that one: both medians and this/other.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from against import checkout_for, config_refused, e2e_comparison_json, render_e2e_comparison, this_build
from clients import loadgen_run
from mtaconf import dead_dns, mta_launch, write_config
from peers import (E2E_DOMAIN, POSTFIX_INSTALL_COMMANDS, CountingSink, PostfixInstance, install_postfix,
                   postfix_installed, postfix_version)
from procs import HOST, REPO_ROOT, Launch, Server, become_subreaper, free_port, log, reap_orphans, tail
from procstat import (group_pids, machine_busy_seconds, machine_interrupt_seconds, machine_line,
                      reaped_children_cpu_seconds, self_cpu_seconds)
from results import (Outcome, Summary, cell, failed_note, first_problems, fmt, machine_notes, md_row, notes_cell,
                     problem_kinds, report_text, share_cell, shortfalls, span, timeout_note)
from targets import MTA_ROW, MTA_TARGET

START_TIMEOUT_SECONDS: Final = 15.0
E2E_RCPT: Final = f"user@{E2E_DOMAIN}"
POSTFIX_TARGET: Final = "postfix"
E2E_DEFAULT_TARGETS: Final = (MTA_TARGET, POSTFIX_TARGET)
E2E_DEFAULT_SIZES: Final = "1024,102400"
# A run that saw no arrival for this long after the last one is settled: whatever
# arrives later is counted as extra (duplicates, bounces), not as the run's messages.
E2E_QUIET_SECONDS: Final = 0.5


def e2e_config(port: int, workdir: Path, workers: int, delivery_workers: int, sink_port: int) -> Path:
    return write_config(workdir, port, workers, relay={"relay_domains": [E2E_DOMAIN]},
                        delivery={"workers": delivery_workers},
                        **{f'domains."{E2E_DOMAIN}"': {"concurrency": 20},
                           "routes": {E2E_DOMAIN: f"{HOST}:{sink_port}"}, "dns": dead_dns()})


def launch_mta_e2e(port: int, workdir: Path, workers: int, delivery_workers: int,
                   sink_port: int, root: Path = REPO_ROOT) -> Launch:
    """mta relaying e2e.test to the sink; `root`: the checkout whose code runs."""
    config = e2e_config(port, workdir, workers, delivery_workers, sink_port)
    return mta_launch(config, workers, root)


def check_other_build(args: argparse.Namespace, scratch: Path) -> None:
    """--against: exit, saying why, unless the other build's code accepts this configuration."""
    build = args.against_build
    if build is None:
        return
    workdir = Path(tempfile.mkdtemp(prefix="against-config-", dir=scratch))
    config = e2e_config(free_port(), workdir, args.mta_worker_list[0], args.delivery_workers, free_port())
    why = config_refused(build, config)
    if why is not None:
        raise SystemExit(f"bench: --against {build.root}: {why}")
    log(f"against: {build.describe()} accepts this bench's configuration; this build: "
        f"{this_build().describe()}")


@dataclass
class E2EHandle:
    """One started e2e target, mta or Postfix: how to read its CPU, check it, stop it."""

    cpu_seconds: Callable[[], float]
    alive: Callable[[], bool]
    stop: Callable[[], object]
    log_tail: Callable[[], str]
    cpu_by_kind: Callable[[], dict[str, float]] | None = None  # mta only: per process kind
    pids: Callable[[], list[int]] | None = None  # its live processes (bench/run --syscalls)


def start_e2e_target(target: str, port: int, workdir: Path, sink_port: int,
                     args: argparse.Namespace) -> tuple[E2EHandle, str | None]:
    """Start one e2e target relaying e2e.test to the sink; (handle, why it is not ready)."""
    if target == POSTFIX_TARGET:
        pf = PostfixInstance(workdir, port, sink_port, args.postfix_in_flow_delay)
        handle = E2EHandle(pf.cpu_seconds, pf.alive, pf.stop, pf.log_tail, pids=pf.processes)
        return handle, pf.start(START_TIMEOUT_SECONDS)
    row, root = checkout_for(target, args.against_build)
    match = MTA_ROW.fullmatch(row)
    assert match is not None, target  # parse_args admits only mta-<N>w[@build] and postfix
    launch = launch_mta_e2e(port, workdir, int(match.group(1)), args.delivery_workers,
                            sink_port, root)
    server = Server(target, launch, workdir, port)
    handle = E2EHandle(server.cpu_seconds, server.alive, server.stop, server.log_tail,
                       server.cpu_by_kind, lambda: group_pids(server.proc.pid))
    return handle, server.wait_ready(START_TIMEOUT_SECONDS)


def start_fresh(target: str, label: str, prefix: str, args: argparse.Namespace, scratch: Path,
                sink: CountingSink) -> tuple[E2EHandle, int, str | None]:
    """One target on a free port in a new directory under `scratch`, relaying to the sink:
    (its handle, its port, why it is not ready)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch))
    workdir.chmod(0o755)  # Postfix's daemons (user postfix) work below it
    port = free_port()
    log(f"{label}: starting on {HOST}:{port}, relaying {E2E_DOMAIN} to {HOST}:{sink.port}")
    handle, why = start_e2e_target(target, port, workdir, sink.port, args)
    return handle, port, why


def warm_up(label: str, port: int, size: int, args: argparse.Namespace, sink: CountingSink) -> str | None:
    """--warmup messages, waited for at the sink until it is quiet; None, or why not."""
    if args.warmup <= 0:
        return None
    log(f"{label}: warm-up, {args.warmup} messages, waiting for them at the sink")
    base = sink.count()
    warm = loadgen_run(port, args, args.warmup, quiet=True, size=size, rcpt=E2E_RCPT)
    if sink.wait_for(base + warm["accepted"], time.monotonic() + args.timeout_seconds) is None:
        return (f"warm-up: {sink.count() - base} of {warm['accepted']} accepted messages arrived "
                f"within {args.timeout_seconds:.0f}s")
    sink.wait_quiet(E2E_QUIET_SECONDS, 5.0)
    return None


def measure_e2e(target: str, size: int, messages: int, repeat: int, args: argparse.Namespace,
                scratch: Path, sink: CountingSink) -> Outcome:
    """One e2e run: fresh target, warm-up (waited for at the sink), then N messages.

    The clock starts at loadgen's first connect (its `started_monotonic`, the same
    CLOCK_MONOTONIC as ours) and stops when the sink's count reaches the messages the
    target accepted. Server CPU is read right before the load and right after the
    last arrival."""
    label = f"{target} {size} B repeat {repeat}/{args.repeat}"
    handle, port, why = start_fresh(target, label, f"e2e-{target}-{size}-r{repeat}-", args, scratch, sink)
    try:
        if why is not None:
            return Outcome(target, repeat, ok=False, error=f"failed to start: {why}",
                           stderr_tail=handle.log_tail())
        if not sink.alive():
            return Outcome(target, repeat, ok=False, error="the sink is not running")
        why = warm_up(label, port, size, args, sink)
        if why is not None:
            return Outcome(target, repeat, ok=False, error=why, stderr_tail=handle.log_tail())
        log(f"{label}: {messages} messages, {args.sessions} sessions, {size} bytes")
        base = sink.count()
        irq0 = machine_interrupt_seconds()
        busy0, children0, self0, wall0 = (machine_busy_seconds(interrupts=False),
                                          reaped_children_cpu_seconds(),
                                          self_cpu_seconds(), time.monotonic())
        sink_cpu0 = sink.cpu_seconds()
        kinds0 = handle.cpu_by_kind() if handle.cpu_by_kind else None
        server_cpu0 = handle.cpu_seconds()
        result = loadgen_run(port, args, messages, quiet=args.quiet, size=size, rcpt=E2E_RCPT)
        accepted = result["accepted"]
        started = result["started_monotonic"]
        ingest_end = started + result["elapsed_seconds"]
        arrival = (sink.wait_for(base + accepted, started + args.timeout_seconds)
                   if accepted else None)
        server_cpu = handle.cpu_seconds() - server_cpu0
        kinds1 = handle.cpu_by_kind() if handle.cpu_by_kind else None
        now = time.monotonic()
        sink_cpu = sink.cpu_seconds() - sink_cpu0
        arrived = min(sink.count() - base, accepted)
        # The rest of the machine meanwhile: all busy CPU but interrupts, minus the
        # target, the sink, loadgen (reaped child) and this driver (its sink reader).
        other_cpu = (machine_busy_seconds(interrupts=False) - busy0 - server_cpu - sink_cpu
                     - (reaped_children_cpu_seconds() - children0)
                     - (self_cpu_seconds() - self0))
        result["size"] = size
        result["other_cpu_share"] = max(other_cpu, 0.0) / max(now - wall0, 1e-9)
        # Loopback traffic of both legs is processed in softirq context, charged to no
        # process: kept apart from "other" (JSON only).
        result["interrupt_cpu_share"] = ((machine_interrupt_seconds() - irq0)
                                         / max(now - wall0, 1e-9))
        result["server_cores"] = server_cpu / max(now - started, 1e-9)
        result["arrived"] = arrived
        result["e2e_timed_out"] = arrival is None
        end = arrival if arrival is not None else now
        result["e2e_seconds"] = end - started
        # All arrived: accepted / time to the last one. Cut off: what did arrive, over
        # the time allowed (a lower bound, and the row says so).
        result["e2e_per_second"] = ((accepted if arrival is not None else arrived)
                                    / max(end - started, 1e-9))
        result["tail_seconds"] = max(end - ingest_end, 0.0)
        result["server_cpu_seconds"] = server_cpu
        result["server_cpu_us_per_message"] = (server_cpu / accepted * 1e6
                                               if accepted else None)
        if kinds0 is not None and kinds1 is not None and accepted:
            # Where mta's CPU goes (a process that restarted would show its loss as < 0).
            result["server_cpu_us_per_message_by_process"] = {
                kind: round((kinds1[kind] - kinds0.get(kind, 0.0)) / accepted * 1e6, 1)
                for kind in sorted(kinds1)}
        result["sink_cpu_seconds"] = sink_cpu
        wall = result["elapsed_seconds"]
        result["client_cpu_share"] = result["cpu_seconds"] / wall if wall > 0 else None
        # Anything arriving after the run settles is not one of its messages' first
        # copies: a duplicate delivery, a bounce, a notice. The row says how many.
        sink.wait_quiet(E2E_QUIET_SECONDS, 5.0)
        result["extra_arrivals"] = max(sink.count() - base - accepted, 0)
        outcome = Outcome(target, repeat, ok=accepted > 0 and arrival is not None,
                          result=result)
        if not handle.alive():
            outcome.ok = False
            outcome.error = "the target exited during the run"
            outcome.stderr_tail = handle.log_tail()
        elif accepted == 0:
            outcome.error = "no message accepted: " + first_problems(result)
            outcome.stderr_tail = handle.log_tail()
        elif arrival is None:
            outcome.error = (f"only {arrived} of {accepted} accepted messages arrived within "
                             f"{args.timeout_seconds:.0f}s")
            outcome.stderr_tail = handle.log_tail()
        log(f"{label}: {accepted}/{messages} accepted at {result['accepted_per_second']:.0f} "
            f"msg/s, {arrived} arrived, end-to-end {result['e2e_per_second']:.0f} msg/s "
            f"in {result['e2e_seconds']:.2f}s (last arrival {result['tail_seconds']:.2f}s "
            f"after the last 250), server CPU {server_cpu:.2f}s, sink CPU {sink_cpu:.2f}s")
        if args.half_load and outcome.ok:
            result["half_load"] = half_load(port, args, label, size, messages, result)
        return outcome
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        return Outcome(target, repeat, ok=False, error=f"load run failed: {exc}",
                       stderr_tail=handle.log_tail())
    finally:
        left = handle.stop()
        if left:
            log(f"{label}: had to SIGKILL {left} after `postfix stop`")


def half_load(port: int, args: argparse.Namespace, label: str, size: int, messages: int,
              full: dict) -> dict:
    """--half-load: the same server again, paced at half the ingest rate it just reached
    (half the messages, so about as long): the reply latency at a load it can carry."""
    rate = full["accepted_per_second"] / 2
    count = max(messages // 2, 1)
    log(f"{label}: half load: {count} messages paced at {rate:.0f} msg/s")
    run = loadgen_run(port, args, count, quiet=True, size=size, rcpt=E2E_RCPT, rate=rate)
    log(f"{label}: half load: {run['accepted']}/{count} accepted at "
        f"{run['accepted_per_second']:.0f} msg/s, reply after DATA p50 "
        f"{fmt(run['latency_p50_ms'])} ms, p99 {fmt(run['latency_p99_ms'])} ms "
        f"(at full load: p99 {fmt(full['latency_p99_ms'])} ms)")
    return {"rate": rate, "messages": count, "accepted": run["accepted"],
            "accepted_per_second": run["accepted_per_second"],
            **{k: run[k] for k in ("latency_p50_ms", "latency_p99_ms", "latency_p999_ms")}}


@dataclass
class E2ESummary(Summary):
    size: int = 0
    messages: int = 0  # requested per run
    skipped: str = ""  # why this row never ran (Postfix not installed)


def e2e_messages_for(size: int, args: argparse.Namespace) -> int:
    """Messages per run: --messages if given, else by size (bounded run times)."""
    if args.messages is not None:
        return args.messages
    if args.smoke:
        return 200 if size <= 16 * 1024 else 50
    return 2000 if size <= 16 * 1024 else 500


def render_e2e_table(summaries: list[E2ESummary], args: argparse.Namespace) -> str:
    postfix_rate = {s.size: s.median("e2e_per_second") for s in summaries
                    if s.target == POSTFIX_TARGET}
    half = args.half_load
    rows = ["| target | size | messages | ingest msg/s | end-to-end msg/s | vs postfix "
            "| last arrival after last 250, s | server CPU µs/msg | p99 ms "
            + ("| p99 ms at half load " if half else "") + "| loadgen CPU | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if half else "")
            + "---:|---|"]
    for s in summaries:
        rate = s.median("e2e_per_second")
        base = postfix_rate.get(s.size)
        ratio = f"{rate / base:.2f}x" if rate is not None and base else "-"
        notes = [s.skipped] if s.skipped else []
        notes += failed_note(s)
        shorts = shortfalls(s, "messages", "accepted")
        if shorts and shorts[-1]:
            notes.append(f"{span(shorts)} not accepted ({problem_kinds(s)}; see JSON)")
        notes += timeout_note(s, " while injecting")
        extra = [r["extra_arrivals"] for r in s.good if r["extra_arrivals"]]
        if extra:
            notes.append(f"up to {max(extra)} extra arrival(s) at the sink after the run "
                         f"(duplicates or bounces) in {len(extra)} run(s)")
        notes += machine_notes(s, "loadgen", " during ingest: client-bound")
        count = span([r["arrived"] for r in s.good] or [0])
        rows.append(md_row(
            s.target, s.size, f"{count if s.outcomes else '-'}/{s.messages}", cell(s, "accepted_per_second", 0),
            cell(s, "e2e_per_second", 0), ratio, cell(s, "tail_seconds", 2), cell(s, "server_cpu_us_per_message", 0),
            cell(s, "latency_p99_ms", 1), *([half_load_cell(s)] if half else []),
            share_cell(s.median("client_cpu_share")), notes_cell(notes)))
    return "\n".join(rows)


def render_cpu_by_process(summaries: list[E2ESummary]) -> str:
    """Where mta's server CPU per message goes, by process kind: median over the runs."""
    lines = []
    for s in summaries:
        runs = [r["server_cpu_us_per_message_by_process"] for r in s.good
                if r.get("server_cpu_us_per_message_by_process")]
        if not runs:
            continue
        kinds = sorted({k for r in runs for k in r}, key=lambda k: -statistics.median(r.get(k, 0.0) for r in runs))
        parts = [f"{k} {statistics.median(r.get(k, 0.0) for r in runs):.0f}" for k in kinds]
        lines.append(f"- {s.target}, {s.size} B: " + ", ".join(parts))
    if not lines:
        return ""
    return "Server CPU µs per message by process (median over the runs):\n\n" + "\n".join(lines)


def half_load_cell(s: E2ESummary) -> str:
    """p99 at half load, median (spread) over the runs, with the rate it was paced at."""
    runs = [r["half_load"] for r in s.good if r.get("half_load")]
    p99 = [h["latency_p99_ms"] for h in runs if h["latency_p99_ms"] is not None]
    if not p99:
        return "-"
    med = statistics.median(p99)
    spread = f" ({min(p99):.1f}–{max(p99):.1f})" if len(p99) > 1 else ""
    rate = statistics.median(h["rate"] for h in runs)
    return f"{med:.1f}{spread} at {rate:.0f} msg/s"


def ensure_postfix(args: argparse.Namespace) -> str | None:
    """None if Postfix can run; else why not (with what to install)."""
    if postfix_installed():
        return None
    if args.install_peers:
        if install_postfix():
            return None
        return "Postfix install failed (see above)"
    return "Postfix is not installed"


def run_e2e(args: argparse.Namespace, targets: list[str], scratch: Path) -> tuple[str, dict, bool]:
    """Every e2e run against one shared sink: (the report, the JSON part, all ok)."""
    skipped = ""
    if POSTFIX_TARGET in targets:
        why = ensure_postfix(args)
        if why is not None:
            log(f"{why}; to install it as root: " + "; ".join(POSTFIX_INSTALL_COMMANDS)
                + " (or run bench/run with --install-peers)")
            skipped = f"SKIPPED: {why}"
            if args.smoke:
                targets = [t for t in targets if t != POSTFIX_TARGET]
    summaries = {(t, size): E2ESummary(t, size=size, messages=e2e_messages_for(size, args))
                 for size in args.size_list for t in targets}
    for s in summaries.values():
        s.skipped = skipped if s.target == POSTFIX_TARGET else ""
    # Postfix's master daemonizes: as a subreaper we adopt it and its last children
    # when they exit, and reap them after each run instead of leaving zombies.
    check_other_build(args, scratch)
    become_subreaper()
    sink_port = free_port()
    sink = CountingSink(args.sink, sink_port, scratch)
    log(f"e2e: common sink {sink.kind} on {HOST}:{sink_port}")
    try:
        why = sink.wait_ready(START_TIMEOUT_SECONDS)
        if why is not None:
            raise SystemExit(f"bench: the sink did not start: {why}\n{tail(sink.stderr_path)}")
        for repeat in range(1, args.repeat + 1):
            for size in args.size_list:
                for target in targets:
                    s = summaries[(target, size)]
                    if s.skipped:
                        continue
                    s.outcomes.append(measure_e2e(target, size, s.messages, repeat, args,
                                                  scratch, sink))
                    reap_orphans(keep={sink.proc.pid})
    finally:
        sink.stop()
    ordered = list(summaries.values())
    pf = (f"Postfix {postfix_version()}, in_flow_delay {args.postfix_in_flow_delay}"
          if POSTFIX_TARGET in targets and not skipped else "no Postfix")
    sizes = ", ".join(f"{s} B x {e2e_messages_for(s, args)}" for s in args.size_list)
    install = (f"{skipped}. To install it (as root, after which bench/run finds it):\n\n```\n"
               + "\n".join(POSTFIX_INSTALL_COMMANDS) + "\n```\n\nor run `bench/run --e2e --install-peers`."
               if skipped else "")
    build = args.against_build
    report = report_text(f"mta bench --e2e: {sizes} messages, {args.repeat} repeat(s), "
                         f"{args.sessions} sessions, {args.per_session} per session, warm-up "
                         f"{args.warmup}; common sink: {sink.kind}; mta: inbound_workers per row, "
                         f"{args.delivery_workers} delivery worker(s); {pf}; {machine_line()}",
                         render_e2e_table(ordered, args), ordered,
                         render_e2e_comparison(ordered, build) if build else "",
                         render_cpu_by_process(ordered), after=[install])
    doc = {"sink": sink.kind,
           "targets": [{"target": s.target, "size": s.size, "messages": s.messages,
                        "skipped": s.skipped or None,
                        "median_e2e_per_second": s.median("e2e_per_second"),
                        "median_ingest_per_second": s.median("accepted_per_second"),
                        "median_server_cpu_us_per_message":
                            s.median("server_cpu_us_per_message"),
                        "runs": [vars(o) for o in s.outcomes]} for s in ordered]}
    if build is not None:
        doc["against"] = e2e_comparison_json(ordered, build)
    ok = all(o.ok for s in ordered for o in s.outcomes) and not (skipped and not args.smoke)
    return report, doc, ok
