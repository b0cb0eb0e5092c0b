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
server's maximum. And `message` (bench/run --content): a whole message of the caller's
(header fields, blank line, body; CRLF line ends) sent instead of the generated one, with
only a unique Message-ID field put in front of it.

Invariants: accepted + rejected + errors + unsent <= messages (equal unless the
overall timeout cut the run short); only loopback-style targets are meant (the caller
picks the host; nothing here resolves or retries elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import evloop
from loadcore import (SESSION_ERRORS, RunResult, Tally, add_client_arguments, close_quietly, drive, open_session,
                      read_reply, report_progress, result_text, say_quit)

CRLF: Final = b"\r\n"
LINE_CHARS: Final = 76  # body line length before CRLF, as the brief and RFC 2045 suggest
# Above this many bytes the body is written and drained before the "." is sent, so
# the measured latency is the server's commit, not the transfer of a large body.
SPLIT_TERMINATOR_ABOVE_BYTES: Final = 64 * 1024


@dataclass
class LoadResult(RunResult):
    """What one load run did (RunResult: the fields every load tool reports)."""

    messages: int
    size: int
    per_session: int
    pipelining_requested: bool
    pipelining_used: bool = False  # true if at least one session pipelined
    rate: float | None = None  # messages per second asked for (None: as fast as possible)
    sent: int = 0  # messages whose "." was written
    accepted: int = 0
    # time.monotonic() (CLOCK_MONOTONIC: one clock for every process on the machine)
    # when the run started, i.e. just before the first connect: bench/run --e2e
    # measures from here to the arrival of the last message at its sink.
    started_monotonic: float = 0.0
    accepted_per_second: float = 0.0
    # duration_seconds: the soft deadline passed before every message was started.
    stopped_at_deadline: bool = False
    unsent: int = 0  # messages never sent because of the deadline (never counted)
    given_back: int = 0  # of those: sessions still waiting for their connect then
    latencies_ms: list[float] | None = None  # only with keep_latencies


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


def build_message(sender: str, rcpt: str, message_id: str, stuffed_body: bytes,
                  whole: bool = False) -> bytes:
    """Headers + an already stuffed body + the "." terminator, ready for the wire.

    Header lines never start with ".", so stuffing the body alone is enough. whole: the
    stuffed bytes are a whole message already; only the Message-ID field goes first.
    """
    if whole:
        return f"Message-ID: <{message_id}>\r\n".encode("ascii") + stuffed_body + b".\r\n"
    headers = (
        f"From: <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: mta bench {message_id}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        f"\r\n"
    ).encode("ascii")
    return headers + stuffed_body + b".\r\n"


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

    def connect_failed(self, exc: OSError) -> bool:
        """A connect that timed out at the soft deadline gives its message back, no error."""
        if isinstance(exc, TimeoutError) and self.past_deadline():
            self.give_back()
            return False
        return super().connect_failed(exc)

    def greeting_refused(self, code: int) -> None:
        self.note_error(f"greeting:{code}", "unexpected reply code")

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
                   sender: str, rcpt: str, stuffed_body: bytes, ehlo_name: str, whole: bool) -> None:
    """Connect, send up to `per_session` messages, QUIT; repeat until none are left."""
    res = run.result
    timeout = run.io_timeout
    mail_cmd = f"MAIL FROM:<{sender}>\r\n".encode("ascii")
    rcpt_cmd = f"RCPT TO:<{rcpt}>\r\n".encode("ascii")
    data_cmd = b"DATA\r\n"
    group = mail_cmd + rcpt_cmd + data_cmd
    while run.take():
        await run.pace()
        # This message is ours now: open_session counts it if the connection fails;
        # then `in_flight` says if it is still uncounted when the connection breaks
        # (then it is an error, never silently lost).
        if (session := await open_session(run, host, port, run.connect_timeout())) is None:
            continue
        reader, writer = session
        in_flight = True
        try:
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
                                        stuffed_body, whole)
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
            await say_quit(reader, writer, timeout)
        except SESSION_ERRORS as exc:
            run.note_broken(exc, in_flight)
        finally:
            await close_quietly(writer)


