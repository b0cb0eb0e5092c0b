#!/usr/bin/env python3
"""SMTP load generator: N concurrent sessions push M messages, measure the DATA commit.

Owns the client side of the benchmark: raw asyncio streams (uvloop when importable),
not smtplib, so the client is cheap enough to push a Python server to its limit.
Usable as a CLI (`bench/loadgen.py --port 2525 --json`) and as a library
(`await run_load(...) -> LoadResult`).

What it measures, per message: the time from writing the end-of-data "." line to
reading the final reply to it. A 2xx final reply counts as accepted; any other reply
to MAIL/RCPT/DATA/"." counts as rejected (by code); a broken, refused or timed-out
connection counts as an error (by kind). Throughput is accepted messages divided by
the wall time from the first connect to the last reply.

Two optional extras for bench/run --sweep: `duration_seconds`, a soft deadline after
which no new message is started (sessions finish the message they are in; one still
waiting for its TCP connect gives its message back, counted as `unsent`), and
`keep_latencies`, which returns every accepted message's latency (`latencies_ms`, in
the order the replies arrived) for a CDF. And `rate` (bench/run --half-load): messages
start on a fixed schedule, message k no earlier than k/rate seconds into the run
(open loop within the sessions' limit: a server that falls behind is not waited for
beyond what the sessions allow), so latency is measured at a chosen load, not at the
server's maximum.

Invariants: accepted + rejected + errors + unsent <= messages (equal unless the
overall timeout cut the run short); only loopback-style targets are meant (the caller
picks the host; nothing here resolves or retries elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

try:
    import uvloop
except ImportError:  # the stdlib loop works, only slower; the result records which ran
    uvloop = None

CRLF: Final = b"\r\n"
LINE_CHARS: Final = 76  # body line length before CRLF, as the brief and RFC 2045 suggest
# Above this many bytes the body is written and drained before the "." is sent, so
# the measured latency is the server's commit, not the transfer of a large body.
SPLIT_TERMINATOR_ABOVE_BYTES: Final = 64 * 1024
MAX_REPLY_LINES: Final = 100  # a server sending more is broken; don't loop forever
PROGRESS_EVERY_SECONDS: Final = 2.0


@dataclass
class LoadResult:
    """What one load run did. Latencies are in milliseconds."""

    host: str
    port: int
    sessions: int
    messages: int
    size: int
    per_session: int
    pipelining_requested: bool
    pipelining_used: bool = False  # true if at least one session pipelined
    rate: float | None = None  # messages per second asked for (None: as fast as possible)
    event_loop: str = "asyncio"
    sent: int = 0  # messages whose "." was written
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    connections: int = 0  # TCP connects that succeeded (refused/timed-out ones are errors)
    elapsed_seconds: float = 0.0
    # time.monotonic() (CLOCK_MONOTONIC: one clock for every process on the machine)
    # when the run started, i.e. just before the first connect: bench/run --e2e
    # measures from here to the arrival of the last message at its sink.
    started_monotonic: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU over the run: near elapsed = client-bound
    accepted_per_second: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_p999_ms: float | None = None
    latency_max_ms: float | None = None
    timed_out: bool = False
    # duration_seconds: the soft deadline passed before every message was started.
    stopped_at_deadline: bool = False
    unsent: int = 0  # messages never sent because of the deadline (never counted)
    given_back: int = 0  # of those: sessions still waiting for their connect then
    latencies_ms: list[float] | None = None  # only with keep_latencies
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SmtpReplyError(Exception):
    """The server answered with something that is not an SMTP reply."""


# ---------------------------------------------------------------------------
# Message construction (pure)


def build_body(size: int) -> bytes:
    """A body of exactly `size` bytes (unstuffed, CRLF line ends, 76-char lines).

    The second line starts with a dot so every message exercises dot-stuffing.
    Sizes below 2 give an empty body (a line needs its CRLF).
    """
    if size < 2:
        return b""
    pattern = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lengths = []
    remaining = size
    while remaining >= LINE_CHARS + 2:
        lengths.append(LINE_CHARS)
        remaining -= LINE_CHARS + 2
    if remaining == 1:
        # One byte left cannot hold a CRLF: shorten the previous line to make room.
        lengths[-1] -= 1
        remaining += 1
    if remaining >= 2:
        lengths.append(remaining - 2)
    lines = []
    for i, n in enumerate(lengths):
        if i == 1 and n > 0:
            line = (b"." + pattern * (n // len(pattern) + 1))[:n]
        else:
            line = (pattern[i % len(pattern):] + pattern * (n // len(pattern) + 1))[:n]
        lines.append(line)
    body = CRLF.join(lines) + CRLF
    assert len(body) == size, (len(body), size)
    return body


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with "." gets one more "." on the wire."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def build_message(sender: str, rcpt: str, message_id: str, stuffed_body: bytes) -> bytes:
    """Headers + an already stuffed body + the "." terminator, ready for the wire.

    Header lines never start with ".", so stuffing the body alone is enough.
    """
    headers = (
        f"From: <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: mta bench {message_id}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        f"\r\n"
    ).encode("ascii")
    return headers + stuffed_body + b".\r\n"


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when there is no sample."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ---------------------------------------------------------------------------
# Wire helpers


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

    def __init__(self, result, io_timeout: float, max_first_errors: int = 5):  # type: ignore[no-untyped-def]
        self.result = result  # a LoadResult or an AuthLoadResult: the same tally fields
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


async def drive(tasks: list[asyncio.Task[None]], timeout_seconds: float, result,  # type: ignore[no-untyped-def]
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


class _Run(Tally):
    """Shared state of one run: the message counter, the tallies and the deadline."""

    def __init__(self, result: LoadResult, io_timeout: float, max_first_errors: int = 5,
                 deadline: float | None = None, started: float = 0.0):
        super().__init__(result, io_timeout, max_first_errors)
        self.started = started  # time.perf_counter() at the start: the pacing origin
        self.paced = 0  # messages given a start slot so far
        self.deadline = deadline  # time.perf_counter() after which no message starts
        self.remaining = result.messages
        self.ids = itertools.count(1)
        self.tag = f"{os.getpid()}.{int(time.time() * 1000)}"
        self.last_reply_at = 0.0

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.result.stopped_at_deadline = True
            return False
        self.remaining -= 1
        return True

    async def pace(self) -> None:
        """With a rate: wait for this message's start slot (k/rate into the run)."""
        rate = self.result.rate
        if rate is None:
            return
        delay = self.started + self.paced / rate - time.perf_counter()
        self.paced += 1
        if delay > 0:
            await asyncio.sleep(delay)

    def connect_timeout(self) -> float:
        """The I/O timeout, cut short at the soft deadline: a connect still pending
        then (a full listen queue drops SYNs; the retry comes 1 s, 3 s... later) would
        only stretch the run."""
        if self.deadline is None:
            return self.io_timeout
        return min(self.io_timeout, max(self.deadline - time.perf_counter(), 0.0) + 0.001)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def give_back(self) -> None:
        """A taken message that was never sent: the run ends without it."""
        self.result.unsent += 1
        self.result.given_back += 1
        self.result.stopped_at_deadline = True

    def note_rejected(self, stage: str, code: int) -> None:
        super().note_rejected(stage, code)
        self.last_reply_at = time.perf_counter()


