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


async def admitted_soon(port: int) -> SmtpClient:
    """A session, once a place is free: a worker gives one back right after its 221 to a
    QUIT, so a connect in another worker may come a moment before."""
    for _ in range(50):
        client = await SmtpClient.connect(port, helo=None)
        if client.greeting and client.greeting.code == 220:
            return client
        await client.close()
        await asyncio.sleep(0.05)
    return client


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
        again = await admitted_soon(server.port)  # one given back: one more admitted
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


def test_a_reload_counts_the_retiring_generations_connections(mta_server) -> None:
    server = started(mta_server(server={"inbound_workers": 1}, limits={"max_connections_per_ip": 2}), 1)

    async def scenario() -> tuple[bytes, int]:
        old = await hold(server.port, 2)  # held by generation 1, which retires once they end
        os.kill(server.master_pid, signal.SIGHUP)
        wait_until(lambda: re.search(rb'event=ready child="inbound#1 gen2', server.log_bytes()), 15,
                   "generation 2 ready", server)
        refused = await refused_line(server.port)  # generation 2 counts generation 1's two
        await old.pop().close()
        new = await admitted_soon(server.port)
        code = new.greeting.code if new.greeting else 0
        await close_all([*old, new])
        return refused, code

    refused, code = asyncio.run(scenario())
    assert refused.startswith(REFUSED), refused
    assert code == 220
    assert re.search(rb"pid=\d+ event=refused client=127\.0\.0\.1 reason=max_connections_per_ip", server.log_bytes())
    assert server.stop() == 0
