"""bench/run --cluster: what the shared limits cost per message, [cluster] against none.

Two mta nodes on loopback (their own SMTP and control ports, spools), one private
redis-server (no persistence, a free port) and one counting sink (peers.CountingSink),
the route of e2e.test for both nodes. Per repeat, two phases in this invocation, each
on two fresh nodes: `local` (no [cluster]) and `cluster` ([cluster] redis: the private
one). Both have the same limits, set so that every shared path runs and none refuses
or waits: per client IP windows for connections, messages and recipients (LIMIT_WINDOW
each, exempt_mynetworks = false since every session comes from 127.0.0.1) inbound, and
[domains."e2e.test"] concurrency and max_messages_per_second outbound. The load: a
warm-up, waited for at the sink, then --messages split over the two nodes, a loadgen
on each at the same time (--sessions split likewise).

Figures, each also as a ratio to `local` of the same invocation:
- Redis calls per accepted message, per command: INFO commandstats read before the
  load and after the last arrival at the sink (so the deliveries' lease and token
  calls and the lease renewals of that window count); the bench's own INFO excluded;
- ingest msg/s (accepted over the longer of the two loadgen runs), end-to-end msg/s
  (first connect to the last arrival), server CPU per message (both nodes' process
  groups), redis-server CPU per message.
Each run is checked against the nodes' own mta_cluster_shared_decisions_total: in
`cluster`, every configured limit decided `allowed` on each node and nothing was
refused or waited for long; in `local`, nothing at all. A run that misses is FAILED
(a cluster that silently decided locally must not pass for a cheap one).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import redis as redispy  # mta's own dependency
from clients import run_loadgen
from mtaconf import dead_dns, labelled_totals, mta_launch, write_config
from peers import E2E_DOMAIN, CountingSink
from procs import HOST, Server, free_port, log, tail
from procstat import machine_line, process_cpu_seconds
from results import (
    Outcome,
    Summary,
    cell,
    failed_note,
    md_row,
    notes_cell,
    report_text,
    timeout_note,
)

REDIS_SERVER: Final = "/usr/bin/redis-server"
START_TIMEOUT_SECONDS: Final = 20.0
NODES: Final = ("a", "b")
PHASES: Final = ("local", "cluster")
RCPT: Final = f"user@{E2E_DOMAIN}"
LIMIT_WINDOW: Final = 10_000_000  # per IP per window: counted in Redis, never reached
CONCURRENCY: Final = 20  # [domains."e2e.test"]: per node in `local`, the cluster's total in `cluster`
MESSAGES_PER_SECOND: Final = 5000.0  # [domains."e2e.test"] max_messages_per_second, likewise
# What each node must have decided `allowed` in the cluster phase: every shared path ran.
SHARED_LIMITS: Final = ("connection_rate", "message_rate", "recipient_rate", "concurrency", "rate")


def cluster_runs() -> bool:
    """Whether this machine can run the mode (--smoke skips it otherwise)."""
    return os.access(REDIS_SERVER, os.X_OK)


class RedisPeer:
    """A private redis-server on a free loopback port: nothing saved, stopped by pid."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(workdir)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

        self._client = redispy.Redis(host=HOST, port=self.port, socket_timeout=5)  # one connection, kept

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def wait_ready(self, timeout: float) -> str | None:
        deadline, why = time.monotonic() + timeout, "not tried"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"redis-server exited {self.proc.returncode}: {tail(self.log_path)}"
            try:
                self._client.ping()
                return None
            except (OSError, redispy.RedisError) as exc:
                why = str(exc)
            time.sleep(0.1)
        return f"redis-server on {HOST}:{self.port} not answering within {timeout:.0f}s ({why})"

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(reply writes, calls per command) so far, in one INFO: a round trip is one reply
        write (total_writes_processed: a pipeline's replies go in one), while commandstats
        also counts the commands a script runs inside Redis."""
        info = self._client.info("all")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()
                 if name.startswith("cmdstat_")}
        return int(info["total_writes_processed"]), calls

    def between(self, before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]
                ) -> tuple[int, dict[str, int]]:
        """The nodes' round trips and calls per command between two snapshots (the bench's
        own INFO left out: one round trip, its `info` calls)."""
        calls = {name: n - before[1].get(name, 0) for name, n in after[1].items()
                 if n != before[1].get(name, 0) and name != "info"}
        return after[0] - before[0] - 1, calls

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid) or 0.0

    def stop(self) -> None:
        self._client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Node:
    name: str
    server: Server
    control_port: int


def launch_node(name: str, phase: str, workdir: Path, args: argparse.Namespace, sink_port: int,
                redis_url: str) -> Node:
    port, control_port = free_port(), free_port()
    config = write_config(
        workdir, port, args.mta_worker_list[0], hostname=f"{name}.bench",
        relay={"relay_domains": [E2E_DOMAIN]}, delivery={"workers": args.delivery_workers},
        rate={"window_seconds": 60, "connections_per_window": LIMIT_WINDOW, "messages_per_window": LIMIT_WINDOW,
              "recipients_per_window": LIMIT_WINDOW, "exempt_mynetworks": False},
        control={"listen": f"{HOST}:{control_port}", "metrics_dir": str(workdir / "metrics")},
        **{f'domains."{E2E_DOMAIN}"': {"concurrency": CONCURRENCY, "max_messages_per_second": MESSAGES_PER_SECOND},
           "routes": {E2E_DOMAIN: f"{HOST}:{sink_port}"}, "dns": dead_dns()},
        **({"cluster": {"redis": redis_url, "node": name}} if phase == "cluster" else {}))
    return Node(name, Server(f"{phase}-{name}", mta_launch(config, args.mta_worker_list[0]), workdir, port),
                control_port)


def shared_decisions(control_port: int) -> dict[tuple[str, str], float]:
    """(limit, result) -> mta_cluster_shared_decisions_total on one node's /metrics."""
    return labelled_totals(control_port, "mta_cluster_shared_decisions_total", ("limit", "result"))  # type: ignore[return-value]