# ---------------------------------------------------------------------------
# One connection


async def _session(run: _Run, host: str, port: int, per_session: int, pipelining: bool,
                   sender: str, rcpt: str, stuffed_body: bytes, ehlo_name: str) -> None:
    """Connect, send up to `per_session` messages, QUIT; repeat until none are left."""
    res = run.result
    timeout = run.io_timeout
    mail_cmd = f"MAIL FROM:<{sender}>\r\n".encode("ascii")
    rcpt_cmd = f"RCPT TO:<{rcpt}>\r\n".encode("ascii")
    data_cmd = b"DATA\r\n"
    group = mail_cmd + rcpt_cmd + data_cmd
    while run.take():
        await run.pace()
        # This message is ours now; `in_flight` says if it is still uncounted when
        # the connection breaks (then it is an error, never silently lost).
        in_flight = True
        writer = None
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), run.connect_timeout())
            except asyncio.TimeoutError as exc:
                in_flight = False
                if run.past_deadline():
                    run.give_back()
                    continue
                run.note_error("connect", repr(exc))
                await asyncio.sleep(0.05)
                continue
            except OSError as exc:
                run.note_error("connect", repr(exc))
                in_flight = False
                await asyncio.sleep(0.05)  # don't spin on a refused port
                continue
            res.connections += 1
            code, _ = await read_reply(reader, timeout)
            if code != 220:
                run.note_error(f"greeting:{code}", "unexpected reply code")
                in_flight = False
                continue
            writer.write(f"EHLO {ehlo_name}\r\n".encode("ascii"))
            code, ehlo_lines = await read_reply(reader, timeout)
            if code != 250:
                run.note_error(f"ehlo:{code}", "unexpected reply code")
                in_flight = False
                continue
            keywords = {line.split(b" ", 1)[0].upper() for line in ehlo_lines[1:]}
            use_pipelining = pipelining and b"PIPELINING" in keywords
            if use_pipelining:
                res.pipelining_used = True

            for n in range(per_session):
                if n > 0:
                    if not run.take():
                        break
                    await run.pace()
                    in_flight = True
                message = build_message(sender, rcpt, f"{run.tag}.{next(run.ids)}@client.test",
                                        stuffed_body)
                if use_pipelining:
                    # RFC 2920: MAIL, RCPT and DATA go in one write; DATA ends the group.
                    writer.write(group)
                    mail_code, _ = await read_reply(reader, timeout)
                    rcpt_code, _ = await read_reply(reader, timeout)
                    data_code, _ = await read_reply(reader, timeout)
                else:
                    writer.write(mail_cmd)
                    mail_code, _ = await read_reply(reader, timeout)
                    rcpt_code = data_code = 0
                    if mail_code // 100 == 2:
                        writer.write(rcpt_cmd)
                        rcpt_code, _ = await read_reply(reader, timeout)
                        if rcpt_code // 100 == 2:
                            writer.write(data_cmd)
                            data_code, _ = await read_reply(reader, timeout)
                if data_code == 354 and (mail_code // 100 != 2 or rcpt_code // 100 != 2):
                    # A server that said 354 with no valid recipient: end DATA empty.
                    writer.write(b".\r\n")
                    await read_reply(reader, timeout)
                if mail_code // 100 != 2:
                    run.note_rejected("mail", mail_code)
                elif rcpt_code // 100 != 2:
                    run.note_rejected("rcpt", rcpt_code)
                elif data_code != 354:
                    run.note_rejected("data", data_code)
                else:
                    if len(message) > SPLIT_TERMINATOR_ABOVE_BYTES:
                        writer.write(message[:-3])
                        await writer.drain()
                        t0 = time.perf_counter()
                        writer.write(message[-3:])
                    else:
                        t0 = time.perf_counter()
                        writer.write(message)
                    res.sent += 1
                    final_code, _ = await read_reply(reader, timeout)
                    now = time.perf_counter()
                    in_flight = False
                    if final_code // 100 == 2:
                        res.accepted += 1
                        run.latencies.append((now - t0) * 1000.0)
                        run.last_reply_at = now
                    else:
                        run.note_rejected("dot", final_code)
                    continue
                in_flight = False
                # The transaction failed before the body: reset it before the next one.
                writer.write(b"RSET\r\n")
                await read_reply(reader, timeout)
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


async def close_quietly(writer: asyncio.StreamWriter | None) -> None:
    """Close a session's stream; a peer that closed first is no error."""
    if writer is None:
        return
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ConnectionError):
        pass  # the peer already closed; nothing left to release


