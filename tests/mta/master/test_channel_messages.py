"""Both ends of a master channel (a real SEQPACKET socketpair) with typed messages: the
child's MasterLink says Hello, then Status; a frame that is not a message for the
receiver is logged and drops the channel, never a KeyError in a handler, and descriptors
that came with it are closed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import selectors
import socket
import sys
from collections.abc import Iterator

import msgpack
import pytest
import uvloop

from mta import frames, logs, messages
from mta.config import Config
from mta.master.arbiter import Arbiter
from mta.master.children import Child, ChildState, Handoff
from workers.link import MasterLink


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.setup("test", stream=out)
    try:
        yield out
    finally:
        logs.setup("test", stream=sys.stderr)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the child's end ------------------------------------------------------------------------

def run_link(master_sends: bytes, fds: list[int], on_frame: bool) -> tuple[list[messages.Message], bool]:
    """A MasterLink on a fresh channel; the master end writes `master_sends` (with `fds`).
    What the link sent, and whether it gave the master up."""
    async def main() -> tuple[list[messages.Message], bool]:
        master, child = frames.channel_pair()
        gone = asyncio.Event()
        taken: list[messages.Message] = []

        def take(message: messages.Message, got: list[int]) -> None:
            if not isinstance(message, messages.Conn):
                raise messages.unexpected(message, "from the master")
            taken.append(message)
            for fd in got:
                os.close(fd)

        link = MasterLink(child, lambda: messages.Status("ready", 3), gone.set, take if on_frame else None)
        with master, child:
            link.start()
            if fds:
                socket.send_fds(master, [master_sends], fds)
            else:
                master.send(master_sends)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), 1.0)
            link.stop_reading()  # (a no-op once the master is given up)
            sent = []
            with contextlib.suppress(BlockingIOError):
                while (got := frames.recv_frame(master)) is not None:
                    sent.append(got[0])
            return sent + taken, gone.is_set()
    return uvloop.run(main())


def test_the_link_says_hello_with_this_builds_version_then_its_status(log: io.StringIO) -> None:
    sent, gone = run_link(messages.encode(messages.Conn(((1, "127.0.0.1:25"),))), [], on_frame=True)
    assert sent[:2] == [messages.hello("child"), messages.Status("ready", 3)]
    assert sent[-1] == messages.Conn(((1, "127.0.0.1:25"),)) and not gone  # handed to on_frame


@pytest.mark.parametrize(("data", "on_frame", "says"), [
    (b"\xc1", True, "not msgpack"),
    (msgpack.packb({"t": "conn", "id": 1, "l": "x"}), True, "an untyped 'conn' frame"),
    (messages.encode(messages.Close(1)), True, "unexpected Close from the master"),
    (messages.encode(messages.Conn(((1, "x"),))), False, "unexpected Conn from the master"),  # a scheduler takes none
], ids=["garbage", "untyped", "wrong-kind", "none-taken"])
def test_a_frame_that_is_not_for_the_child_is_logged_and_the_master_given_up(
        log: io.StringIO, data: bytes, on_frame: bool, says: str) -> None:
    carried = socket.socket()
    before = open_fds()
    sent, gone = run_link(data, [carried.fileno()], on_frame)
    carried.close()
    assert gone and [type(m) for m in sent] == [messages.Hello, messages.Status]  # then nothing
    assert "event=bad_frame peer=master" in log.getvalue() and says in log.getvalue()
    assert "event=master_gone" in log.getvalue()
    assert open_fds() == before - 1  # the descriptor that came with it was closed too


# --- the master's end -----------------------------------------------------------------------

@pytest.fixture
def arbiter() -> Iterator[Arbiter]:
    arbiter = Arbiter(Config(), {}, lambda config, existing: {})
    yield arbiter
    for child in arbiter._children.values():
        child.channel.close()
    arbiter._selector.close()
    os.close(arbiter._wakeup_r)
    os.close(arbiter._wakeup_w)


def add_child(arbiter: Arbiter, pid: int) -> tuple[Child, socket.socket]:
    parent, end = frames.channel_pair()
    child = Child(pid=pid, kind="inbound", index=1, generation=0, channel=parent, started=0.0, last_seen=0.0)
    arbiter._children[pid] = child
    arbiter._selector.register(parent, selectors.EVENT_READ)
    return child, end


def test_a_childs_hello_and_status_make_it_ready(arbiter: Arbiter, log: io.StringIO) -> None:
    child, end = add_child(arbiter, 101)
    with end:
        frames.send_frame(end, messages.hello("child"))
        frames.send_frame(end, messages.Status("ready", 4))
        arbiter._on_channel(child, child.channel)  # one frame per readiness: the Hello,
        assert child.state is ChildState.STARTING
        arbiter._on_channel(child, child.channel)  # then the Status
    assert child.state is ChildState.READY and child.active == 4 and not child.channel_lost_at
    assert "event=bad_frame" not in log.getvalue()


@pytest.mark.parametrize(("data", "event", "says"), [
    (msgpack.packb((0, messages.PROTOCOL_VERSION + 1, "child", 101, 0)), "protocol_mismatch",
     f"speaks message protocol {messages.PROTOCOL_VERSION + 1}"),
    (msgpack.packb({"t": "status", "state": "ready", "active": 0}), "bad_frame", "an untyped 'status' frame"),
    (msgpack.packb((1, "ready")), "bad_frame", "a Status has 2 fields, not 1"),
    (messages.encode(messages.Job(1, 2, "x", (0,))), "bad_frame", "unexpected Job from a child"),
], ids=["other-version", "untyped", "wrong-arity", "wrong-kind"])
def test_a_frame_that_is_not_for_the_master_loses_the_childs_channel(
        arbiter: Arbiter, log: io.StringIO, data: bytes, event: str, says: str) -> None:
    """Logged; the child is never handed a connection again and its pending ones go to
    another worker (the housekeeping kills it if it does not exit)."""
    child, end = add_child(arbiter, 101)
    client, conn = socket.socketpair()
    child.pending[7] = Handoff("127.0.0.1:25", conn.fileno(), 0.0)
    with end, client:
        end.send(data)
        frames.send_frame(end, messages.Status("ready", 9))  # never read: the channel is dropped first
        arbiter._on_channel(child, child.channel)
        assert child.channel_lost_at > 0 and child.state is ChildState.STARTING and child.active == 0
        assert list(arbiter._dispatch.orphans) == [("127.0.0.1:25", conn.fileno())] and not child.pending
        assert f'event={event} child="inbound#1 gen0" child_pid=101' in log.getvalue() and says in log.getvalue()
        assert arbiter._dispatch.least_loaded() is None
        conn.close()
