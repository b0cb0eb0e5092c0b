"""The load tools as subprocesses: loadgen.py and authload.py, one JSON result back.

Each run is a process of its own, so the client never shares a core's time with the
driver, and its CPU shows in the driver's reaped-children CPU (procstat). Its
progress lines go to our stderr; its last stdout line is its JSON result. A run that
ends without one raises RuntimeError with what it printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Final

from procs import BENCH_DIR, HOST

LOADGEN: Final = BENCH_DIR / "loadgen.py"
AUTHLOAD: Final = BENCH_DIR / "authload.py"
SUBPROCESS_SLACK_SECONDS: Final = 60.0  # beyond the tool's own cap: a stuck tool is killed


def run_json(argv: list[str], timeout_seconds: float) -> dict:
    """Run one tool (stderr inherited) and return its JSON result."""
    proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          timeout=timeout_seconds + SUBPROCESS_SLACK_SECONDS, check=False)
    try:
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise RuntimeError(f"{argv[0].rsplit('/', 1)[-1].removesuffix('.py')} exited {proc.returncode} "
                           f"without a JSON result ({exc}); stdout: {proc.stdout[-500:]!r}") from exc


def run_loadgen(port: int, *, sessions: int, messages: int, size: int, per_session: int,
                pipelining: bool, timeout_seconds: float, quiet: bool, rcpt: str | None = None,
                rate: float | None = None, duration_seconds: float | None = None,
                latencies: bool = False, sender: str | None = None,
                message_file: str | None = None) -> dict:
    argv = [str(LOADGEN), "--host", HOST, "--port", str(port), "--sessions", str(sessions),
            "--messages", str(messages), "--size", str(size), "--per-session", str(per_session),
            "--timeout-seconds", str(timeout_seconds), "--json",
            "--pipelining" if pipelining else "--no-pipelining"]
    if rcpt is not None:
        argv += ["--rcpt", rcpt]
    if sender is not None:
        argv += ["--sender", sender]
    if message_file is not None:
        argv += ["--message-file", message_file]
    if rate is not None:
        argv += ["--rate", f"{rate:.3f}"]
    if duration_seconds is not None:
        argv += ["--duration-seconds", f"{duration_seconds:.3f}"]
    if latencies:
        argv.append("--latencies")
    if quiet:
        argv.append("--quiet")
    return run_json(argv, timeout_seconds)


def loadgen_run(port: int, args: argparse.Namespace, messages: int, quiet: bool,
                size: int | None = None, rcpt: str | None = None, rate: float | None = None) -> dict:
    """A loadgen run with bench/run's options (--sessions, --size, --per-session, ...)."""
    return run_loadgen(port, sessions=args.sessions, messages=messages,
                       size=args.size if size is None else size, per_session=args.per_session,
                       pipelining=args.pipelining, timeout_seconds=args.timeout_seconds,
                       quiet=quiet, rcpt=rcpt, rate=rate)


def run_authload(port: int, args: argparse.Namespace, logins: int, users: int, prefix: str,
                 password: str, quiet: bool) -> dict:
    argv = [str(AUTHLOAD), "--host", HOST, "--port", str(port), "--sessions", str(args.sessions),
            "--logins", str(logins), "--users", str(users), "--user-prefix", prefix,
            "--password", password, "--timeout-seconds", str(args.timeout_seconds), "--json"]
    if quiet:
        argv.append("--quiet")
    return run_json(argv, args.timeout_seconds)
