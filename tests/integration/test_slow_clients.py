"""Slow clients and memory: deadlines no trickle restarts, and the worker's memory budget.

Real clients over loopback against a real server with small limits: a byte every 0.3 s
meets no idle timeout (5 s) but meets data_total_timeout_seconds or
session_timeout_seconds (2 s); connections holding unfinished DATA spend the worker's
max_worker_buffered_bytes, and new transfers get 4xx 4.3.1 until they leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
import struct
import termios
import time

import pytest

from tests.integration.conftest import MIB, MtaServer, Reply, SmtpClient, queued_id, wait_until
from tests.integration.test_master import inbound_workers
from tests.integration.test_metrics import get, sample

pytestmark = pytest.mark.integration

TRICKLE_SECONDS = 0.3
IDLE = {"command_timeout_seconds": 5, "data_timeout_seconds": 5}
TRANSFER_DEADLINE = {**IDLE, "data_total_timeout_seconds": 2, "session_timeout_seconds": 60}
TIMEOUT_421 = re.compile(r"^4\.4\.2 mx\.test Error: timeout exceeded")
LINE = b"x" * 1022 + b"\r\n"  # 1 KiB


async def trickle(client: SmtpClient, data: bytes, limit: float = 10.0) -> tuple[list[Reply], float]:
    """Send `data` one byte per TRICKLE_SECONDS (repeated) until a 421 or `limit`: (replies, seconds)."""
    start = time.monotonic()
    got: list[Reply] = []
    read = asyncio.ensure_future(client.read_reply())
    i = 0
    while time.monotonic() - start < limit:
        client.writer.write(data[i % len(data):i % len(data) + 1])
        i += 1
        done, _ = await asyncio.wait([read], timeout=TRICKLE_SECONDS)
        if done:
            got.append(read.result())
            if got[-1].code == 421:
                return got, time.monotonic() - start
            read = asyncio.ensure_future(client.read_reply())
    read.cancel()
    raise AssertionError(f"no 421 after {limit} s of trickling; replies: {[str(r) for r in got]}")


async def closed_by_server(client: SmtpClient) -> bool:
    """Whether the server ends the connection after its 421 (then closed on our side too)."""
    eof = await asyncio.wait_for(client.reader.read(), 5) == b""
    client.writer.close()
    with contextlib.suppress(OSError, ConnectionError):
        await client.writer.wait_closed()
    return eof


async def message(client: SmtpClient, text: bytes = b"Subject: first\r\n\r\nkept\r\n") -> str:
    reply = await client.send_mail("s@client.test", ["r@local.test"], text)
    msgid = queued_id(reply)
    assert msgid is not None, reply
    return msgid


async def transaction(client: SmtpClient) -> None:
    for line in ("MAIL FROM:<s@client.test>", "RCPT TO:<r@local.test>"):
        assert (await client.command(line)).code == 250


def metrics(server: MtaServer) -> str:
    return wait_until(lambda: (lambda r: r[1] if r[0] == 200 else None)(get(server, "/metrics")), 10,
                      "the metrics", server)


def test_a_data_transfer_trickling_within_the_idle_timeout_gets_421_at_its_total_deadline(mta_server) -> None:
    server = mta_server(limits=TRANSFER_DEADLINE)

    async def scenario() -> tuple[str, list[Reply], float]:
        client = await SmtpClient.connect(server.port)
        first = await message(client)
        await transaction(client)
        assert (await client.command("DATA")).code == 354
        replies, seconds = await trickle(client, b"Subject: slow\r\n\r\nbody\r\n")
        assert await closed_by_server(client)
        return first, replies, seconds

    first, replies, seconds = asyncio.run(scenario())
    assert [r.code for r in replies] == [421]
    assert TIMEOUT_421.match(replies[0].text), replies[0]
    assert 1.8 < seconds < 4.5  # the 2 s deadline, although every byte came within 0.3 s
    snapshot = server.spool_snapshot()
    assert list(snapshot.envelopes) == [first]  # the earlier message stays, the trickled one was never stored
    assert b"limit=data_total_timeout" in server.log_bytes()
    assert sample(metrics(server), "mta_inbound_rejected_total", reason="data_total_timeout", code="4xx") == 1


def test_a_bdat_transfer_trickling_gets_421_at_its_total_deadline_from_the_first_chunk(mta_server) -> None:
    server = mta_server(limits=TRANSFER_DEADLINE)

    async def scenario() -> tuple[str, list[Reply], float]:
        client = await SmtpClient.connect(server.port)
        first = await message(client)
        await transaction(client)
        start = time.monotonic()
        client.writer.write(b"BDAT 6\r\nHello,")
        assert (await client.read_reply()).code == 250
        await asyncio.sleep(1.0)  # quiet, well within the idle timeout
        client.writer.write(b"BDAT 100000 LAST\r\n")
        replies, _ = await trickle(client, b"slowly ")
        seconds = time.monotonic() - start
        assert await closed_by_server(client)
        return first, replies, seconds

    first, replies, seconds = asyncio.run(scenario())
    assert [r.code for r in replies] == [421]
    assert TIMEOUT_421.match(replies[0].text), replies[0]
    assert 1.8 < seconds < 4.5  # from the first BDAT, not from the chunk being trickled
    assert list(server.spool_snapshot().envelopes) == [first]
    assert b"limit=data_total_timeout" in server.log_bytes()


def test_a_session_trickling_commands_gets_421_at_the_session_deadline(mta_server) -> None:
    server = mta_server(limits={**IDLE, "session_timeout_seconds": 2})

    async def scenario() -> tuple[list[Reply], float]:
        start = time.monotonic()
        client = await SmtpClient.connect(server.port)
        replies, _ = await trickle(client, b"NOOP\r\n")
        seconds = time.monotonic() - start
        assert await closed_by_server(client)
        return replies, seconds

    replies, seconds = asyncio.run(scenario())
    assert [r.code for r in replies] == [250] * (len(replies) - 1) + [421]  # the NOOPs were answered, then 421
    assert TIMEOUT_421.match(replies[-1].text), replies[-1]
    assert 1.8 < seconds < 4.5
    assert b"limit=session_timeout" in server.log_bytes()


# --- the memory budget ------------------------------------------------------------------

BUDGET = {"max_message_bytes": 2 * MIB, "max_worker_buffered_bytes": 4 * MIB}


async def hold(port: int, kib: int) -> SmtpClient:
    """A client that sends `kib` KiB of DATA content and never ends it."""
    client = await SmtpClient.connect(port)
    await transaction(client)
    assert (await client.command("DATA")).code == 354
    client.writer.write(LINE * kib)
    await client.writer.drain()
    return client


async def acknowledged(clients: list[SmtpClient]) -> None:
    """Until the server's kernel has acknowledged every byte the clients wrote (the worker reads at once)."""
    def unacked(client: SmtpClient) -> int:
        sock = client.writer.get_extra_info("socket")
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    while any(unacked(c) for c in clients):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


