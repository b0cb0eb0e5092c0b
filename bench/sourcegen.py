#!/usr/bin/env python3
"""Postfix's smtp-source as a second load generator, timed and reported like loadgen.

Owns the driver of a client nobody here wrote. smtp-source (/usr/sbin, in the postfix
package) runs N sessions that send M messages in total, each with `-l` bytes of body
after four header lines; one connection per message unless `-d` (then each session
keeps its connection for every message it sends); it never pipelines; it stops at the
first reply that is not 2xx ("fatal: ... rejected"). It measures nothing itself, so:

- the clock runs from spawning it to its exit (its last 250, then QUIT), or to the
  moment this module stops it: with `duration_seconds` it is stopped (SIGTERM) then,
  which is how bench/run --sweep gives it a run length (it has no option for one);
- its exit status is the verdict: 0 means every message got its 250 (accepted = M);
- its `-c` counter ticks once per DATA command answered 354, i.e. per message *sent*
  (not yet accepted): for a run that was stopped, it is an upper bound of what was
  accepted (`accepted_is_upper_bound`); bench/run --sweep replaces it with the
  server's own count (the sink's arrivals, the spool's files);
- there is no latency: those fields are None (a report says n/a).

Invariants: the process is stopped (SIGTERM, then SIGKILL) at `duration_seconds`
or at `timeout_seconds`, whichever comes first; every wait is bounded; only the
given host:port is contacted (numeric, no lookup: smtp-source resolves a numeric
address without DNS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Final

SMTP_SOURCE: Final = Path("/usr/sbin/smtp-source")
COUNTER: Final = re.compile(rb"(\d+)\r")
STOP_GRACE_SECONDS: Final = 2.0
STDERR_KEEP_BYTES: Final = 4096


def available() -> bool:
    return SMTP_SOURCE.exists()


class _Pipes:
    """Reader threads: the counter (stdout, "N\\r" per tick) and the stderr tail."""

    def __init__(self, proc: subprocess.Popen):
        self.count = 0
        self.last_tick = 0.0  # time.monotonic() of the last counter increase
        self.stderr = b""
        self._threads = [threading.Thread(target=self._read_counter, args=(proc.stdout,),
                                          name="source-counter", daemon=True),
                         threading.Thread(target=self._read_stderr, args=(proc.stderr,),
                                          name="source-stderr", daemon=True)]
        for t in self._threads:
            t.start()

    def _read_counter(self, pipe) -> None:
        pending = b""
        while True:
            chunk = pipe.read1(65536)
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk
            ticks = COUNTER.findall(pending)
            pending = pending[pending.rfind(b"\r") + 1:]
            if ticks:
                value = int(ticks[-1])
                if value > self.count:
                    self.count, self.last_tick = value, now

    def _read_stderr(self, pipe) -> None:
        while True:
            chunk = pipe.read1(65536)
            if not chunk:
                return
            self.stderr = (self.stderr + chunk)[-STDERR_KEEP_BYTES:]

    def join(self) -> None:
        for t in self._threads:
            t.join(5)


def run_source(host: str, port: int, sessions: int, messages: int, size: int = 1024,
               per_session: int = 1, *, sender: str = "bench@client.test",
               rcpt: str = "user@local.test", ehlo_name: str = "client.test",
               timeout_seconds: float = 120.0, duration_seconds: float | None = None) -> dict:
    """Run smtp-source once; a dict with loadgen's LoadResult keys (and a few more).

    duration_seconds: stop it then (a normal end: `stopped_at_deadline`);
    timeout_seconds: the cap for a run that should have ended (`timed_out`)."""
    if sessions < 1 or messages < 1 or per_session < 1 or size < 0:
        raise ValueError("sessions, messages and per_session must be >= 1; size >= 0")
    argv = [str(SMTP_SOURCE), "-c", "-s", str(sessions), "-m", str(messages),
            "-l", str(size), "-f", sender, "-t", rcpt, "-M", ehlo_name]
    if per_session > 1:
        argv.append("-d")  # every message of a session over one connection
    argv.append(f"{host}:{port}")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    pipes = _Pipes(proc)
    # os.wait4 in a thread: the exit time to the millisecond, and this child's own
    # rusage (its CPU) whatever other children the caller has.
    exited: dict = {}

    def reap() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        exited.update(at=time.monotonic(), status=status, usage=usage)

    reaper = threading.Thread(target=reap, name="source-reaper", daemon=True)
    reaper.start()
    limit = timeout_seconds if duration_seconds is None else min(duration_seconds,
                                                                 timeout_seconds)
    reaper.join(limit)
    stopped_at = time.monotonic()
    killed = reaper.is_alive()
    at_deadline = killed and duration_seconds is not None and duration_seconds <= timeout_seconds
    if killed:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break  # exited meanwhile
            reaper.join(STOP_GRACE_SECONDS)
            if not reaper.is_alive():
                break
    reaper.join(STOP_GRACE_SECONDS)
    proc.returncode = (os.waitstatus_to_exitcode(exited["status"]) if exited else -9)
    pipes.join()
    usage = exited.get("usage")
    end = exited.get("at", time.monotonic())
    if at_deadline:
        end = stopped_at  # the run's window: what the server took until then counts
    elif killed and pipes.last_tick:
        end = pipes.last_tick  # the last message that got through, not the kill
    elapsed = max(end - started, 1e-9)
    ok = proc.returncode == 0 and not killed
    accepted = messages if ok else pipes.count
    fatal = pipes.stderr.decode(errors="replace").strip().splitlines()
    return {
        "generator": "smtp-source", "host": host, "port": port, "sessions": sessions,
        "messages": messages, "size": size, "per_session": per_session,
        "pipelining_requested": False, "pipelining_used": False,
        "sent": pipes.count, "accepted": accepted,
        # Not all-2xx: smtp-source stopped at its first failure; `accepted` is then
        # the messages it had sent (an upper bound).
        "accepted_is_upper_bound": not ok,
        "rejected": 0, "errors": 0 if ok or at_deadline else 1,
        "connections": (min(sessions, messages) if per_session > 1 else pipes.count),
        "elapsed_seconds": elapsed, "started_monotonic": started,
        "cpu_seconds": (usage.ru_utime + usage.ru_stime) if usage else 0.0,
        "accepted_per_second": accepted / elapsed,
        "latency_p50_ms": None, "latency_p99_ms": None, "latency_p999_ms": None,
        "latency_max_ms": None, "latencies_ms": None,
        "timed_out": killed and not at_deadline, "stopped_at_deadline": at_deadline,
        "unsent": 0,
        "exit_status": proc.returncode,
        "rejected_by_code": {},
        "errors_by_kind": {} if ok or at_deadline else
                          {("killed at the cap" if killed else "fatal"): 1},
        "first_errors": [] if ok or at_deadline else
                        (fatal[-1:] or [f"exit status {proc.returncode}"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=1024, help="body bytes (smtp-source -l)")
    p.add_argument("--per-session", type=int, default=1,
                   help="above 1: smtp-source -d (keep each connection)")
    p.add_argument("--rcpt", default="user@local.test")
    p.add_argument("--timeout-seconds", type=float, default=120.0)
    p.add_argument("--duration-seconds", type=float, default=None,
                   help="stop smtp-source after this long (then `accepted` counts DATA "
                        "commands: an upper bound)")
    a = p.parse_args(argv)
    if not available():
        print(f"{SMTP_SOURCE} is not installed (it ships with Postfix)", file=sys.stderr)
        return 2
    result = run_source(a.host, a.port, a.sessions, a.messages, a.size, a.per_session,
                        rcpt=a.rcpt, timeout_seconds=a.timeout_seconds,
                        duration_seconds=a.duration_seconds)
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
