"""The master's handoff to an inbound worker with real processes: connections accepted
together travel in one frame (several descriptors per sendmsg), every one is served;
descriptors the kernel drops at the worker's fd limit are answered 421, exactly those;
the client address a session logs and writes in Received is the real one on IPv4 and
IPv6 listeners.

To make the master accept several connections in one loop iteration, the test stops it
(SIGSTOP) while the clients connect: the kernel completes their handshakes into the
listener's backlog, and after SIGCONT one accept burst takes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    MtaServer,
    SmtpClient,
    free_port,
    queued_id,
    split_received,
    wait_until,
)

pytestmark = pytest.mark.integration

MESSAGE = b"Subject: handoff\r\n\r\nhi\r\n"


def inbound_pid(server: MtaServer) -> int:
    found = re.findall(rb'event=spawned child="inbound#1 gen1" child_pid=(\d+)', server.log_bytes())
    assert found, server.log_tail()
    return int(found[-1])


@contextlib.contextmanager
def master_stopped(server: MtaServer) -> Iterator[Callable[[], None]]:
    """The master stopped; the block may resume it early (the callable), it resumes at the end."""
    master = server.master_pid
    os.kill(master, signal.SIGSTOP)
    try:
        yield lambda: os.kill(master, signal.SIGCONT)
    finally:
        os.kill(master, signal.SIGCONT)


def quiet_fds(pid: int) -> set[int] | None:
    """The process's open descriptors if they stay the same for half a second (the
    start's greeting probe has ended), else None."""
    before = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    time.sleep(0.5)
    return before if before == {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")} else None


def set_soft_nofile(pid: int, soft: int | None) -> int:
    """Set the process's soft RLIMIT_NOFILE (None: keep it); the one it had."""
    out = subprocess.run(["prlimit", f"--pid={pid}", "--nofile", "--output=SOFT,HARD", "--noheadings"],
                         check=True, capture_output=True, text=True).stdout.split()
    if soft is not None:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{out[1]}"], check=True)
    return int(out[0])


def connect_queued(port: int, count: int) -> list[socket.socket]:
    """Clients whose handshakes the kernel completed into the backlog (nobody accepted yet)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def first_line(client: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = client.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def traced_sendmsg(pid: int, out: Path) -> Iterator[None]:
    """strace the master's sendmsg calls until the block ends."""
    tracer = subprocess.Popen(["strace", "-qq", "-e", "trace=sendmsg", "-o", str(out), "-p", str(pid)],
                              stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: f"TracerPid:\t{tracer.pid}\n" in Path(f"/proc/{pid}/status").read_text(),
                   5, "strace attached")
        yield
    finally:
        tracer.terminate()
        tracer.wait(5)


def test_connections_accepted_together_go_in_one_frame_and_each_is_served(
        mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    server = mta_server(server={"inbound_workers": 1})
    trace = tmp_path / "sendmsg.trace"
    with master_stopped(server) as resume:
        clients = connect_queued(server.port, 5)
        with traced_sendmsg(server.master_pid, trace):
            resume()
            greetings = [first_line(client) for client in clients]
    assert all(line.startswith(b"220 ") for line in greetings), greetings
    # One sendmsg handed all five to the worker: five descriptors in its SCM_RIGHTS.
    handoffs = [line for line in trace.read_text().splitlines() if "SCM_RIGHTS" in line]
    assert [len(re.search(r"cmsg_data=\[([^\]]*)\]", line).group(1).split(",")) for line in handoffs] == [5]

    async def transaction(client: socket.socket) -> str | None:
        reader, writer = await asyncio.open_connection(sock=client)
        smtp = SmtpClient(reader, writer)
        assert (await smtp.command("EHLO client.test")).code == 250
        reply = await smtp.send_mail("a@client.test", ["b@local.test"], MESSAGE)
        await smtp.close()
        return queued_id(reply)

    async def all_of_them() -> list[str | None]:
        return await asyncio.gather(*(transaction(client) for client in clients))

    ids = asyncio.run(all_of_them())
    assert all(ids) and len(set(ids)) == 5
    assert set(ids) <= set(server.spool_snapshot().envelopes)


def test_descriptors_dropped_at_the_workers_fd_limit_get_421_exactly_those(
        mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server(server={"inbound_workers": 1})
    worker = inbound_pid(server)
    settled = wait_until(lambda: quiet_fds(worker), 10, "the worker's descriptors settled", server)
    with master_stopped(server):
        clients = connect_queued(server.port, 3)
        # Room for one more descriptor in the worker: the frame's first is installed, the
        # kernel drops the other two (MSG_CTRUNC).
        lowest_free = min(set(range(65536)) - settled)
        limit = set_soft_nofile(worker, lowest_free + 1)
    try:
        lines = sorted(first_line(client)[:9] for client in clients)
    finally:
        set_soft_nofile(worker, limit)
        for client in clients:
            client.close()
    assert lines == [b"220 mx.te", b"421 4.3.2", b"421 4.3.2"], lines
    wait_until(lambda: b"reason=fd_limit refused=2" in server.log_bytes(), 5, "the refusals logged", server)

    async def served() -> str | None:
        client = await SmtpClient.connect(server.port)
        reply = await client.send_mail("a@client.test", ["b@local.test"], MESSAGE)
        await client.close()
        return queued_id(reply)

    assert asyncio.run(served()) is not None  # the worker serves on


@pytest.mark.parametrize(("host", "listen", "shown"), [
    ("127.0.0.1", "127.0.0.1:{port}", "127.0.0.1"),
    ("::1", "[::1]:{port}", "::1"),
], ids=["ipv4", "ipv6"])
def test_the_session_logs_and_receives_with_the_clients_real_address(
        mta_server: Callable[..., MtaServer], host: str, listen: str, shown: str) -> None:
    port = free_port()
    server = mta_server(start=False, listener=[{"address": listen.format(port=port)}])
    server.port = port
    server.host = host
    server.start()

    async def send() -> str | None:
        client = await SmtpClient.connect(port, host=host)
        reply = await client.send_mail("a@client.test", ["b@local.test"], MESSAGE)
        await client.close()
        return queued_id(reply)

    msgid = asyncio.run(send())
    assert msgid is not None
    header, _ = split_received(server.queue_body(msgid))
    assert f"from client.test ([{shown}])".encode() in header
    assert f"event=connect client={shown} listener={listen.format(port=port)}".encode() in server.log_bytes()
