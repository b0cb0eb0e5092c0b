"""bench/run --content: what each content stage costs, and whether a milter blocks the loop.

Two questions. (1) Ingest rate and server CPU per message with no stage, each stage
alone and all together, on one 10 KiB multipart message (contentpeers.content_message):
each configuration (CONFIGS) is a fresh mta (delivery workers 0, as the default mode)
under the same loadgen load, and each row's ratio is against "none" of the same
invocation. Every run is checked against mta's own mta_content_decisions_total (its
/metrics): each stage of the configuration must have decided exactly once per accepted
message, with the expected result, and no other stage at all; else the run FAILED (a
pipeline that silently did nothing must not pass for a cheap one). The peers' CPU
(clamd, the milter) is reported apart from mta's. (2) With a milter that sleeps 0.2 s
per message, N concurrent sessions must each take about one delay, not queue behind
each other: the achieved msg/s against N / delay (SLOW_MILTER).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clients import run_loadgen
from contentpeers import (MILTER_CHANGES, MILTER_SLEEP_SECONDS, MILTER_SLEEPS, SIGNING_DOMAIN, Peers,
                          content_message, content_peers, write_dkim_keys)
from mtaconf import dead_dns, labelled_totals, mta_launch, write_config
from procs import HOST, Server, free_port, log
from procstat import machine_busy_seconds, machine_line, reaped_children_cpu_seconds
from results import (Outcome, Summary, cell, failed_note, first_problems, machine_notes, md_row, notes_cell,
                     report_text, timeout_note)
from targets import RCPT_DOMAIN, RCPT_USER

START_TIMEOUT_SECONDS: Final = 15.0
METRICS_READY_SECONDS: Final = 15.0
DEFAULT_MESSAGES: Final = 2000
MESSAGE_BYTES: Final = 10 * 1024
BLOCKED_EXTENSIONS: Final = ("exe", "vbs", "js", "scr")
SLOW_MILTER: Final = "milter-slow"
# The event-loop check fails below this share of N / delay (fully overlapped waits): far
# above workers / delay (each wait blocking its worker), with room for each message's own
# time beside the delay (~70 ms here, 40 of them TCP's delayed ACK) and a busy machine.
OVERLAP_FLOOR: Final = 0.25

# Each configuration's stages, in pipeline order: (stage, the result every message must get).
CONFIGS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "none": (),
    "attachments": (("attachments", "pass"),),
    "antivirus": (("antivirus", "clean"),),
    "milter": (("milter", "changed"),),
    "footer": (("footer", "added"),),
    "dkim-rsa": (("dkim", "signed"),),
    "dkim-ed25519": (("dkim", "signed"),),
    "all": (("attachments", "pass"), ("antivirus", "clean"), ("milter", "changed"), ("footer", "added"),
            ("dkim", "signed")),
    SLOW_MILTER: (("milter", "changed"),),
}


@dataclass
class Fixtures:
    """What every run of one invocation shares."""

    peers: Peers
    keys: dict[str, Path]  # DKIM keys by algorithm
    message_file: Path
    message_bytes: int


def stage_tables(config: str, peers: Peers, keys: dict[str, Path]) -> dict:
    """The mta.toml tables that turn the configuration's stages on ("all": rsa signing)."""
    wanted = {stage for stage, _ in CONFIGS[config]}
    tables: dict = {}
    if "attachments" in wanted:
        tables["content"] = {"reject_attachment_extensions": list(BLOCKED_EXTENSIONS), "tnef": "convert"}
    if "antivirus" in wanted:
        tables["antivirus"] = {"clamd": peers.clamd, "on_error": "tempfail"}
    if "milter" in wanted:
        tables["milter"] = [{"address": peers.milter, "default_action": "tempfail", "timeout_seconds": 30}]
    if "footer" in wanted:
        tables["footer"] = [{"sender_domain": SIGNING_DOMAIN, "text": "--\nSent through the bench relay",
                             "html": "<p>Sent through the bench relay</p>"}]
    if "dkim" in wanted:
        algorithm = "ed25519" if config == "dkim-ed25519" else "rsa"
        tables["dkim"] = [{"domain": SIGNING_DOMAIN, "selector": algorithm, "key_file": str(keys[algorithm])}]
    return tables