async def _progress(run: _Run, started: float) -> None:
    res = run.result
    while True:
        await asyncio.sleep(PROGRESS_EVERY_SECONDS)
        elapsed = time.perf_counter() - started
        print(f"loadgen: {elapsed:6.1f}s sent={res.sent} accepted={res.accepted} "
              f"rejected={res.rejected} errors={res.errors} "
              f"({res.accepted / elapsed:.0f} msg/s)", file=sys.stderr, flush=True)


async def run_load(host: str, port: int, sessions: int, messages: int, size: int = 1024,
                   per_session: int = 1, *, pipelining: bool = True,
                   sender: str = "bench@client.test", rcpt: str = "user@local.test",
                   timeout_seconds: float = 120.0, io_timeout_seconds: float = 30.0,
                   ehlo_name: str = "client.test", progress: bool = False,
                   duration_seconds: float | None = None,
                   keep_latencies: bool = False, rate: float | None = None) -> LoadResult:
    """Run one load and return what happened; never raises for server misbehaviour.

    duration_seconds: soft deadline (see the module docstring); timeout_seconds stays
    the hard cap. keep_latencies: fill `latencies_ms`."""
    if sessions < 1 or messages < 0 or per_session < 1 or size < 0:
        raise ValueError("sessions and per_session must be >= 1; messages and size >= 0")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 messages per second")
    loop_module = type(asyncio.get_running_loop()).__module__
    result = LoadResult(host=host, port=port, sessions=sessions, messages=messages,
                        size=size, per_session=per_session, pipelining_requested=pipelining,
                        event_loop="uvloop" if loop_module.startswith("uvloop") else "asyncio",
                        rate=rate)
    stuffed_body = dot_stuff(build_body(size))
    result.started_monotonic = time.monotonic()
    started = time.perf_counter()
    run = _Run(result, io_timeout_seconds,
               deadline=None if duration_seconds is None else started + duration_seconds,
               started=started)
    cpu_started = time.process_time()
    tasks = [asyncio.create_task(_session(run, host, port, per_session, pipelining, sender,
                                          rcpt, stuffed_body, ehlo_name))
             for _ in range(min(sessions, max(messages, 1)))]
    reporter = asyncio.create_task(_progress(run, started)) if progress else None
    await drive(tasks, timeout_seconds, result, reporter)

    end = run.last_reply_at if run.last_reply_at else time.perf_counter()
    if result.timed_out:
        end = time.perf_counter()
    result.elapsed_seconds = max(end - started, 1e-9)
    result.cpu_seconds = time.process_time() - cpu_started
    result.accepted_per_second = result.accepted / result.elapsed_seconds
    run.summarize()
    if keep_latencies:
        result.latencies_ms = [round(v, 4) for v in run.latencies]
    if result.stopped_at_deadline:
        result.unsent += run.remaining  # never started: the deadline came first
    return result


