"""[limits] max_connections_per_ip with real processes: one count for all inbound workers
(conncount.py's shared table), and a worker killed with -9 never locks an address out."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, wait_until
from workers.inbound.conncount import FILE_NAME

pytestmark = pytest.mark.integration

LIMIT = 4
REFUSED = b"421 4.7.0 Error: too many connections from your address"


def started(server: MtaServer, workers: int) -> MtaServer:
    wait_until(lambda: server.log_bytes().count(b'event=ready child="inbound') >= workers, 15,
               f"{workers} ready inbound workers", server)
    return server


def connect_pids(server: MtaServer) -> list[int]:
    """The worker pid of each connect logged, in order."""
    return [int(p) for p in re.findall(rb"pid=(\d+) event=connect ", server.log_bytes())]


async def refused_line(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = await reader.readline()
    writer.close()
    return line


async def hold(port: int, n: int) -> list[SmtpClient]:
    """`n` sessions opened one after another (the master gives each to the least loaded worker)."""
    clients = [await SmtpClient.connect(port, helo=None) for _ in range(n)]
    assert [c.greeting.code if c.greeting else 0 for c in clients] == [220] * n, [str(c.greeting) for c in clients]
    return clients


async def close_all(clients: list[SmtpClient]) -> None:
    for client in clients:
        await client.close()


def test_the_limit_counts_the_connections_of_every_worker(mta_server) -> None:
    server = started(mta_server(server={"inbound_workers": 2}, limits={"max_connections_per_ip": LIMIT}), 2)

    async def scenario() -> tuple[bytes, int]:
        before = len(connect_pids(server))  # MtaServer.start's probe connected too
        clients = await hold(server.port, LIMIT)
        held.extend(connect_pids(server)[before:])
        refused = await refused_line(server.port)
        await clients.pop().close()
        again = await SmtpClient.connect(server.port)  # one given back: one more admitted
        code = again.greeting.code if again.greeting else 0
        await close_all([*clients, again])
        return refused, code

    held: list[int] = []
    refused, code = asyncio.run(scenario())
    assert len(set(held)) == 2, held  # the sessions held were in both workers
    assert refused.startswith(REFUSED), refused
    assert code == 220
    cache = Path(str(server.spool) + "-cache") / FILE_NAME
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert server.stop() == 0


def test_a_worker_killed_holding_connections_does_not_lock_the_address_out(mta_server) -> None:
    server = started(mta_server(server={"inbound_workers": 2}, limits={"max_connections_per_ip": LIMIT}), 2)

    async def scenario() -> bytes:
        before = len(connect_pids(server))  # MtaServer.start's probe connected too
        clients = await hold(server.port, LIMIT)
        held = connect_pids(server)[before:]
        victim = held[0]
        os.kill(victim, signal.SIGKILL)  # it dies holding its sessions: no give-back
        wait_until(lambda: server.log_bytes().count(b'event=ready child="inbound') >= 3, 15,
                   "the killed worker replaced", server)
        survivors = [c for c, pid in zip(clients, held, strict=True) if pid != victim]
        more = await hold(server.port, LIMIT - len(survivors))  # the dead worker's places are free
        refused = await refused_line(server.port)  # and the limit still holds
        await close_all([*clients, *more])
        return refused

    refused = asyncio.run(scenario())
    assert refused.startswith(REFUSED), refused
    assert server.stop() == 0
