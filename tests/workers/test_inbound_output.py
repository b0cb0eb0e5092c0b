"""The inbound worker's output once per loop turn (workers/inbound/output.py), seen from
real loopback clients of InboundProtocol sessions served in this process on uvloop.

The rules: the log lines of one turn leave in one write, before any reply of that turn
(a client that has read its reply finds its line in the log); a reply that ends the
session leaves before the half-close (the client reads it, then the end of the stream).

Each log write is recorded with what every client could read at that moment
(MSG_PEEK on its socket: on loopback a written reply is in the peer's queue at once).
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from mta import logs
from mta.config import LimitsConfig
from tests.mta.test_logs import line_from_a_thread_while_the_loop_sleeps
from tests.workers.test_inbound_session import SMTP, Rig
from workers.inbound.output import TurnWriter
from workers.inbound.protocol import InboundProtocol

CLIENTS = 5
T = TypeVar("T")
REPLY_SECONDS = 5.0


def _peek(client: socket.socket) -> bytes:
    try:
        return client.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class LogWrites(io.StringIO):
    """The log stream: each write, with what each client could read when it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[socket.socket] = []
        self.writes: list[tuple[str, list[bytes]]] = []

    def write(self, text: str) -> int:
        self.writes.append((text, [_peek(c) for c in self.clients]))
        return super().write(text)


@pytest.fixture
def log_writes() -> Iterator[LogWrites]:
    out = LogWrites()
    logs.setup("test", stream=out)
    try:
        yield out
    finally:
        logs.write_each_turn(None)
        logs.setup("test", stream=sys.stderr)


async def _read_until(client: socket.socket, marker: bytes, eof: bool = False) -> bytes:
    """What the client reads until `marker` (and, with `eof`, the end of the stream)."""
    got = b""
    deadline = time.monotonic() + REPLY_SECONDS
    while time.monotonic() < deadline:
        try:
            chunk = client.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        if not chunk:
            return got + b"<EOF>"
        got += chunk
        if marker in got and not eof:
            return got
    raise AssertionError(f"no {marker!r} within {REPLY_SECONDS} s: {got!r}")


