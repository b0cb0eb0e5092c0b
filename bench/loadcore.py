"""What the load tools share (loadgen.py, authload.py): the wire, the tally, the run.

    code, lines = await read_reply(reader, timeout)   # one SMTP reply, multi-line joined
    run = Tally(result, io_timeout)                   # per-run counts, written into result
    await drive(tasks, timeout_seconds, result, reporter)
    await close_quietly(writer)

A session counts each unit of work (a message, a login) once: accepted, rejected (by
stage:code) or an error (by kind); `note_broken` turns a broken connection, a timeout
or a malformed reply into the error of the unit in flight. Also the command-line
options both tools take and the layout of their text output.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

MAX_REPLY_LINES: Final = 100  # a server sending more is broken; don't loop forever
PROGRESS_EVERY_SECONDS: Final = 2.0


@dataclass(kw_only=True)
class RunResult:
    """What every load tool's run reports (its own result adds its counts). Latencies in ms."""

    host: str
    port: int
    sessions: int
    event_loop: str = "asyncio"
    rejected: int = 0
    errors: int = 0
    connections: int = 0  # TCP connects that succeeded (refused/timed-out ones are errors)
    elapsed_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU over the run: near elapsed = client-bound
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


class SmtpReplyError(Exception):
    """The server answered with something that is not an SMTP reply."""


# What ends a session early: a drop, a refused or timed-out read, a malformed reply
# (asyncio.TimeoutError is TimeoutError, an OSError).
SESSION_ERRORS: Final = (OSError, ConnectionError, asyncio.IncompleteReadError, SmtpReplyError)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when there is no sample."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, list[bytes]]:
    """One (possibly multi-line) reply: its code and its text lines."""
    lines = []
    # asyncio.timeout, not wait_for: on 3.11 wait_for costs a task per call.
    async with asyncio.timeout(timeout):
        for _ in range(MAX_REPLY_LINES):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError("connection closed by server")
            if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise SmtpReplyError(f"malformed reply line {line[:80]!r}")
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines
    raise SmtpReplyError(f"reply longer than {MAX_REPLY_LINES} lines")


class Tally:
    """What the sessions of one run count (loadgen's and authload's): latencies, refusals
    by stage:code, errors by kind; `summarize` writes them into the result."""

    def __init__(self, result: RunResult, io_timeout: float, max_first_errors: int = 5):
        self.result = result
        self.io_timeout = io_timeout
        self.latencies: list[float] = []
        self.rejected: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.max_first_errors = max_first_errors

    def note_error(self, kind: str, detail: str, count: int = 1) -> None:
        self.errors[kind] += count
        self.result.errors += count
        if len(self.result.first_errors) < self.max_first_errors:
            self.result.first_errors.append(f"{kind}: {detail}")

    def connect_failed(self, exc: OSError) -> bool:
        """A connect failed (refused, timed out): an error (True: pause before the next try)."""
        self.note_error("connect", repr(exc))
        return True

    def greeting_refused(self, code: int) -> None:
        self.note_rejected("greeting", code)

    def note_broken(self, exc: BaseException, in_flight: bool) -> None:
        """The session broke (one of SESSION_ERRORS): an error if a unit of work was in flight."""
        if not in_flight:
            return
        if isinstance(exc, TimeoutError):
            self.note_error("timeout", f"no reply within {self.io_timeout}s")
        else:
            self.note_error("connection", repr(exc))

    def note_rejected(self, stage: str, code: int) -> None:
        self.rejected[f"{stage}:{code}"] += 1
        self.result.rejected += 1

    def summarize(self) -> None:
        r, lat = self.result, sorted(self.latencies)
        r.latency_p50_ms = percentile(lat, 50)
        r.latency_p99_ms = percentile(lat, 99)
        r.latency_p999_ms = percentile(lat, 99.9)
        r.latency_max_ms = lat[-1] if lat else None
        r.rejected_by_code = dict(self.rejected)
        r.errors_by_kind = dict(self.errors)


async def open_session(run: Tally, host: str, port: int,
                       timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A session's next connection (counted) once it greeted with 220. None when that
    failed: the unit of work taken for it is noted (connect_failed, greeting_refused,
    note_broken) and the connection closed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except OSError as exc:  # refused, unreachable, or TimeoutError
        if run.connect_failed(exc):
            await asyncio.sleep(0.05)  # don't spin on a refused port
        return None
    run.result.connections += 1
    try:
        code, _ = await read_reply(reader, run.io_timeout)
    except SESSION_ERRORS as exc:
        run.note_broken(exc, True)
        code = 0
    else:
        if code == 220:
            return reader, writer
        run.greeting_refused(code)
    await close_quietly(writer)
    return None


async def drive(tasks: list[asyncio.Task[None]], timeout_seconds: float, result: RunResult,
                reporter: asyncio.Task[None] | None) -> None:
    """Wait for the sessions; at the timeout cancel them (`result.timed_out`). A session
    that raised is a bug in the client, not the server's fault: it is raised here."""
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout_seconds)
        if pending:
            result.timed_out = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)


async def report_progress(line: Callable[[float], str]) -> None:
    """Every PROGRESS_EVERY_SECONDS, `line(elapsed seconds)` on stderr (until cancelled)."""
    started = time.perf_counter()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_SECONDS)
        print(line(time.perf_counter() - started), file=sys.stderr, flush=True)


async def say_quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    writer.write(b"QUIT\r\n")
    await read_reply(reader, timeout)


async def close_quietly(writer: asyncio.StreamWriter | None) -> None:
    """Close a session's stream; a peer that closed first is no error."""
    if writer is None:
        return
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ConnectionError):
        pass  # the peer already closed; nothing left to release


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def result_text(r: RunResult, *, loop: str, done: str, client: str, throughput: str, latency: str) -> str:
    """A tool's text output: target, what was done, time and CPU, rate, latency, problems."""
    lines = [f"target            {r.host}:{r.port} ({loop})",
             done,
             f"elapsed           {r.elapsed_seconds:.3f} s over {r.connections} connections, "
             f"{r.cpu_seconds:.3f} s CPU in the {client}",
             f"throughput        {throughput}",
             f"{latency:<18}p50 {fmt_ms(r.latency_p50_ms)}  p99 {fmt_ms(r.latency_p99_ms)}  "
             f"p999 {fmt_ms(r.latency_p999_ms)}  max {fmt_ms(r.latency_max_ms)}"]
    if r.rejected_by_code:
        lines.append(f"rejected by code  {r.rejected_by_code}")
    if r.errors_by_kind:
        lines.append(f"errors by kind    {r.errors_by_kind}")
    lines.extend(f"  e.g. {e}" for e in r.first_errors)
    return "\n".join(lines)


def add_client_arguments(p: argparse.ArgumentParser, *, port: int, timeout_seconds: float) -> None:
    """The options every load tool takes: where, how many at once, how long, how to report."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--sessions", type=int, default=50, help="concurrent connections")
    p.add_argument("--ehlo", default="client.test", help="name sent in EHLO")
    p.add_argument("--timeout-seconds", type=float, default=timeout_seconds,
                   help="overall cap; the run stops and reports what it did")
    p.add_argument("--io-timeout-seconds", type=float, default=30.0,
                   help="longest wait for any one reply")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
