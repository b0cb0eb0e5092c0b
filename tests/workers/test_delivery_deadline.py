"""OutboundSession's deadline: the command timeout per reply, the data timeout over the
content and its final reply, against a scripted peer that stalls at one step.

The session keeps one deadline and one timer (no asyncio.timeout per reply): these
tests hold it to the old semantics. A stall longer than the timeout fails the step
that stalled, within about the timeout; a peer slower than the timeout in total but
quicker at each step is never cut; idle time between messages counts for nothing.
Every test runs under the asyncio and the uvloop event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from workers.delivery.session import Outbound, OutboundRecipient, OutboundSession, SessionError

TEST_SECONDS = 20.0
T = TypeVar("T")


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Any:
    return uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop


def run(loop_factory: Any, coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, TEST_SECONDS))


class StallingPeer:
    """An SMTP server that waits `stalls[verb]` seconds before its reply to that verb
    ("GREETING" for the greeting, "." for the end of data), `every` seconds before
    each reply, and never advertises PIPELINING (one command, one reply)."""

    def __init__(self, stalls: dict[str, float] | None = None, every: float = 0.0) -> None:
        self.stalls = stalls or {}
        self.every = every
        self.messages = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _reply(self, writer: asyncio.StreamWriter, verb: str, text: bytes) -> None:
        await asyncio.sleep(self.every + self.stalls.get(verb, 0.0))
        writer.write(text)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._reply(writer, "GREETING", b"220 peer.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].decode().upper()
                if verb == "EHLO":
                    await self._reply(writer, verb, b"250-peer.test\r\n250 8BITMIME\r\n")
                elif verb == "DATA":
                    await self._reply(writer, verb, b"354 go on\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.messages += 1
                    await self._reply(writer, ".", b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:
                    await self._reply(writer, verb, b"250 2.0.0 ok\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client timed out and dropped us: what these tests provoke
        finally:
            writer.close()


def message() -> Outbound:
    return Outbound(msgid="0123456789abcdef01234", sender="s@relay.test",
                    recipients=[OutboundRecipient("a@x.test"), OutboundRecipient("b@x.test")],
                    body=b"Subject: t\r\n\r\nhello\r\n")


async def session(port: int, command: float, data: float) -> OutboundSession:
    return await OutboundSession.open("peer.test", "127.0.0.1", port, helo_name="relay.test", tls="none",
                                      connect_timeout=5, command_timeout=command, data_timeout=data)


@pytest.mark.parametrize(("verb", "doing"), [("MAIL", "sending MAIL FROM"), ("RCPT", "sending RCPT TO"),
                                             ("DATA", "sending DATA")])
def test_a_stalled_command_times_out_at_that_step(loop_factory: Any, verb: str, doing: str) -> None:
    async def scenario() -> tuple[list[Any], float, int]:
        peer = StallingPeer({verb: 3.0})
        outbound = await session(await peer.start(), command=0.3, data=10)
        started = time.monotonic()
        results = await outbound.send(message())
        elapsed = time.monotonic() - started
        await outbound.close()
        await peer.stop()
        return results, elapsed, peer.messages

    results, elapsed, delivered = run(loop_factory, scenario())
    assert [(r.code, r.status) for r in results] == [(451, "4.4.2")] * 2
    assert results[0].text.endswith(f"timed out while {doing}")
    assert 0.25 < elapsed < 2.0 and delivered == 0


def test_a_stalled_greeting_times_out(loop_factory: Any) -> None:
    async def scenario() -> str:
        peer = StallingPeer({"GREETING": 3.0})
        port = await peer.start()
        try:
            await session(port, command=0.3, data=10)
        except SessionError as exc:
            return exc.text
        finally:
            await peer.stop()
        raise AssertionError("the session opened")

    assert run(loop_factory, scenario()).endswith("timed out while receiving the initial server greeting")


def test_a_peer_slow_at_every_step_but_within_the_timeout_is_not_cut(loop_factory: Any) -> None:
    """Each reply comes after 0.15 s, the command timeout is 0.4 s: two messages take
    well over the timeout in total (one deadline must move with every reply)."""
    async def scenario() -> tuple[list[list[Any]], float, int]:
        peer = StallingPeer(every=0.15)
        outbound = await session(await peer.start(), command=0.4, data=0.4)
        started = time.monotonic()
        results = [await outbound.send(message()) for _ in range(2)]
        elapsed = time.monotonic() - started
        await outbound.close()
        await peer.stop()
        return results, elapsed, peer.messages

    results, elapsed, delivered = run(loop_factory, scenario())
    assert [[r.code for r in rs] for rs in results] == [[250, 250]] * 2
    assert elapsed > 1.0 and delivered == 2


def test_the_final_reply_waits_under_the_data_timeout(loop_factory: Any) -> None:
    """0.8 s before the 250 to the final dot: over the command timeout (0.3 s), within the
    data timeout (3 s). Delivered."""
    async def scenario() -> tuple[list[Any], int]:
        peer = StallingPeer({".": 0.8})
        outbound = await session(await peer.start(), command=0.3, data=3)
        results = await outbound.send(message())
        await outbound.close()
        await peer.stop()
        return results, peer.messages

    results, delivered = run(loop_factory, scenario())
    assert [r.code for r in results] == [250, 250] and delivered == 1


def test_the_final_reply_times_out_under_the_data_timeout(loop_factory: Any) -> None:
    async def scenario() -> tuple[list[Any], float]:
        peer = StallingPeer({".": 3.0})
        outbound = await session(await peer.start(), command=10, data=0.3)
        started = time.monotonic()
        results = await outbound.send(message())
        elapsed = time.monotonic() - started
        await outbound.close()
        await peer.stop()
        return results, elapsed

    results, elapsed = run(loop_factory, scenario())
    assert [(r.code, r.status) for r in results] == [(451, "4.4.2")] * 2
    assert results[0].text.endswith("timed out while receiving the reply to end of data")
    assert 0.25 < elapsed < 2.0


def test_a_short_command_timeout_after_a_long_data_timeout_still_fires(loop_factory: Any) -> None:
    """The data timeout (10 s) set for the first message's content, whose final reply
    takes longer than the command timeout, must not carry over to the second message's
    MAIL, which stalls: it fails after the command timeout."""
    async def scenario() -> tuple[list[Any], list[Any], float]:
        peer = StallingPeer({".": 0.6})
        outbound = await session(await peer.start(), command=0.3, data=10)
        first = await outbound.send(message())
        peer.stalls = {"MAIL": 5.0}
        started = time.monotonic()
        second = await outbound.send(message())
        elapsed = time.monotonic() - started
        await outbound.close()
        await peer.stop()
        return first, second, elapsed

    first, second, elapsed = run(loop_factory, scenario())
    assert [r.code for r in first] == [250, 250]
    assert second[0].code == 451 and second[0].text.endswith("timed out while sending MAIL FROM")
    assert elapsed < 2.0


def test_idle_time_between_messages_is_not_a_timeout(loop_factory: Any) -> None:
    """A connection kept between messages for longer than both timeouts: the next
    message goes out on it."""
    async def scenario() -> tuple[list[Any], list[Any], bool, int]:
        peer = StallingPeer()
        outbound = await session(await peer.start(), command=0.2, data=0.2)
        first = await outbound.send(message())
        await asyncio.sleep(0.6)
        second = await outbound.send(message())
        reusable = outbound.reusable
        await outbound.close()
        await peer.stop()
        return first, second, reusable, peer.messages

    first, second, reusable, delivered = run(loop_factory, scenario())
    assert [r.code for r in first + second] == [250] * 4
    assert reusable and delivered == 2