# ---------------------------------------------------------------------------
# CLI


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_text(r: LoadResult) -> str:
    lines = [
        f"target            {r.host}:{r.port} ({r.event_loop}, "
        f"pipelining {'used' if r.pipelining_used else 'not used'})",
        f"messages          {r.messages} requested, {r.sent} sent, {r.accepted} accepted, "
        f"{r.rejected} rejected, {r.errors} errors"
        + (" (TIMED OUT)" if r.timed_out else "")
        + (f" ({r.unsent} unsent: stopped at the deadline)" if r.stopped_at_deadline else ""),
        f"elapsed           {r.elapsed_seconds:.3f} s over {r.connections} connections, "
        f"{r.cpu_seconds:.3f} s CPU in the load generator",
        f"throughput        {r.accepted_per_second:.1f} accepted msg/s",
        f"latency ms        p50 {fmt_ms(r.latency_p50_ms)}  p99 {fmt_ms(r.latency_p99_ms)}  "
        f"p999 {fmt_ms(r.latency_p999_ms)}  max {fmt_ms(r.latency_max_ms)}",
    ]
    if r.rejected_by_code:
        lines.append(f"rejected by code  {r.rejected_by_code}")
    if r.errors_by_kind:
        lines.append(f"errors by kind    {r.errors_by_kind}")
    for e in r.first_errors:
        lines.append(f"  e.g. {e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--sessions", type=int, default=50, help="concurrent connections")
    p.add_argument("--messages", type=int, default=5000, help="total messages")
    p.add_argument("--size", type=int, default=1024, help="body size in bytes")
    p.add_argument("--per-session", type=int, default=1,
                   help="messages per connection before QUIT and reconnect")
    p.add_argument("--pipelining", action=argparse.BooleanOptionalAction, default=True,
                   help="send MAIL/RCPT/DATA in one write when the server offers PIPELINING")
    p.add_argument("--sender", default="bench@client.test")
    p.add_argument("--rcpt", default="user@local.test")
    p.add_argument("--ehlo", default="client.test", help="name sent in EHLO")
    p.add_argument("--timeout-seconds", type=float, default=120.0,
                   help="overall cap; the run stops and reports what it did")
    p.add_argument("--io-timeout-seconds", type=float, default=30.0,
                   help="longest wait for any one reply")
    p.add_argument("--duration-seconds", type=float, default=None,
                   help="soft deadline: start no new message after this many seconds "
                        "(the run then ends early; see `unsent` and `stopped_at_deadline`)")
    p.add_argument("--rate", type=float, default=None,
                   help="messages per second: start message k at k/RATE seconds (paced, "
                        "for latency at a chosen load); default: as fast as possible")
    p.add_argument("--latencies", action="store_true",
                   help="with --json: include every accepted message's latency "
                        "(`latencies_ms`)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    coro = run_load(a.host, a.port, a.sessions, a.messages, a.size, a.per_session,
                    pipelining=a.pipelining, sender=a.sender, rcpt=a.rcpt,
                    timeout_seconds=a.timeout_seconds, io_timeout_seconds=a.io_timeout_seconds,
                    ehlo_name=a.ehlo, progress=not a.quiet,
                    duration_seconds=a.duration_seconds, keep_latencies=a.latencies, rate=a.rate)
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(coro)
    else:
        result = asyncio.run(coro)
    if a.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_text(result))
    if result.stopped_at_deadline:
        return 0 if result.accepted + result.unsent == result.messages else 1
    return 0 if result.accepted == result.messages else 1


if __name__ == "__main__":
    sys.exit(main())
