"""bench/run --auth: SMTP AUTH logins per second, the auth cache cold, then warm.

mta alone, with one submission listener offering AUTH without TLS (auth_plaintext, a
loopback-only setting: the run measures the login path, not TLS handshakes) and a
users file of N users. For each repeat and worker count: a fresh mta (fresh, empty
auth cache), a warm-up by one separate user, then authload.py logs each user in once
(cold: one scrypt per login) and then cycles over them again (warm: cache hits).
mta's own counters (mta_auth_cache_misses_total, mta_auth_cache_hits_total on its
/metrics) must confirm each phase, else the run FAILED. [control] listens on its own
loopback port; [dns] points at a dead loopback port, as in --e2e.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clients import run_authload
from mtaconf import dead_dns, mta_launch, write_config
from procs import HOST, REPO_ROOT, Launch, Server, free_port, log
from procstat import machine_busy_seconds, machine_line, reaped_children_cpu_seconds
from results import (Outcome, Summary, cell, count_cell, failed_note, first_problems, fmt, machine_notes,
                     md_row, notes_cell, problem_kinds, report_text, share_cell, shortfalls, timeout_note)
from targets import MTA_WORKER_TITLE

START_TIMEOUT_SECONDS: Final = 15.0
AUTH_USER_PREFIX: Final = "bench"
AUTH_WARMUP_USER_PREFIX: Final = "warmup"  # one user, logged in by the warm-up only
AUTH_PASSWORD: Final = "bench password"
AUTH_PHASES: Final = ("cold", "warm")
# How long mta's control process may take to serve /metrics after the greeting.
METRICS_READY_SECONDS: Final = 15.0


def launch_mta_auth(port: int, workdir: Path, workers: int, users_file: Path,
                    control_port: int) -> Launch:
    config = write_config(workdir, port, workers, listener={"mode": "submission", "auth_plaintext": True},
                          queue={"path": str(workdir / "spool")}, delivery={"workers": 0},
                          auth={"users_file": str(users_file), "cache_ttl_seconds": 3600},
                          control={"listen": f"{HOST}:{control_port}",
                                   "metrics_dir": str(workdir / "metrics")},
                          dns=dead_dns())
    return mta_launch(config, workers)


def write_auth_users(path: Path, count: int) -> None:
    """The users file: <prefix>0..N-1 and one warm-up user, all with AUTH_PASSWORD.

    Written with mta's own users module (one scrypt per user, as `mta users add` would
    do, in two threads: hashlib.scrypt releases the GIL) instead of N `mta users add`
    processes."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # the repo's own mta, as mta_command runs it
    from mta.users import User, hash_password, save_users

    names = [f"{AUTH_USER_PREFIX}{i}" for i in range(count)] + [f"{AUTH_WARMUP_USER_PREFIX}0"]
    log(f"auth: hashing {len(names)} passwords for {path.name} (scrypt, ~25 ms each)")
    with ThreadPoolExecutor(2) as pool:
        hashes = list(pool.map(lambda _: hash_password(AUTH_PASSWORD), names))
    save_users(str(path), {n: User(n, h) for n, h in zip(names, hashes)})


def auth_cache_counters(control_port: int) -> tuple[float, float]:
    """(mta_auth_cache_hits_total, mta_auth_cache_misses_total) from mta's /metrics."""
    # No proxy, whatever the environment says: this is 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{HOST}:{control_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for name in ("mta_auth_cache_hits_total", "mta_auth_cache_misses_total"):
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith((name + " ", name + "{"))]
        if not values:
            raise RuntimeError(f"/metrics on {HOST}:{control_port} has no {name}")
        found[name] = sum(values)
    return found["mta_auth_cache_hits_total"], found["mta_auth_cache_misses_total"]


def wait_metrics(control_port: int, timeout: float) -> str | None:
    """None once /metrics has the auth counters; otherwise why not."""
    deadline = time.monotonic() + timeout
    why = "not tried"
    while time.monotonic() < deadline:
        try:
            auth_cache_counters(control_port)
            return None
        except (OSError, RuntimeError, ValueError) as exc:
            why = str(exc)
        time.sleep(0.2)
    return f"/metrics on {HOST}:{control_port} not ready within {timeout:.0f}s ({why})"