def _run(rig: Rig, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return uvloop.run(main())
    finally:
        rig.close()


async def _serve(rig: Rig, log_writes: LogWrites, clients: int) -> tuple[asyncio.AbstractServer, list[socket.socket]]:
    logs.write_each_turn(asyncio.get_running_loop(), rig.ctx.writer.schedule)  # as the worker does
    server = await asyncio.get_running_loop().create_server(lambda: InboundProtocol(rig.ctx, SMTP), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for _ in range(clients):
        log_writes.clients.append(socket.create_connection(("127.0.0.1", port)))
    for client in log_writes.clients:
        await _read_until(client, b"220 mx.test ESMTP\r\n")
    return server, log_writes.clients


def test_the_lines_of_one_turn_leave_in_one_write_before_its_replies(tmp_path: Path, log_writes: LogWrites) -> None:
    rig = Rig(tmp_path)

    async def main() -> list[bytes]:
        server, clients = await _serve(rig, log_writes, CLIENTS)
        for client in clients:
            client.sendall(b"EHLO c.test\r\nMAIL FROM:<a@client.test>\r\n")
            await _read_until(client, b"250 2.1.0")
        del log_writes.writes[:]
        for n, client in enumerate(clients):  # all before the loop runs again: one turn reads them all
            client.sendall(f"RCPT TO:<r{n}@elsewhere.test>\r\n".encode())
        answers = [await _read_until(client, b"\r\n") for client in clients]
        server.close()
        for client in clients:
            client.close()
        return answers

    answers = _run(rig, main)
    assert all(a.startswith(b"554 5.7.1 Relay access denied") for a in answers), answers
    refusals = [(text, peeked) for text, peeked in log_writes.writes if "event=rejected" in text]
    assert len(refusals) == 1, f"the turn's refusals left in {len(refusals)} log writes, not one"
    text, peeked = refusals[0]
    assert text.count("event=rejected") == CLIENTS, text
    assert peeked == [b""] * CLIENTS, f"a reply left before the log lines that record it: {peeked}"


def test_a_timeout_logs_then_replies_then_half_closes(tmp_path: Path, log_writes: LogWrites) -> None:
    rig = Rig(tmp_path, limits=LimitsConfig(command_timeout_seconds=0.3))

    async def main() -> bytes:
        server, (client,) = await _serve(rig, log_writes, 1)
        answer = await _read_until(client, b"", eof=True)
        server.close()
        client.close()
        return answer

    answer = _run(rig, main)
    assert answer == b"421 4.4.2 mx.test Error: timeout exceeded, closing connection\r\n<EOF>", answer
    (peeked,) = [peeked for text, peeked in log_writes.writes if "event=timeout" in text]
    assert peeked == [b""], f"the 421 left before its timeout line: {peeked}"


def test_a_line_logged_first_from_a_thread_leaves_at_the_end_of_the_turn(log_writes: LogWrites) -> None:
    """The pickup's file steps run in an executor and log there (maildrop_settled, ...)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        logs.write_each_turn(loop, TurnWriter(loop).schedule)
        await loop.run_in_executor(None, lambda: logs.event("maildrop_settled", finished=1))
        await asyncio.sleep(0.05)

    uvloop.run(main())
    assert [text for text, _ in log_writes.writes if "event=maildrop_settled finished=1" in text]



def test_the_counts_of_one_turn_are_written_once_per_metric_before_its_lines(log_writes: LogWrites) -> None:
    """The sessions' hot counters (connections, messages, bytes, active sessions): one write
    per metric and turn, before the turn's lines and replies; nothing written for a net 0."""
    written: list[tuple[str, float, int]] = []  # metric, amount, log writes made before it

    class Metric:  # what the writer asks of a prometheus child
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, amount: float = 1) -> None:
            written.append((self.name, amount, len(log_writes.writes)))

    async def main() -> list[tuple[str, float, int]]:
        loop = asyncio.get_running_loop()
        writer = TurnWriter(loop)
        logs.write_each_turn(loop, writer.schedule)
        messages, octets, sessions = Metric("messages"), Metric("octets"), Metric("sessions")
        for size in (100, 24, 900):
            writer.count(sessions)
            writer.count(messages)
            writer.count(octets, size)
            logs.event("received", size=size)
            writer.count(sessions, -1)
        first_turn = list(written)
        await asyncio.sleep(0.01)
        writer.count(messages)
        writer.before_replies()  # a reply written at once: the count goes first
        return first_turn

    assert uvloop.run(main()) == []  # nothing before the end of the turn
    assert written == [("messages", 3, 0), ("octets", 1024, 0), ("messages", 1, 1)], written
    assert len(log_writes.writes) == 1 and log_writes.writes[0][0].count("event=received") == 3


def test_replies_still_leave_when_the_log_cannot_be_written(tmp_path: Path, log_writes: LogWrites) -> None:
    """A log stream that fails (a full disk, a reader gone: EPIPE) loses its lines, never
    the turn's replies: the client is answered and its session goes on."""

    class Broken(LogWrites):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    broken = Broken()
    logs.setup("test", stream=broken)
    rig = Rig(tmp_path)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        handler: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: handler.append(context))
        server, (client,) = await _serve(rig, broken, 1)  # the greeting came through
        client.sendall(b"EHLO c.test\r\n")
        answer = await _read_until(client, b"250 ")
        client.sendall(b"RCPT TO:<r@elsewhere.test>\r\n")  # a 503, logged as a refusal
        answer += await _read_until(client, b"\r\n")
        server.close()
        client.close()
        assert handler and isinstance(handler[0].get("exception"), OSError)  # reported, not silent
        return answer

    answer = _run(rig, main)
    assert b"250-mx.test" in answer and b"503 5.5.1" in answer, answer


def test_a_line_logged_first_from_a_thread_wakes_the_loop_to_write_it() -> None:
    """The pickup's file steps log from an executor thread: the turn's callback is scheduled
    thread-safely, so the line leaves at once, not at the loop's next wake-up."""

    def schedule(loop: asyncio.AbstractEventLoop) -> None:
        logs.write_each_turn(loop, TurnWriter(loop).schedule)

    assert line_from_a_thread_while_the_loop_sleeps(schedule) < 1.5
