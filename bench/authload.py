#!/usr/bin/env python3
"""AUTH load generator: N concurrent sessions each log in once (EHLO, AUTH PLAIN, QUIT).

Owns the client side of `bench/run --auth`: raw asyncio streams (uvloop when
importable), the wire helpers of loadcore.py. Usable as a CLI
(`bench/authload.py --port 2587 --users 200 --logins 200 --json`) and as a library
(`await run_logins(...) -> AuthLoadResult`).

One login per connection: a second AUTH in a session is 503, and a login is what a
mail client does once per connection. Login n uses user `<prefix><n mod users>`, so
`--logins` = `--users` logs every user in exactly once (the cache-cold phase of
bench/run), and more logins cycle over them again.

What it measures, per login: the time from writing `AUTH PLAIN <token>` to reading
its reply. A 235 counts as a login; any other reply to EHLO or AUTH counts as
rejected (by stage and code); a broken, refused or timed-out connection counts as
an error (by kind). Throughput is logins divided by the wall time from the first
connect to the last 235.

Invariants: ok + rejected + errors <= logins (equal unless the overall timeout cut the
run short); plaintext AUTH only, so the target must offer it without TLS (mta's
`auth_plaintext = true`, loopback only: the caller picks the host).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import sys
import time
from dataclasses import dataclass

import evloop
from loadcore import (SESSION_ERRORS, RunResult, Tally, add_client_arguments, close_quietly, drive, open_session,
                      read_reply, report_progress, result_text, say_quit)


@dataclass
class AuthLoadResult(RunResult):
    """What one login run did (RunResult: the fields every load tool reports)."""

    logins: int  # requested
    users: int
    user_prefix: str
    ok: int = 0  # 235 replies
    logins_per_second: float = 0.0


def plain_token(user: str, password: str) -> str:
    """RFC 4616: base64 of authzid NUL authcid NUL password, with an empty authzid."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


class _Run(Tally):
    """Shared state of one run: which login is next, the tallies."""

    def __init__(self, result: AuthLoadResult, io_timeout: float, max_first_errors: int = 5):
        super().__init__(result, io_timeout, max_first_errors)
        self.next_login = itertools.count()
        self.last_ok_at = 0.0

    def take(self) -> int | None:
        n = next(self.next_login)
        return n if n < self.result.logins else None


async def _session(run: _Run, host: str, port: int, password: str, ehlo_name: str) -> None:
    """Log in once per connection until no login is left."""
    res = run.result
    timeout = run.io_timeout
    ehlo_cmd = f"EHLO {ehlo_name}\r\n".encode("ascii")
    while (n := run.take()) is not None:
        user = f"{res.user_prefix}{n % res.users}"
        auth_cmd = f"AUTH PLAIN {plain_token(user, password)}\r\n".encode()
        if (session := await open_session(run, host, port, timeout)) is None:
            continue  # counted: a connect error or a refused greeting
        reader, writer = session
        in_flight = True  # this login is uncounted until it is ok, rejected or an error
        try:
            writer.write(ehlo_cmd)
            code, lines = await read_reply(reader, timeout)
            offered = any(words[:1] == [b"AUTH"] and b"PLAIN" in words
                          for words in (line.upper().split() for line in lines[1:]))
            if code != 250 or not offered:
                run.note_rejected("ehlo" if code != 250 else "ehlo-no-auth-plain", code)
                in_flight = False
                continue
            t0 = time.perf_counter()
            writer.write(auth_cmd)
            code, _ = await read_reply(reader, timeout)
            now = time.perf_counter()
            in_flight = False
            if code == 235:
                res.ok += 1
                run.latencies.append((now - t0) * 1000.0)
                run.last_ok_at = now
            else:
                run.note_rejected("auth", code)
            await say_quit(reader, writer, timeout)
        except SESSION_ERRORS as exc:
            run.note_broken(exc, in_flight)
        finally:
            await close_quietly(writer)


async def run_logins(host: str, port: int, sessions: int, logins: int, users: int, *,
                     user_prefix: str = "bench", password: str = "bench password",
                     timeout_seconds: float = 60.0, io_timeout_seconds: float = 30.0,
                     ehlo_name: str = "client.test", progress: bool = False) -> AuthLoadResult:
    """Run one batch of logins and return what happened; never raises for server misbehaviour."""
    if sessions < 1 or logins < 0 or users < 1:
        raise ValueError("sessions and users must be >= 1; logins >= 0")
    result = AuthLoadResult(host=host, port=port, sessions=sessions, logins=logins, users=users,
                            user_prefix=user_prefix, event_loop=evloop.loop_name())
    run = _Run(result, io_timeout_seconds)
    started = time.perf_counter()
    cpu_started = time.process_time()
    tasks = [asyncio.create_task(_session(run, host, port, password, ehlo_name))
             for _ in range(min(sessions, max(logins, 1)))]
    reporter = asyncio.create_task(report_progress(lambda elapsed: (
        f"authload: {elapsed:6.1f}s ok={result.ok} rejected={result.rejected} errors={result.errors} "
        f"({result.ok / elapsed:.0f} logins/s)"))) if progress else None
    await drive(tasks, timeout_seconds, result, reporter)

    end = time.perf_counter() if result.timed_out or not run.last_ok_at else run.last_ok_at
    result.elapsed_seconds = max(end - started, 1e-9)
    result.cpu_seconds = time.process_time() - cpu_started
    result.logins_per_second = result.ok / result.elapsed_seconds
    run.summarize()
    return result


# ---------------------------------------------------------------------------
# CLI


def format_text(r: AuthLoadResult) -> str:
    return result_text(
        r, loop=r.event_loop,
        done=f"logins            {r.logins} requested over {r.users} users, {r.ok} ok, "
             f"{r.rejected} rejected, {r.errors} errors" + (" (TIMED OUT)" if r.timed_out else ""),
        client="client", throughput=f"{r.logins_per_second:.1f} logins/s", latency="AUTH reply ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_client_arguments(p, port=2587, timeout_seconds=60.0)
    p.add_argument("--users", type=int, default=200, help="user names <prefix>0 .. <prefix>N-1")
    p.add_argument("--logins", type=int, default=None,
                   help="total logins (default: --users, each once)")
    p.add_argument("--user-prefix", default="bench")
    p.add_argument("--password", default="bench password", help="every user's password")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logins = a.users if a.logins is None else a.logins
    coro = run_logins(a.host, a.port, a.sessions, logins, a.users, user_prefix=a.user_prefix,
                      password=a.password, timeout_seconds=a.timeout_seconds,
                      io_timeout_seconds=a.io_timeout_seconds, ehlo_name=a.ehlo,
                      progress=not a.quiet)
    result = evloop.run(coro)
    print(json.dumps(result.to_dict()) if a.json else format_text(result))
    return 0 if result.ok == logins else 1


if __name__ == "__main__":
    sys.exit(main())