def content_decisions(control_port: int) -> dict[tuple[str, str], float]:
    """(stage, result) -> mta_content_decisions_total from mta's /metrics (none yet: {})."""
    return labelled_totals(control_port, "mta_content_decisions_total", ("stage", "result"))  # type: ignore[return-value]


def wait_metrics(control_port: int) -> str | None:
    deadline, why = time.monotonic() + METRICS_READY_SECONDS, "not tried"
    while time.monotonic() < deadline:
        try:
            content_decisions(control_port)
            return None
        except (OSError, ValueError) as exc:
            why = str(exc)
        time.sleep(0.2)
    return f"/metrics on {HOST}:{control_port} not ready within {METRICS_READY_SECONDS:.0f}s ({why})"


def decisions_check(config: str, before: dict, after: dict, accepted: int) -> str | None:
    """None when every stage of `config` decided once per accepted message as expected and
    nothing else was counted; otherwise what /metrics says instead."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in {*before, *after}}
    delta = {key: n for key, n in delta.items() if n}
    expected = {key: float(accepted) for key in CONFIGS[config]}
    if delta == expected:
        return None
    seen = ", ".join(f"{s}:{r}={n:.0f}" for (s, r), n in sorted(delta.items())) or "nothing"
    want = ", ".join(f"{s}:{r}={accepted}" for s, r in CONFIGS[config]) or "nothing"
    return (f"mta_content_decisions_total counted {seen} during the load; {config} expects {want} "
            f"(a stage that did not run, or did something else: see mta's log)")


def overlap_check(rate: float, sessions: int) -> str | None:
    """None when `sessions` waits of MILTER_SLEEP_SECONDS on the milter overlapped enough."""
    overlapped = sessions / MILTER_SLEEP_SECONDS
    if rate >= OVERLAP_FLOOR * overlapped:
        return None
    return (f"{rate:.1f} msg/s with {sessions} sessions waiting {MILTER_SLEEP_SECONDS} s each on the milter: "
            f"under {OVERLAP_FLOOR:.0%} of {overlapped:.0f} msg/s, the waits did not overlap (a blocked event loop?)")


def launch_content(config: str, port: int, control_port: int, workdir: Path, workers: int,
                   fixtures: Fixtures) -> Server:
    for sub in ("cur", "new", "tmp"):
        (workdir / "mail" / RCPT_DOMAIN / RCPT_USER / sub).mkdir(parents=True)
    path = write_config(workdir, port, workers, relay={"local_domains": [RCPT_DOMAIN]}, delivery={"workers": 0},
                        control={"listen": f"{HOST}:{control_port}", "metrics_dir": str(workdir / "metrics")},
                        dns=dead_dns(), **stage_tables(config, fixtures.peers, fixtures.keys))
    return Server(f"content-{config}", mta_launch(path, workers), workdir, port)


def load(port: int, args: argparse.Namespace, fixtures: Fixtures, config: str, messages: int, quiet: bool) -> dict:
    slow = config == SLOW_MILTER
    return run_loadgen(port, sessions=args.slow_milter_sessions if slow else args.sessions, messages=messages,
                       size=0, per_session=args.per_session, pipelining=args.pipelining,
                       timeout_seconds=args.timeout_seconds, quiet=quiet, sender=MILTER_SLEEPS if slow else
                       MILTER_CHANGES, message_file=str(fixtures.message_file))


def measure(config: str, repeat: int, args: argparse.Namespace, scratch: Path, fixtures: Fixtures) -> Outcome:
    label = f"content {config} repeat {repeat}/{args.repeat}"
    workdir = Path(tempfile.mkdtemp(prefix=f"content-{config}-r{repeat}-", dir=scratch))
    port, control_port = free_port(), free_port()
    server = launch_content(config, port, control_port, workdir, args.mta_worker_list[0], fixtures)
    peers = fixtures.peers
    log(f"{label}: starting on {HOST}:{port}, /metrics on {HOST}:{control_port}")
    messages = (args.slow_milter_sessions * args.slow_milter_rounds if config == SLOW_MILTER
                else args.messages)
    try:
        why = server.wait_ready(START_TIMEOUT_SECONDS) or wait_metrics(control_port)
        if why is not None:
            return Outcome(config, repeat, ok=False, error=f"failed to start: {why}", stderr_tail=server.log_tail())
        if args.warmup > 0:
            log(f"{label}: warm-up, {args.warmup} messages")
            load(port, args, fixtures, config, args.warmup, quiet=True)
        log(f"{label}: {messages} messages of {fixtures.message_bytes} bytes")
        before = content_decisions(control_port)
        busy0, children0, wall0 = machine_busy_seconds(), reaped_children_cpu_seconds(), time.monotonic()
        server_cpu0, peers_cpu0 = server.cpu_seconds(), peers.cpu_seconds()
        result = load(port, args, fixtures, config, messages, quiet=args.quiet)
        server_cpu, peers_cpu1 = server.cpu_seconds() - server_cpu0, peers.cpu_seconds()
        peers_cpu = {name: peers_cpu1[name] - peers_cpu0[name] for name in peers_cpu0}
        other_cpu = (machine_busy_seconds() - busy0 - server_cpu - sum(peers_cpu.values())
                     - (reaped_children_cpu_seconds() - children0))
        after = content_decisions(control_port)
        accepted = result["accepted"]
        result["config"] = config
        result["decisions"] = {f"{s}:{r}": n - before.get((s, r), 0.0) for (s, r), n in after.items()
                               if n != before.get((s, r), 0.0)}
        result["server_cpu_seconds"] = server_cpu
        result["server_cpu_us_per_message"] = server_cpu / accepted * 1e6 if accepted else None
        for name, seconds in peers_cpu.items():
            result[f"{name}_cpu_us_per_message"] = seconds / accepted * 1e6 if accepted else None
        wall = result["elapsed_seconds"]
        result["client_cpu_share"] = result["cpu_seconds"] / wall if wall > 0 else None
        result["other_cpu_share"] = max(other_cpu, 0.0) / max(time.monotonic() - wall0, 1e-9)
        outcome = Outcome(config, repeat, ok=True, result=result)
        if config == SLOW_MILTER:
            sessions = args.slow_milter_sessions
            result["overlapped_per_second"] = sessions / MILTER_SLEEP_SECONDS
            result["serial_per_second"] = args.mta_worker_list[0] / MILTER_SLEEP_SECONDS
        if not server.alive():
            outcome.error = f"mta exited with status {server.proc.returncode} during the load"
        elif accepted < messages:
            outcome.error = f"{messages - accepted} of {messages} not accepted: " + first_problems(result)
        else:
            outcome.error = decisions_check(config, before, after, accepted)
            if outcome.error is None and config == SLOW_MILTER:
                outcome.error = overlap_check(result["accepted_per_second"], args.slow_milter_sessions)
        if outcome.error:
            outcome.ok = False
            outcome.stderr_tail = server.log_tail()
        log(f"{label}: {accepted}/{messages} accepted, {result['accepted_per_second']:.0f} msg/s, "
            f"server CPU {server_cpu:.2f}s, peers " + ", ".join(f"{n} {s:.2f}s" for n, s in peers_cpu.items())
            + f", decisions {result['decisions'] or 'none'}" + (f"; FAILED: {outcome.error}" if outcome.error else ""))
        return outcome
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        return Outcome(config, repeat, ok=False, error=f"load run failed: {exc}", stderr_tail=server.log_tail())
    finally:
        server.stop()


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else ""


def peer_cell(s: Summary, stage: str, peer: str) -> str:
    """A peer's CPU per message, on the rows whose configuration uses it."""
    return cell(s, f"{peer}_cpu_us_per_message", 0) if any(st == stage for st, _ in CONFIGS[s.target]) else ""