async def run_load(host: str, port: int, sessions: int, messages: int, size: int = 1024,
                   per_session: int = 1, *, pipelining: bool = True,
                   sender: str = "bench@client.test", rcpt: str = "user@local.test",
                   timeout_seconds: float = 120.0, io_timeout_seconds: float = 30.0,
                   ehlo_name: str = "client.test", progress: bool = False,
                   duration_seconds: float | None = None,
                   keep_latencies: bool = False, rate: float | None = None,
                   message: bytes | None = None) -> LoadResult:
    """Run one load and return what happened; never raises for server misbehaviour.

    duration_seconds: soft deadline (see the module docstring); timeout_seconds stays
    the hard cap. keep_latencies: fill `latencies_ms`. message: send this whole message
    (a Message-ID put first) instead of generated headers and a `size`-byte body."""
    if sessions < 1 or messages < 0 or per_session < 1 or size < 0:
        raise ValueError("sessions and per_session must be >= 1; messages and size >= 0")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 messages per second")
    result = LoadResult(host=host, port=port, sessions=sessions, messages=messages,
                        size=size if message is None else len(message), per_session=per_session,
                        pipelining_requested=pipelining,
                        event_loop=evloop.loop_name(), rate=rate)
    stuffed_body = dot_stuff(build_body(size) if message is None else message)
    result.started_monotonic = time.monotonic()
    started = time.perf_counter()
    run = _Run(result, io_timeout_seconds,
               deadline=None if duration_seconds is None else started + duration_seconds,
               started=started)
    cpu_started = time.process_time()
    tasks = [asyncio.create_task(_session(run, host, port, per_session, pipelining, sender,
                                          rcpt, stuffed_body, ehlo_name, message is not None))
             for _ in range(min(sessions, max(messages, 1)))]
    reporter = asyncio.create_task(report_progress(lambda elapsed: (
        f"loadgen: {elapsed:6.1f}s sent={result.sent} accepted={result.accepted} "
        f"rejected={result.rejected} errors={result.errors} "
        f"({result.accepted / elapsed:.0f} msg/s)"))) if progress else None
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


def format_text(r: LoadResult) -> str:
    return result_text(
        r, loop=f"{r.event_loop}, pipelining {'used' if r.pipelining_used else 'not used'}",
        done=f"messages          {r.messages} requested, {r.sent} sent, {r.accepted} accepted, "
             f"{r.rejected} rejected, {r.errors} errors" + (" (TIMED OUT)" if r.timed_out else "")
             + (f" ({r.unsent} unsent: stopped at the deadline)" if r.stopped_at_deadline else ""),
        client="load generator", throughput=f"{r.accepted_per_second:.1f} accepted msg/s", latency="latency ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_client_arguments(p, port=2525, timeout_seconds=120.0)
    p.add_argument("--messages", type=int, default=5000, help="total messages")
    p.add_argument("--size", type=int, default=1024, help="body size in bytes")
    p.add_argument("--per-session", type=int, default=1,
                   help="messages per connection before QUIT and reconnect")
    p.add_argument("--pipelining", action=argparse.BooleanOptionalAction, default=True,
                   help="send MAIL/RCPT/DATA in one write when the server offers PIPELINING")
    p.add_argument("--sender", default="bench@client.test")
    p.add_argument("--rcpt", default="user@local.test")
    p.add_argument("--duration-seconds", type=float, default=None,
                   help="soft deadline: start no new message after this many seconds "
                        "(the run then ends early; see `unsent` and `stopped_at_deadline`)")
    p.add_argument("--rate", type=float, default=None,
                   help="messages per second: start message k at k/RATE seconds (paced, "
                        "for latency at a chosen load); default: as fast as possible")
    p.add_argument("--message-file", default=None, metavar="FILE",
                   help="send this whole message (header fields, blank line, body; CRLF line "
                        "ends), a unique Message-ID put first, instead of generated headers "
                        "and a --size body")
    p.add_argument("--latencies", action="store_true",
                   help="with --json: include every accepted message's latency "
                        "(`latencies_ms`)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    coro = run_load(a.host, a.port, a.sessions, a.messages, a.size, a.per_session,
                    pipelining=a.pipelining, sender=a.sender, rcpt=a.rcpt,
                    timeout_seconds=a.timeout_seconds, io_timeout_seconds=a.io_timeout_seconds,
                    ehlo_name=a.ehlo, progress=not a.quiet,
                    duration_seconds=a.duration_seconds, keep_latencies=a.latencies, rate=a.rate,
                    message=None if a.message_file is None else Path(a.message_file).read_bytes())
    result = evloop.run(coro)
    if a.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_text(result))
    if result.stopped_at_deadline:
        return 0 if result.accepted + result.unsent == result.messages else 1
    return 0 if result.accepted == result.messages else 1


if __name__ == "__main__":
    sys.exit(main())