def decisions_check(phase: str, per_node: dict[str, dict[tuple[str, str], float]]) -> str | None:
    """None when the phase's nodes decided what it configures: see the header."""
    for node, decisions in per_node.items():
        if phase == "local" and decisions:
            return f"node {node} counted shared decisions without [cluster]: {decisions}"
        if phase == "cluster":
            missing = [limit for limit in SHARED_LIMITS if not decisions.get((limit, "allowed"))]
            if missing:
                return (f"node {node}: no `allowed` decision for {', '.join(missing)} (a shared path that did "
                        f"not run); counted: {decisions or 'nothing'}")
            odd = {k: n for k, n in decisions.items() if k[1] in ("refused", "local", "tempfail")}
            if odd:
                return f"node {node}: the limits refused or Redis was down during the load: {odd}"
    return None


def parallel_loads(nodes: list[Node], args: argparse.Namespace, messages: int, quiet: bool) -> list[dict]:
    """One loadgen per node at the same time, the messages and sessions split between them."""
    results: list[dict | BaseException] = [RuntimeError("no result")] * len(nodes)

    def one(i: int, node: Node) -> None:
        share = messages // len(nodes) + (1 if i < messages % len(nodes) else 0)
        try:
            results[i] = run_loadgen(node.server.port, sessions=max(args.sessions // len(nodes), 1),
                                     messages=share, size=args.size, per_session=args.per_session,
                                     pipelining=args.pipelining, timeout_seconds=args.timeout_seconds,
                                     quiet=quiet, rcpt=RCPT)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, node)) for i, node in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise RuntimeError(f"a loadgen run failed: {result}")
    return results  # type: ignore[return-value]