def auth_phase(phase: str, server: Server, port: int, control_port: int, args: argparse.Namespace,
               label: str) -> dict:
    """One measured phase: the logins, the server's CPU and the cache counters around them.

    cold: each user once (args.auth_users logins), none of them cached yet: every login
    must be a cache miss. warm: args.auth_logins logins cycling over the same users, all
    cached by the cold phase: every login must be a hit. `phase_check` says if /metrics
    agrees."""
    logins = args.auth_users if phase == "cold" else args.auth_logins
    log(f"{label}: {phase}: {logins} logins over {args.auth_users} users, "
        f"{args.sessions} sessions")
    hits0, misses0 = auth_cache_counters(control_port)
    busy0, children0, wall0 = (machine_busy_seconds(), reaped_children_cpu_seconds(),
                               time.monotonic())
    server_cpu0 = server.cpu_seconds()
    result = run_authload(port, args, logins, args.auth_users, AUTH_USER_PREFIX, AUTH_PASSWORD, args.quiet)
    server_cpu = server.cpu_seconds() - server_cpu0
    other_cpu = (machine_busy_seconds() - busy0 - server_cpu
                 - (reaped_children_cpu_seconds() - children0))
    hits1, misses1 = auth_cache_counters(control_port)
    result["phase"] = phase
    result["cache_hits"] = hits1 - hits0
    result["cache_misses"] = misses1 - misses0
    expected = ((result["ok"], 0) if phase == "cold" else (0, result["ok"]))  # (misses, hits)
    got = (result["cache_misses"], result["cache_hits"])
    result["phase_check"] = None if got == expected else (
        f"{phase} phase: /metrics counted {got[0]:.0f} cache misses and {got[1]:.0f} hits for "
        f"{result['ok']} logins, expected {expected[0]} and {expected[1]}")
    result["server_cpu_seconds"] = server_cpu
    result["server_cpu_us_per_login"] = server_cpu / result["ok"] * 1e6 if result["ok"] else None
    wall = result["elapsed_seconds"]
    result["client_cpu_share"] = result["cpu_seconds"] / wall if wall > 0 else None
    result["other_cpu_share"] = max(other_cpu, 0.0) / max(time.monotonic() - wall0, 1e-9)
    log(f"{label}: {phase}: {result['ok']}/{logins} logins, {result['logins_per_second']:.0f} "
        f"logins/s, AUTH p50 {fmt(result['latency_p50_ms'])} ms, p99 "
        f"{fmt(result['latency_p99_ms'])} ms, server CPU {server_cpu:.2f}s, cache "
        f"{result['cache_misses']:.0f} misses / {result['cache_hits']:.0f} hits")
    return result


def measure_auth(workers: int, repeat: int, args: argparse.Namespace, scratch: Path,
                 users_file: Path) -> dict[str, Outcome]:
    """A fresh mta (fresh, empty auth cache), warm-up, then the cold and the warm phase."""
    target = f"mta-{workers}w"
    label = f"auth {target} repeat {repeat}/{args.repeat}"
    workdir = Path(tempfile.mkdtemp(prefix=f"auth-{target}-r{repeat}-", dir=scratch))
    port, control_port = free_port(), free_port()
    launch = launch_mta_auth(port, workdir, workers, users_file, control_port)
    log(f"{label}: starting on {HOST}:{port} (submission, plaintext AUTH), "
        f"/metrics on {HOST}:{control_port}")
    server = Server(target, launch, workdir, port)
    outcomes: dict[str, Outcome] = {}

    def failed(error: str) -> dict[str, Outcome]:
        """Every phase without an outcome fails with `error`; mta's log is shown once."""
        shown = any(o.stderr_tail is not None for o in outcomes.values())
        for phase in AUTH_PHASES:
            outcomes.setdefault(phase, Outcome(target, repeat, ok=False, error=error,
                                               stderr_tail=None if shown else server.log_tail()))
            shown = True
        return outcomes

    try:
        why = server.wait_ready(START_TIMEOUT_SECONDS) or wait_metrics(control_port,
                                                                      METRICS_READY_SECONDS)
        if why is not None:
            return failed(f"failed to start: {why}")
        if args.warmup > 0:
            # One separate user: the first login runs scrypt, the rest are hits. Warms
            # the workers (first sessions, the scrypt threads, the LMDB cache) and
            # leaves every bench user uncached.
            log(f"{label}: warm-up, {args.warmup} logins of {AUTH_WARMUP_USER_PREFIX}0")
            run_authload(port, args, args.warmup, 1, AUTH_WARMUP_USER_PREFIX, AUTH_PASSWORD, quiet=True)
        workers_seen = server.children_titled(MTA_WORKER_TITLE)
        for phase in AUTH_PHASES:
            result = auth_phase(phase, server, port, control_port, args, label)
            result["mta_workers_seen"] = workers_seen
            outcome = Outcome(target, repeat, ok=result["ok"] > 0 and not result["phase_check"],
                              result=result)
            if not server.alive():
                outcome.ok = False
                outcome.error = f"mta exited with status {server.proc.returncode} during the load"
            elif result["ok"] == 0:
                outcome.error = "no login succeeded: " + first_problems(result)
            elif result["phase_check"]:
                outcome.error = result["phase_check"]
            if outcome.error:
                outcome.stderr_tail = server.log_tail()
            outcomes[phase] = outcome
            if not outcome.ok:
                return failed(f"not run: the {phase} phase failed")
        return outcomes
    except (subprocess.TimeoutExpired, RuntimeError, OSError) as exc:
        return failed(f"load run failed: {exc}")
    finally:
        server.stop()


