"""Admission control with real processes: far more clients than file descriptors."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import time

import pytest

from tests.integration.conftest import SmtpClient, greets_within, queued_id, wait_until

pytestmark = pytest.mark.integration

FD_LIMIT = 256
CLIENTS = 600
ANSWER_SECONDS = 10.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def first_line(port: int) -> str:
    """What one client got: "220", "421", "refused" (connect refused or reset), "closed"
    (an EOF without a reply) or "nothing" (no answer within ANSWER_SECONDS)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        return "refused"
    try:
        line = await asyncio.wait_for(reader.readline(), ANSWER_SECONDS)
    except asyncio.TimeoutError:
        line = None
    except ConnectionResetError:
        line = b"reset"
    held.append(writer)  # stay connected until every client has its answer
    if line is None:
        return "nothing"
    if line == b"reset":
        return "refused"
    return line[:3].decode() if line else "closed"


held: list[asyncio.StreamWriter] = []


@pytest.mark.parametrize("caps", [
    {},  # derived from the fd limit: 421 before any process runs out of descriptors
    # Set far above what the fd limit allows: workers and the master do run out.
    {"max_sessions_per_worker": 5000, "max_sessions": 10000},
], ids=["derived_caps", "caps_above_the_fd_limit"])
def test_far_more_clients_than_fds_each_get_an_answer_and_the_master_recovers(mta_server, caps) -> None:
    server = mta_server(wrapper=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"),
                        server={"inbound_workers": 2}, limits={"max_connections_per_ip": 100000, **caps})
    master = server.master_pid
    wait_until(lambda: server.log_bytes().count(b'event=ready child="inbound') >= 2, 15, "2 ready workers", server)
    time.sleep(0.5)
    baseline = open_fds(master)

    async def crowd() -> collections.Counter[str]:
        outcomes = await asyncio.gather(*(first_line(server.port) for _ in range(CLIENTS)))
        for writer in held:
            writer.close()
        held.clear()
        return collections.Counter(outcomes)

    started = time.monotonic()
    after = -1
    outcomes = asyncio.run(crowd())
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 15
    while server.running and (after := open_fds(master)) > baseline + 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_bytes()
    failures = len(re.findall(rb"event=accept_failed", log))
    print(f"\noutcomes {dict(outcomes)} in {elapsed:.1f} s; master fds {baseline} -> {after}; "
          f"accept_failed lines {failures}, log {len(log)} bytes")
    assert after <= baseline + 4, f"the master holds {after} fds, {baseline} before the clients came"
    assert outcomes["nothing"] == 0 and outcomes["closed"] == 0, outcomes
    assert outcomes["220"] > 0 and outcomes["421"] > 0, outcomes
    assert failures <= 20 and len(log) < 2_000_000
    assert server.running and server.master_pid == master

    async def served() -> str | None:  # at once, a full transaction
        client = await asyncio.wait_for(SmtpClient.connect(server.port), 5)
        reply = await client.send_mail("a@example.org", ["u@local.test"], b"Subject: after\r\n\r\nhi\r\n")
        await client.close()
        return queued_id(reply)

    left = time.monotonic()
    wait_until(lambda: greets_within(server.port, 1), 5, "a greeting after the crowd left", server)
    greeted_after = time.monotonic() - left
    msgid = asyncio.run(served())
    assert greeted_after < 2, f"the first 220 after the crowd left took {greeted_after:.1f} s"
    assert msgid is not None and msgid in server.spool_snapshot().envelopes


def test_a_master_out_of_fds_pauses_accepting_logs_once_a_second_and_resumes(mta_server) -> None:
    """Workers stopped (SIGSTOP) while clients pour in: handoffs pile up in the master until
    accept fails with EMFILE. It must not spin on its readable listener writing a line per
    failure; once the workers run again every client is answered and the fds come back."""
    server = mta_server(wrapper=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"),
                        server={"inbound_workers": 2, "heartbeat_timeout_seconds": 60},
                        limits={"max_connections_per_ip": 100000, "max_sessions": 10000,
                                "max_sessions_per_worker": 5000})
    master = server.master_pid
    wait_until(lambda: server.log_bytes().count(b'event=ready child="inbound') >= 2, 15, "2 ready workers", server)
    time.sleep(0.5)
    baseline = open_fds(master)
    workers = [int(p) for p in re.findall(rb'event=ready child="inbound[^"]*" child_pid=(\d+)', server.log_bytes())]
    stalled = 3.0

    async def crowd() -> collections.Counter[str]:
        pending = asyncio.gather(*(first_line(server.port) for _ in range(400)))
        await asyncio.sleep(stalled)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        outcomes = await pending
        for writer in held:
            writer.close()
        held.clear()
        return collections.Counter(outcomes)

    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        outcomes = asyncio.run(crowd())
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while (after := open_fds(master)) > baseline + 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_bytes()
    lines = re.findall(rb"event=accept_failed[^\n]*", log)
    counted = sum(int(n) for n in re.findall(rb"event=accept_failed [^\n]*failures=(\d+)", log))
    print(f"\noutcomes {dict(outcomes)}; master fds {baseline} -> {after}; accept_failed lines {len(lines)} "
          f"counting {counted} failures; log {len(log)} bytes")
    assert lines, "the master never ran out of descriptors: the test proves nothing"
    assert len(lines) <= stalled + 3, "accept failures must be logged once a second, with a count"
    assert outcomes["nothing"] == 0 and outcomes["closed"] == 0, outcomes
    assert after <= baseline + 4, f"the master holds {after} fds, {baseline} before the clients came"
    assert greets_within(server.port, 2)
