"""The master's handoff with real sockets and SEQPACKET channels, no forked processes.

Each "worker" is the child end of a real channel pair; a dead worker is one whose end
is closed, so send_fds fails with EPIPE exactly as after a kill -9 the master has not
reaped yet. The master holds accepted sockets as bare descriptors.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from mta import config as configmod
from mta import frames, messages
from mta.master.children import Child, ChildState
from mta.master.dispatch import HANDOFF_TIMEOUT_SECONDS, Dispatcher

SMTP = "127.0.0.1:2525"
SMTPS = "127.0.0.1:4650"


def parse(**limits: int) -> configmod.Config:
    return configmod.parse({
        "server": {"hostname": "mx.test", "inbound_workers": 2}, "queue": {"path": "/nonexistent"},
        "tls": {"cert_file": "/x.pem", "key_file": "/x.key"}, "limits": limits,
        "listener": [{"address": SMTP}, {"address": SMTPS, "mode": "smtps"}],
    })


class Rig:
    """Workers (the child ends of their channels), a dispatcher, and TCP clients to hand over."""

    def __init__(self, stack: contextlib.ExitStack, **limits: int) -> None:
        self._stack = stack
        self.children: dict[int, Child] = {}
        self.ends: dict[int, socket.socket] = {}
        self.woken = 0
        self.dispatch = Dispatcher(self.children, lambda: 1, self._wake)
        self.dispatch.admission.configure(parse(**limits))
        self.listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))

    def _wake(self) -> None:
        self.woken += 1

    def worker(self, pid: int, active: int = 0) -> Child:
        parent, end = frames.channel_pair()
        self._stack.callback(parent.close)
        self._stack.callback(end.close)
        child = Child(pid=pid, kind="inbound", index=pid, generation=1, channel=parent, started=0.0,
                      state=ChildState.READY, active=active)
        self.children[pid] = child
        self.ends[pid] = end
        return child

    def client(self) -> tuple[socket.socket, int]:
        """(the client's socket, the accepted descriptor the master hands over)."""
        client = self._stack.enter_context(socket.create_connection(self.listener.getsockname(), timeout=5))
        conn, _ = self.listener.accept()
        return client, conn.detach()

    def hand(self, address: str, fd: int) -> None:
        """One connection accepted in a loop iteration: handed, then the iteration's flush."""
        self.dispatch.hand(address, fd)
        self.dispatch.flush()

    def received(self, pid: int) -> list[messages.Conn]:
        """Frames waiting at worker `pid`; each must carry one descriptor per entry."""
        got = []
        while True:
            try:
                frame = frames.recv_frame(self.ends[pid])
            except BlockingIOError:
                return got
            assert frame is not None
            message, fds = frame
            assert isinstance(message, messages.Conn) and len(fds) == len(message.conns), frame
            for fd in fds:
                socket.close(fd)
            got.append(message)


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def rig() -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        yield Rig(stack)


@pytest.fixture
def rig_factory() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def test_a_dead_workers_channel_hands_the_connection_to_another(rig: Rig) -> None:
    dead, alive = rig.worker(101, active=0), rig.worker(102, active=5)
    rig.ends[101].close()  # killed, not reaped: the least loaded, chosen first
    _client, conn = rig.client()
    rig.hand(SMTP, conn)  # EPIPE inside: must not raise
    assert dead.channel_lost_at > 0 and not dead.pending
    assert [type(f) for f in rig.received(102)] == [messages.Conn]
    assert len(alive.pending) == 1
    _client2, conn2 = rig.client()
    rig.hand(SMTP, conn2)  # the lost worker is never chosen again
    assert len(alive.pending) == 2 and [type(f) for f in rig.received(102)] == [messages.Conn]


def test_a_lost_workers_pending_connections_go_to_another(rig: Rig) -> None:
    dead = rig.worker(101)
    conns = [rig.client()[1] for _ in range(3)]
    for conn in conns:
        rig.hand(SMTP, conn)
    assert len(dead.pending) == 3
    rig.ends[101].close()
    alive = rig.worker(102, active=50)
    _client, conn = rig.client()
    rig.hand(SMTP, conn)  # tries 101 first (load 3 < 50): EPIPE
    assert dead.channel_lost_at > 0 and len(rig.dispatch.orphans) == 3 and rig.woken
    rig.dispatch.hand_orphans()
    assert not rig.dispatch.orphans and len(alive.pending) == 4
    # this one, then the three orphans together: one frame for a pass over the orphans
    assert [len(frame.conns) for frame in rig.received(102)] == [1, 3]


def test_with_no_worker_left_the_connection_waits_as_an_orphan(rig: Rig) -> None:
    dead = rig.worker(101)
    rig.ends[101].close()
    _client, conn = rig.client()
    rig.hand(SMTP, conn)
    assert dead.channel_lost_at > 0 and list(rig.dispatch.orphans) == [(SMTP, conn)]


def read_all(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize(("answer", "client_reads"), [
    (messages.Took, b""),  # the worker owns it now: the master says nothing
    (messages.Refused, b"421 4.3.2 mx.test Service not available, too busy, closing connection\r\n"),
])
def test_the_workers_answer_closes_the_masters_copy(rig: Rig, answer: type[messages.Took | messages.Refused],
                                                    client_reads: bytes) -> None:
    child = rig.worker(101)
    client, conn = rig.client()
    rig.hand(SMTP, conn)
    (frame,) = rig.received(101)  # the "worker" closes what it got
    rig.dispatch.on_answer(child, answer((frame.conns[0][0],), 7))
    assert not child.pending and child.active == 7 and is_closed(conn)
    assert read_all(client) == client_reads


def test_caps_answer_421_before_any_handoff(rig_factory: contextlib.ExitStack) -> None:
    rig = Rig(rig_factory, max_sessions=3, max_sessions_per_worker=2)
    rig.worker(101, active=1)
    rig.worker(102, active=1)
    clients = [rig.client() for _ in range(3)]
    for _client, conn in clients:
        rig.hand(SMTP, conn)
    # The first fills 101 or 102 to 2; the second finds the total at 3: refused.
    assert len(rig.received(101)) + len(rig.received(102)) == 1
    for client, _conn in clients[1:]:
        assert read_all(client).startswith(b"421 4.3.2 ")


def test_the_per_worker_cap_refuses_when_the_least_loaded_is_full(rig_factory: contextlib.ExitStack) -> None:
    rig = Rig(rig_factory, max_sessions_per_worker=2)
    rig.worker(101, active=2)
    rig.worker(102, active=1)
    (c1, conn1), (c2, conn2) = rig.client(), rig.client()
    rig.hand(SMTP, conn1)
    rig.hand(SMTP, conn2)
    assert len(rig.received(102)) == 1 and rig.received(101) == []
    assert read_all(c2).startswith(b"421 4.3.2 ")


def test_smtps_refusals_close_without_a_plaintext_reply(rig_factory: contextlib.ExitStack) -> None:
    rig = Rig(rig_factory, max_sessions=1)
    rig.worker(101, active=1)
    client, conn = rig.client()
    rig.hand(SMTPS, conn)
    assert read_all(client) == b""


def test_an_unacknowledged_handoff_expires(rig: Rig) -> None:
    child = rig.worker(101)
    _client, conn = rig.client()
    rig.hand(SMTP, conn)
    since = child.pending[next(iter(child.pending))].since
    rig.dispatch.expire(since + HANDOFF_TIMEOUT_SECONDS - 0.1)
    assert len(child.pending) == 1
    rig.dispatch.expire(since + HANDOFF_TIMEOUT_SECONDS + 0.1)
    assert not child.pending and is_closed(conn) and child.load == 0


def test_the_connections_of_one_iteration_leave_together_at_the_flush(rig: Rig) -> None:
    """One sendmsg per frames.MAX_FDS descriptors; each entry's descriptor is its client's."""
    child = rig.worker(101)
    clients = [rig.client() for _ in range(frames.MAX_FDS + 2)]
    for _client, fd in clients:
        rig.dispatch.hand(SMTP, fd)
    assert len(child.pending) == len(clients) and child.load == len(clients)  # counted before it is sent
    assert rig.received(101) == []
    rig.dispatch.flush()
    got = []
    while True:
        try:
            got.append(frames.recv_frame(rig.ends[101]))
        except BlockingIOError:
            break
    assert [len(message.conns) for message, _fds in got] == [frames.MAX_FDS, 2]
    entries = [entry for message, _fds in got for entry in message.conns]
    fds = [fd for _message, fds in got for fd in fds]
    assert sorted(conn_id for conn_id, _ in entries) == sorted(child.pending) and not child.unsent
    for (client, _fd), fd in zip(clients, fds):  # in order: entry i came with descriptor i
        with socket.socket(fileno=fd) as received:
            received.sendall(b"x")
            assert client.recv(1) == b"x"


def test_a_frame_partly_refused_answers_421_for_exactly_those(rig: Rig) -> None:
    child = rig.worker(101)
    clients = [rig.client() for _ in range(3)]
    for _client, fd in clients:
        rig.dispatch.hand(SMTP, fd)
    rig.dispatch.flush()
    (frame,) = rig.received(101)
    ids = [conn_id for conn_id, _ in frame.conns]
    rig.dispatch.on_answer(child, messages.Took(tuple(ids[:1]), 1))
    rig.dispatch.on_answer(child, messages.Refused(tuple(ids[1:]), 1))
    assert not child.pending and child.load == 1
    assert all(is_closed(fd) for _client, fd in clients)
    assert read_all(clients[0][0]) == b""  # (its copy went with the frame, closed by the "worker")
    for client, _fd in clients[1:]:
        assert read_all(client).startswith(b"421 4.3.2 ")


def test_a_full_channel_sends_the_frame_to_the_next_worker(rig: Rig) -> None:
    full, other = rig.worker(101), rig.worker(102, active=5)
    while frames.send_frame(full.channel, messages.Status("ready", 0)):
        pass  # worker 101 is not reading
    clients = [rig.client() for _ in range(2)]
    for _client, fd in clients:
        rig.dispatch.hand(SMTP, fd)  # both to 101, the least loaded
    assert len(full.pending) == 2
    rig.dispatch.flush()
    assert not full.pending and not full.channel_lost_at
    assert [len(frame.conns) for frame in rig.received(102)] == [2] and len(other.pending) == 2