def test_past_the_memory_budget_new_transfers_get_4xx_until_the_holders_leave(mta_server) -> None:
    server = mta_server(limits=BUDGET, server={"inbound_workers": 1})

    async def scenario() -> tuple[str, str]:
        client = await SmtpClient.connect(server.port)
        first = await message(client)
        holders = [await hold(server.port, 600) for _ in range(3)]  # 3.5 MiB (twice the content) of 4 MiB
        await acknowledged(holders)
        wait_until(lambda: sample(metrics(server), "mta_inbound_buffered_bytes") >= 3.5 * MIB, 10,
                   "the holders' bytes in mta_inbound_buffered_bytes", server)
        # A declared SIZE that does not fit: 452 at MAIL, before any byte is sent.
        reply = await client.command(f"MAIL FROM:<s@client.test> SIZE={MIB}")
        assert (reply.code, reply.text[:5]) == (452, "4.3.1"), reply
        # Undeclared: the transfer that crosses the budget is read to its end and refused.
        refused = await client.send_mail("s@client.test", ["r@local.test"], LINE * 1024)
        assert (refused.code, refused.text[:5]) == (451, "4.3.1"), refused
        assert (await client.command("NOOP")).code == 250  # still in step
        for holder in holders:  # they hang up in the middle of their DATA
            holder.writer.close()
            await holder.writer.wait_closed()
        wait_until(lambda: sample(metrics(server), "mta_inbound_buffered_bytes") < MIB, 10,
                   "the budget freed", server)
        again = await message(client, b"Subject: again\r\n\r\n" + LINE * 1024)
        await client.close()
        return first, again

    first, again = asyncio.run(scenario())
    assert sorted(server.spool_snapshot().envelopes) == sorted([first, again])
    text = metrics(server)
    assert sample(text, "mta_inbound_rejected_total", reason="memory_budget", code="4xx") == 2
    assert sample(text, "mta_inbound_buffered_limit_bytes") == 4 * MIB


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        found = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    assert found is not None
    return int(found.group(1))


def test_many_connections_holding_unfinished_data_do_not_grow_the_worker_past_its_budget(mta_server) -> None:
    server = mta_server(limits=BUDGET, server={"inbound_workers": 1})
    (worker,) = wait_until(lambda: inbound_workers(server.master_pid), 10, "the inbound worker", server)

    async def scenario() -> tuple[int, int, list[Reply]]:
        warm = await SmtpClient.connect(server.port)
        await message(warm)
        await warm.close()
        before = vm_rss_kib(worker)
        holders = [await hold(server.port, 1900) for _ in range(20)]  # 37 MiB of content, a 4 MiB budget
        await acknowledged(holders)
        during = vm_rss_kib(worker)
        ends = []
        for holder in holders:
            holder.writer.write(b".\r\n")
            ends.append(await holder.read_reply())
            await holder.close()
        return before, during, ends

    before, during, ends = asyncio.run(scenario())
    assert during - before < 16 * 1024, f"VmRSS grew from {before} to {during} KiB"
    assert {r.code for r in ends} <= {250, 451} and sum(r.code == 451 for r in ends) >= 15