def measure(phase: str, repeat: int, args: argparse.Namespace, scratch: Path, sink: CountingSink,
            redis: RedisPeer) -> Outcome:
    label = f"cluster bench {phase} repeat {repeat}/{args.repeat}"
    nodes = [launch_node(name, phase, Path(tempfile.mkdtemp(prefix=f"cluster-{phase}-{name}-r{repeat}-",
                                                            dir=scratch)), args, sink.port, redis.url)
             for name in NODES]
    log(f"{label}: nodes on " + ", ".join(f"{HOST}:{n.server.port}" for n in nodes)
        + (f", [cluster] redis {redis.url}" if phase == "cluster" else ", no [cluster]"))
    try:
        for node in nodes:
            why = node.server.wait_ready(START_TIMEOUT_SECONDS)
            if why is not None:
                return Outcome(phase, repeat, ok=False, error=f"node {node.name} failed to start: {why}",
                               stderr_tail=node.server.log_tail())
        if args.warmup > 0:
            log(f"{label}: warm-up, {args.warmup} messages over both nodes, waiting for them at the sink")
            base = sink.count()
            warm = sum(r["accepted"] for r in parallel_loads(nodes, args, args.warmup, quiet=True))
            if sink.wait_for(base + warm, time.monotonic() + args.timeout_seconds) is None:
                return Outcome(phase, repeat, ok=False, error=f"warm-up: {sink.count() - base} of {warm} arrived "
                               f"within {args.timeout_seconds:.0f}s", stderr_tail=nodes[0].server.log_tail())
            sink.wait_quiet(0.5, 5.0)
        log(f"{label}: {args.messages} messages, {args.sessions} sessions over both nodes")
        decisions0 = {n.name: shared_decisions(n.control_port) for n in nodes}
        base, redis0, redis_cpu0 = sink.count(), redis.snapshot(), redis.cpu_seconds()
        server_cpu0 = sum(n.server.cpu_seconds() for n in nodes)
        kinds0 = [n.server.cpu_by_kind() for n in nodes]
        results = parallel_loads(nodes, args, args.messages, quiet=args.quiet)
        accepted = sum(r["accepted"] for r in results)
        started = min(r["started_monotonic"] for r in results)
        ingest_seconds = max(r["started_monotonic"] + r["elapsed_seconds"] for r in results) - started
        arrival = sink.wait_for(base + accepted, started + args.timeout_seconds) if accepted else None
        server_cpu = sum(n.server.cpu_seconds() for n in nodes) - server_cpu0
        redis_cpu = redis.cpu_seconds() - redis_cpu0
        kinds: dict[str, float] = {}  # where the nodes' CPU went, both nodes together
        for node, before in zip(nodes, kinds0):
            for kind, seconds in node.server.cpu_by_kind().items():
                kinds[kind] = kinds.get(kind, 0.0) + seconds - before.get(kind, 0.0)
        round_trips, calls = redis.between(redis0, redis.snapshot())
        decisions = {n.name: {k: v - decisions0[n.name].get(k, 0.0) for k, v in shared_decisions(n.control_port).items()
                              if v != decisions0[n.name].get(k, 0.0)} for n in nodes}
        end = arrival if arrival is not None else time.monotonic()
        result = {
            "accepted": accepted, "messages": args.messages, "arrived": min(sink.count() - base, accepted),
            "accepted_per_second": accepted / max(ingest_seconds, 1e-9),
            "e2e_per_second": accepted / max(end - started, 1e-9) if arrival is not None else None,
            "server_cpu_us_per_message": server_cpu / accepted * 1e6 if accepted else None,
            "server_cpu_us_per_message_by_process": {
                kind: round(seconds / accepted * 1e6, 1) for kind, seconds in sorted(kinds.items())} if accepted else {},
            "redis_cpu_us_per_message": redis_cpu / accepted * 1e6 if accepted else None,
            "redis_round_trips_per_message": round_trips / accepted if accepted else None,
            "redis_calls_per_message": sum(calls.values()) / accepted if accepted else None,
            "redis_calls_by_command": {name: n / accepted for name, n in sorted(calls.items())} if accepted else {},
            "decisions": {node: {f"{limit}:{res}": n for (limit, res), n in sorted(d.items())}
                          for node, d in decisions.items()},
            "timed_out": any(r["timed_out"] for r in results),
            "loadgen": results,
        }
        outcome = Outcome(phase, repeat, ok=True, result=result)
        dead = [n for n in nodes if not n.server.alive()]
        if dead:
            outcome.error = f"node {dead[0].name} exited during the load"
        elif accepted < args.messages:
            outcome.error = f"{args.messages - accepted} of {args.messages} not accepted: " + "; ".join(
                e for r in results for e in r["first_errors"][:1]) + f" {[r['rejected_by_code'] for r in results]}"
        elif arrival is None:
            outcome.error = f"only {result['arrived']} of {accepted} arrived within {args.timeout_seconds:.0f}s"
        else:
            outcome.error = decisions_check(phase, decisions)
            if outcome.error is None and phase == "local" and (calls or round_trips):
                outcome.error = f"Redis was called without [cluster]: {round_trips} round trips, {calls}"
        if outcome.error:
            outcome.ok = False
            outcome.stderr_tail = "\n".join(f"[{n.name}] {n.server.log_tail()}" for n in nodes)
        log(f"{label}: {accepted}/{args.messages} accepted at {result['accepted_per_second']:.0f} msg/s, "
            f"end-to-end {result['e2e_per_second'] or 0:.0f} msg/s, server CPU {server_cpu:.2f}s, "
            f"Redis {round_trips} round trips ({result['redis_round_trips_per_message'] or 0:.2f}/msg), "
            f"{sum(calls.values())} commands"
            + (f"; FAILED: {outcome.error}" if outcome.error else ""))
        return outcome
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        return Outcome(phase, repeat, ok=False, error=f"load run failed: {exc}",
                       stderr_tail=nodes[0].server.log_tail())
    finally:
        for node in nodes:
            node.server.stop()


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else ""