@dataclass
class AuthSummary(Summary):
    workers: int = 1  # [server] inbound_workers
    phase: str = ""
    logins: int = 0  # requested per run


def render_auth_table(summaries: list[AuthSummary], args: argparse.Namespace) -> str:
    cold_rate = {s.target: s.median("logins_per_second") for s in summaries if s.phase == "cold"}
    rows = ["| target | phase | logins | logins/s | vs cold | AUTH p50 ms | AUTH p99 ms "
            "| server CPU µs/login | cache misses / hits | authload CPU | notes |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        rate = s.median("logins_per_second")
        cold = cold_rate.get(s.target)
        ratio = f"{rate / cold:.1f}x" if s.phase != "cold" and rate is not None and cold else ""
        notes = failed_note(s)
        seen = sorted({r["mta_workers_seen"] for r in s.good})
        if seen and seen != [s.workers]:
            notes.append(f"saw {'/'.join(map(str, seen))} inbound workers, expected {s.workers}")
        shorts = shortfalls(s, "logins", "ok")
        if shorts and shorts[-1]:
            notes.append(f"up to {shorts[-1]} not logged in ({problem_kinds(s)}; see JSON)")
        notes += timeout_note(s)
        notes += machine_notes(s, "authload", ": client-bound, logins/s is a lower bound")
        rows.append(md_row(
            s.target, s.phase, f"{count_cell(s, 'ok')}/{s.logins}", cell(s, "logins_per_second", 0), ratio,
            cell(s, "latency_p50_ms", 2), cell(s, "latency_p99_ms", 2), cell(s, "server_cpu_us_per_login", 0),
            f"{count_cell(s, 'cache_misses')} / {count_cell(s, 'cache_hits')}",
            share_cell(s.median("client_cpu_share")), notes_cell(notes)))
    return "\n".join(rows)


def run_auth(args: argparse.Namespace, scratch: Path) -> tuple[str, dict, bool]:
    """Cold and warm logins for each --mta-workers count: (the report, the JSON part, all ok)."""
    users_file = scratch / "auth-users"
    write_auth_users(users_file, args.auth_users)
    logins = {"cold": args.auth_users, "warm": args.auth_logins}
    summaries = {(w, phase): AuthSummary(f"mta-{w}w", workers=w, phase=phase, logins=logins[phase])
                 for w in args.mta_worker_list for phase in AUTH_PHASES}
    for repeat in range(1, args.repeat + 1):
        for workers in args.mta_worker_list:
            for phase, outcome in measure_auth(workers, repeat, args, scratch, users_file).items():
                summaries[(workers, phase)].outcomes.append(outcome)
    ordered = list(summaries.values())
    ratios = []
    for w in args.mta_worker_list:
        cold, warm = summaries[(w, "cold")], summaries[(w, "warm")]
        rc, rw = cold.median("logins_per_second"), warm.median("logins_per_second")
        pc, pw = cold.median("latency_p50_ms"), warm.median("latency_p50_ms")
        if rc and rw and pc and pw:
            ratios.append(f"mta-{w}w: {rw / rc:.1f}x the logins/s, "
                          f"AUTH p50 {pc / pw:.0f}x shorter")
    report = report_text(f"mta bench --auth: {args.auth_users} users, cold = each logs in once (scrypt, "
                         f"fresh cache), warm = {args.auth_logins} logins of the same users (cache hits); "
                         f"{args.sessions} sessions, one EHLO + AUTH PLAIN + QUIT per connection, "
                         f"{args.repeat} repeat(s), warm-up {args.warmup} logins. Plaintext AUTH on "
                         f"127.0.0.1 (auth_plaintext = true), no TLS: a handshake per login would add "
                         f"its own cost and hide part of the auth cost. Phases checked against mta's "
                         f"mta_auth_cache_misses_total / mta_auth_cache_hits_total. {machine_line()}",
                         render_auth_table(ordered, args), ordered,
                         "warm/cold: " + "; ".join(ratios) if ratios else "")
    doc = {"users": args.auth_users, "warm_logins": args.auth_logins,
           "rows": [{"target": s.target, "phase": s.phase, "logins": s.logins,
                     "median_logins_per_second": s.median("logins_per_second"),
                     "median_latency_p50_ms": s.median("latency_p50_ms"),
                     "median_latency_p99_ms": s.median("latency_p99_ms"),
                     "median_server_cpu_us_per_login": s.median("server_cpu_us_per_login"),
                     "runs": [vars(o) for o in s.outcomes]} for s in ordered]}
    return report, doc, all(o.ok for s in ordered for o in s.outcomes)
