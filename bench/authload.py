#!/usr/bin/env python3
"""AUTH load generator: N concurrent sessions each log in once (EHLO, AUTH PLAIN, QUIT).

Owns the client side of `bench/run --auth`: raw asyncio streams (uvloop when
importable), the wire helpers of loadgen.py. Usable as a CLI
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
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Final

from loadgen import SmtpReplyError, Tally, close_quietly, drive, fmt_ms, read_reply, uvloop

PROGRESS_EVERY_SECONDS: Final = 2.0


@dataclass
class AuthLoadResult:
    """What one login run did. Latencies are in milliseconds."""

    host: str
    port: int
    sessions: int
    logins: int  # requested
    users: int
    user_prefix: str
    event_loop: str = "asyncio"
    ok: int = 0  # 235 replies
    rejected: int = 0
    errors: int = 0
    connections: int = 0  # TCP connects that succeeded
    elapsed_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU over the run: near elapsed = client-bound
    logins_per_second: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_p999_ms: float | None = None
    latency_max_ms: float | None = None
    timed_out: bool = False
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        in_flight = True  # this login is uncounted until it is ok, rejected or an error
        writer = None
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                run.note_error("connect", repr(exc))
                in_flight = False
                await asyncio.sleep(0.05)  # don't spin on a refused port
                continue
            res.connections += 1
            code, _ = await read_reply(reader, timeout)
            if code != 220:
                run.note_rejected("greeting", code)
                in_flight = False
                continue
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
            writer.write(b"QUIT\r\n")
            await read_reply(reader, timeout)
        except asyncio.TimeoutError:
            if in_flight:
                run.note_error("timeout", f"no reply within {timeout}s")
        except (OSError, ConnectionError, asyncio.IncompleteReadError, SmtpReplyError) as exc:
            if in_flight:
                run.note_error("connection", repr(exc))
        finally:
            await close_quietly(writer)


async def _progress(run: _Run, started: float) -> None:
    res = run.result
    while True:
        await asyncio.sleep(PROGRESS_EVERY_SECONDS)
        elapsed = time.perf_counter() - started
        print(f"authload: {elapsed:6.1f}s ok={res.ok} rejected={res.rejected} errors={res.errors} "
              f"({res.ok / elapsed:.0f} logins/s)", file=sys.stderr, flush=True)


async def run_logins(host: str, port: int, sessions: int, logins: int, users: int, *,
                     user_prefix: str = "bench", password: str = "bench password",
                     timeout_seconds: float = 60.0, io_timeout_seconds: float = 30.0,
                     ehlo_name: str = "client.test", progress: bool = False) -> AuthLoadResult:
    """Run one batch of logins and return what happened; never raises for server misbehaviour."""
    if sessions < 1 or logins < 0 or users < 1:
        raise ValueError("sessions and users must be >= 1; logins >= 0")
    loop_module = type(asyncio.get_running_loop()).__module__
    result = AuthLoadResult(host=host, port=port, sessions=sessions, logins=logins, users=users,
                            user_prefix=user_prefix,
                            event_loop="uvloop" if loop_module.startswith("uvloop") else "asyncio")
    run = _Run(result, io_timeout_seconds)
    started = time.perf_counter()
    cpu_started = time.process_time()
    tasks = [asyncio.create_task(_session(run, host, port, password, ehlo_name))
             for _ in range(min(sessions, max(logins, 1)))]
    reporter = asyncio.create_task(_progress(run, started)) if progress else None
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
    lines = [
        f"target            {r.host}:{r.port} ({r.event_loop})",
        f"logins            {r.logins} requested over {r.users} users, {r.ok} ok, "
        f"{r.rejected} rejected, {r.errors} errors" + (" (TIMED OUT)" if r.timed_out else ""),
        f"elapsed           {r.elapsed_seconds:.3f} s over {r.connections} connections, "
        f"{r.cpu_seconds:.3f} s CPU in the client",
        f"throughput        {r.logins_per_second:.1f} logins/s",
        f"AUTH reply ms     p50 {fmt_ms(r.latency_p50_ms)}  p99 {fmt_ms(r.latency_p99_ms)}  "
        f"p999 {fmt_ms(r.latency_p999_ms)}  max {fmt_ms(r.latency_max_ms)}",
    ]
    if r.rejected_by_code:
        lines.append(f"rejected by code  {r.rejected_by_code}")
    if r.errors_by_kind:
        lines.append(f"errors by kind    {r.errors_by_kind}")
    lines.extend(f"  e.g. {e}" for e in r.first_errors)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2587)
    p.add_argument("--sessions", type=int, default=50, help="concurrent connections")
    p.add_argument("--users", type=int, default=200, help="user names <prefix>0 .. <prefix>N-1")
    p.add_argument("--logins", type=int, default=None,
                   help="total logins (default: --users, each once)")
    p.add_argument("--user-prefix", default="bench")
    p.add_argument("--password", default="bench password", help="every user's password")
    p.add_argument("--ehlo", default="client.test", help="name sent in EHLO")
    p.add_argument("--timeout-seconds", type=float, default=60.0,
                   help="overall cap; the run stops and reports what it did")
    p.add_argument("--io-timeout-seconds", type=float, default=30.0,
                   help="longest wait for any one reply")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logins = a.users if a.logins is None else a.logins
    coro = run_logins(a.host, a.port, a.sessions, logins, a.users, user_prefix=a.user_prefix,
                      password=a.password, timeout_seconds=a.timeout_seconds,
                      io_timeout_seconds=a.io_timeout_seconds, ehlo_name=a.ehlo,
                      progress=not a.quiet)
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(coro)
    else:
        result = asyncio.run(coro)
    print(json.dumps(result.to_dict()) if a.json else format_text(result))
    return 0 if result.ok == logins else 1


if __name__ == "__main__":
    sys.exit(main())