def render_table(local: Summary, cluster: Summary) -> str:
    rows = ["| run | ingest msg/s | vs local | end-to-end msg/s | vs local | server CPU µs/msg | vs local "
            "| redis-server CPU µs/msg | Redis round trips/msg | Redis commands/msg | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in (local, cluster):
        ratios = ["" if s is local else ratio(s.median(key), local.median(key))
                  for key in ("accepted_per_second", "e2e_per_second", "server_cpu_us_per_message")]
        rows.append(md_row(s.target, cell(s, "accepted_per_second", 0), ratios[0], cell(s, "e2e_per_second", 0),
                           ratios[1], cell(s, "server_cpu_us_per_message", 0), ratios[2],
                           cell(s, "redis_cpu_us_per_message", 0), cell(s, "redis_round_trips_per_message", 2),
                           cell(s, "redis_calls_per_message", 2),
                           notes_cell(failed_note(s) + timeout_note(s))))
    return "\n".join(rows)


def render_commands(cluster: Summary) -> str:
    runs = cluster.good
    if not runs:
        return ""
    names = sorted({name for r in runs for name in r["redis_calls_by_command"]})
    per = {name: sorted(r["redis_calls_by_command"].get(name, 0.0) for r in runs) for name in names}
    shown = ", ".join(f"{name} {values[len(values) // 2]:.3f}" for name, values in per.items())
    return (f"Redis commands per message (cluster, median; INFO commandstats, which counts the commands a "
            f"script runs inside Redis too, so evalsha is the scripts' round trips): {shown or 'none'}. "
            f"Shared decisions on node a, per message: " + ", ".join(
                f"{k} {v / runs[0]['accepted'] * len(NODES):.2f}" for k, v in runs[0]["decisions"]["a"].items())
            + " (node a took half the messages).")


def render_processes(local: Summary, cluster: Summary) -> str:
    """Server CPU µs per message by kind of mta process, both phases (the first good run each)."""
    parts = []
    for s in (local, cluster):
        if s.good:
            by_kind = s.good[0]["server_cpu_us_per_message_by_process"]
            parts.append(f"{s.target}: " + ", ".join(f"{kind} {us:.0f}" for kind, us in by_kind.items()))
    return ("Server CPU µs per message by process (both nodes, first run): " + "; ".join(parts) + ".") if parts else ""


def run_cluster(args: argparse.Namespace, scratch: Path) -> tuple[str, dict, bool]:
    """Both phases per repeat, interleaved: (the report, the JSON part, all ok)."""
    summaries = {phase: Summary(phase) for phase in PHASES}
    redis = RedisPeer(scratch)
    sink = CountingSink(args.sink, free_port(), scratch)
    try:
        why = redis.wait_ready(START_TIMEOUT_SECONDS) or sink.wait_ready(START_TIMEOUT_SECONDS)
        if why is not None:
            log(f"cluster: FAILED: {why}")
            return f"mta bench --cluster: FAILED, the peers (redis-server, the sink): {why}", {}, False
        log(f"cluster: redis-server on {HOST}:{redis.port}, sink {sink.kind} on {HOST}:{sink.port}")
        for repeat in range(1, args.repeat + 1):
            for phase in PHASES:
                summaries[phase].outcomes.append(measure(phase, repeat, args, scratch, sink, redis))
    finally:
        sink.stop()
        redis.stop()
    local, cluster = summaries["local"], summaries["cluster"]
    report = report_text(
        f"mta bench --cluster: two mta nodes ({args.mta_worker_list[0]} inbound worker(s), "
        f"{args.delivery_workers} delivery worker(s) each) relaying {E2E_DOMAIN} to one sink, {args.messages} "
        f"messages of {args.size} B per run split over both, {args.sessions} sessions, {args.per_session} per "
        f"session, warm-up {args.warmup}, {args.repeat} repeat(s); `cluster` with [cluster] redis (one private "
        f"redis-server), `local` without; the same limits in both: per-IP connection, message and recipient "
        f"windows, {E2E_DOMAIN} concurrency {CONCURRENCY} and max_messages_per_second {MESSAGES_PER_SECOND:.0f} "
        f"(per node in `local`, cluster totals in `cluster`), none reached. {machine_line()}",
        render_table(local, cluster), [local, cluster], render_commands(cluster), render_processes(local, cluster))
    doc = {"rows": [{"phase": s.target, **{f"median_{key}": s.median(key) for key in (
        "accepted_per_second", "e2e_per_second", "server_cpu_us_per_message", "redis_cpu_us_per_message",
        "redis_round_trips_per_message", "redis_calls_per_message")}, "runs": [vars(o) for o in s.outcomes]} for s in (local, cluster)]}
    return report, doc, all(o.ok for s in (local, cluster) for o in s.outcomes)