def render_table(summaries: list[Summary]) -> str:
    base = summaries[0]  # "none"
    base_rate, base_cpu = base.median("accepted_per_second"), base.median("server_cpu_us_per_message")
    rows = ["| configuration | msg/s | vs none | p50 ms | server CPU µs/msg | vs none | + µs/msg "
            "| clamd µs/msg | milter µs/msg | stage decisions | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in summaries:
        if s.target == SLOW_MILTER:
            continue
        rate, cpu = s.median("accepted_per_second"), s.median("server_cpu_us_per_message")
        added = f"{cpu - base_cpu:+.0f}" if cpu is not None and base_cpu is not None and s is not base else ""
        checked = ", ".join(f"{stage}:{result}" for stage, result in CONFIGS[s.target]) if s.good else "-"
        notes = failed_note(s) + timeout_note(s) + machine_notes(s, "loadgen", ": client-bound, msg/s is a lower bound")
        rows.append(md_row(s.target, cell(s, "accepted_per_second", 0), "" if s is base else ratio(rate, base_rate),
                           cell(s, "latency_p50_ms", 2), cell(s, "server_cpu_us_per_message", 0),
                           "" if s is base else ratio(cpu, base_cpu), added, peer_cell(s, "antivirus", "clamd"),
                           peer_cell(s, "milter", "milter"), checked if s.target != "none" else "none counted",
                           notes_cell(notes)))
    return "\n".join(rows)


def render_slow(s: Summary, args: argparse.Namespace) -> str:
    rate, overlapped = s.median("accepted_per_second"), args.slow_milter_sessions / MILTER_SLEEP_SECONDS
    serial = args.mta_worker_list[0] / MILTER_SLEEP_SECONDS
    return (f"Milter round trips off the event loop: the milter sleeps {MILTER_SLEEP_SECONDS} s per message; "
            f"{args.slow_milter_sessions} sessions x {args.slow_milter_rounds} messages on "
            f"{args.mta_worker_list[0]} inbound worker(s): {cell(s, 'accepted_per_second', 1)} msg/s, "
            f"p50 {cell(s, 'latency_p50_ms', 0)} ms, against {overlapped:.0f} msg/s if the waits overlap fully "
            f"(N / delay) and {serial:.0f} msg/s if each blocked its worker: "
            + (f"{rate / overlapped:.0%} of N / delay." if rate else "no result.")
            + ("" if all(o.ok for o in s.outcomes) else f" {failed_note(s)[0]}"))


def run_content(args: argparse.Namespace, scratch: Path) -> tuple[str, dict, bool]:
    """Every configuration per repeat, interleaved: (the report, the JSON part, all ok)."""
    message_file = scratch / "content-message.eml"
    message = content_message(MESSAGE_BYTES, f"{RCPT_USER}@{RCPT_DOMAIN}")
    message_file.write_bytes(message)
    keys = write_dkim_keys(scratch)
    summaries = {config: Summary(config) for config in CONFIGS}
    try:
        with content_peers(scratch) as peers:
            fixtures = Fixtures(peers, keys, message_file, len(message))
            for repeat in range(1, args.repeat + 1):
                for config in CONFIGS:
                    summaries[config].outcomes.append(measure(config, repeat, args, scratch, fixtures))
    except RuntimeError as exc:
        log(f"content: FAILED: the peers: {exc}")
        return f"mta bench --content: FAILED, the peers (clamd, the libmilter milter): {exc}", {}, False
    ordered = list(summaries.values())
    report = report_text(
        f"mta bench --content: one {len(message)}-byte multipart message (text, HTML, a base64 PDF; From: in "
        f"{SIGNING_DOMAIN}), {args.messages} per run, {args.sessions} sessions, {args.per_session} per session, "
        f"{args.mta_worker_list[0]} inbound worker(s), delivery workers 0, {args.repeat} repeat(s), warm-up "
        f"{args.warmup}; `all` signs with the RSA key; a fresh mta per row and run, ratios against `none` of "
        f"this run. Each run checked against mta_content_decisions_total. \"+ µs/msg\": server CPU over "
        f"`none`'s. {machine_line()}",
        render_table(ordered), ordered, render_slow(summaries[SLOW_MILTER], args))
    doc = {"message_bytes": len(message),
           "rows": [{"config": s.target, "median_accepted_per_second": s.median("accepted_per_second"),
                     "median_server_cpu_us_per_message": s.median("server_cpu_us_per_message"),
                     "median_clamd_cpu_us_per_message": s.median("clamd_cpu_us_per_message"),
                     "median_milter_cpu_us_per_message": s.median("milter_cpu_us_per_message"),
                     "runs": [vars(o) for o in s.outcomes]} for s in ordered]}
    return report, doc, all(o.ok for s in ordered for o in s.outcomes)
