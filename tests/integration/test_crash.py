"""Crash safety: kill -9 under load, restart on the same spool, nothing acknowledged is lost.

50 sessions push up to 2000 unique messages; after a random number of 250s (seeded,
printed; rerun one with MTA_CRASH_SEED=n) the server is SIGKILLed: all its processes,
or the master alone. On restart: every acknowledged id is listed with exactly the bytes
sent after our Received header; every stored message (acknowledged or not: a commit
may beat its 250 to the wire) is one that was sent, whole, once, with its envelope;
no record lacks its partner. Then the restarted server takes more mail.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (MtaServer, SmtpClient, free_port, queued_id, server_config,
                                        split_received, toml_dumps)

pytestmark = pytest.mark.integration

MESSAGES = 2000
AFTER_RESTART = 200
CONNECTIONS = 50
KILL_AFTER_ACKS = (200, 1500)
BODY_BYTES = (1024, 20 * 1024)
PUSH_TIMEOUT_SECONDS = 60.0
CLI_SAMPLE = 20  # bodies also read through `mta queue show --body` (one process each)


@dataclass(frozen=True)
class Sent:
    n: int
    sender: str
    recipients: tuple[str, ...]
    data: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()


def make_messages(rng: random.Random, count: int, tag: str) -> list[Sent]:
    out = []
    for n in range(count):
        size = rng.randint(*BODY_BYTES)
        text = base64.b64encode(rng.randbytes(size * 3 // 4))  # no line can start with "."
        lines = [text[i:i + 76] for i in range(0, len(text), 76)]
        data = (f"Message-ID: <{n}.{tag}@crash.test>\r\nSubject: crash test {n}\r\n\r\n".encode()
                + b"\r\n".join(lines) + b"\r\n")
        rcpts = tuple(f"r{n}.{j}@local.test" for j in range(rng.randint(1, 3)))
        out.append(Sent(n, f"s{n}@client.test", rcpts, data))
    return out


@dataclass
class Push:
    acked: dict[str, Sent]  # queue id -> the message its 250 acknowledged
    attempted: int  # messages taken from the list (they are its first `attempted`)
    refused: list[tuple[int, str, bool]]  # (message n, reply, after the kill) for other final replies


def push(port: int, messages: list[Sent], connections: int,
         kill_after: int | None = None, kill: Callable[[], None] | None = None) -> Push:
    """Send `messages` over `connections` sessions; call kill() at the kill_after-th 250.

    After the kill a session may end by a broken connection; before it, nothing may fail.
    """
    result = Push({}, 0, [])
    todo: Iterator[Sent] = iter(messages)  # shared: one event loop, so next() needs no lock
    killed = False

    async def session() -> None:
        nonlocal killed
        try:
            client = await SmtpClient.connect(port)
        except (OSError, ConnectionError, AssertionError):
            if killed:
                return
            raise
        try:
            for m in todo:
                result.attempted += 1
                reply = await client.send_mail(m.sender, m.recipients, m.data)
                qid = queued_id(reply)
                if qid is None:
                    result.refused.append((m.n, str(reply), killed))
                    continue
                assert qid not in result.acked, f"queue id {qid} acknowledged twice"
                result.acked[qid] = m
                if len(result.acked) == kill_after and kill is not None:
                    kill()
                    killed = True
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            if not killed:
                raise
        finally:
            await client.close()

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(session() for _ in range(connections))),
                               PUSH_TIMEOUT_SECONDS)

    asyncio.run(main())
    return result


def check_spool(server: MtaServer, sent: list[Sent], acked: dict[str, Sent], rng: random.Random,
                cli_sample: int = 0) -> int:
    """Assert every acked message is stored exactly and everything stored is whole; the count stored."""
    listing = {e["id"]: e for e in server.queue_list()}
    missing = sorted(acked.keys() - listing.keys())
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    snap = server.spool_snapshot()
    assert snap.problems() == []
    assert snap.envelopes.keys() == listing.keys()
    by_digest = {m.digest: m for m in sent}
    stored_n: dict[int, str] = {}
    for qid, body in snap.bodies.items():
        header, rest = split_received(body)
        m = by_digest.get(hashlib.sha256(rest).digest())
        assert m is not None, f"{qid}: stored body is no message that was sent (torn or corrupt)"
        assert m.n not in stored_n, f"message {m.n} stored twice: {stored_n[m.n]} and {qid}"
        stored_n[m.n] = qid
        if qid in acked:
            assert acked[qid] is m, f"{qid} holds message {m.n}, but its 250 was for {acked[qid].n}"
        assert f" id {qid}".encode() in header
        entry = listing[qid]
        assert entry["sender"] == m.sender, qid
        assert tuple(r["address"] for r in entry["recipients"]) == m.recipients, qid
        assert {r["state"] for r in entry["recipients"]} == {"ready"}, qid
        assert entry["size"] == len(body), qid
    for qid in rng.sample(sorted(acked), min(cli_sample, len(acked))):
        assert server.queue_body(qid) == snap.bodies[qid], qid
    return len(snap.bodies)


@pytest.mark.parametrize("whole_group", [True, False], ids=["kill-all", "kill-master"])
def test_kill9_under_load_loses_no_acknowledged_message(mta_server: Callable[..., MtaServer],
                                                        whole_group: bool) -> None:
    """kill-all: the master and its workers die at once (a crash). kill-master: the master
    alone; its workers finish their sessions (idle ones get 421) and exit by themselves,
    while a new master serves the same spool."""
    seed = int(os.environ.get("MTA_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    kill_after = rng.randint(*KILL_AFTER_ACKS)
    print(f"crash test: MTA_CRASH_SEED={seed} kill -9 after {kill_after} acknowledged messages")
    sent = make_messages(rng, MESSAGES + AFTER_RESTART, str(seed))
    server = mta_server(server={"drain_timeout_seconds": 5}, limits={"max_connections_per_ip": 1000})

    started = time.monotonic()
    first = push(server.port, sent[:MESSAGES], CONNECTIONS, kill_after, lambda: server.kill9(whole_group))
    assert not server.running
    assert [r for r in first.refused if not r[2] or not r[1].startswith("421 4.3.2")] == []
    assert len(first.acked) >= kill_after
    print(f"crash test: {first.attempted} sent, {len(first.acked)} acknowledged, {len(first.refused)} "
          f"got 421 ({time.monotonic() - started:.1f} s)")

    server.start()  # the same spool: the dead master's lock must not block us
    deadline = time.monotonic() + 15
    while server.orphans_alive():  # kill-master: the old workers finish and exit
        assert time.monotonic() < deadline, f"workers of the killed master still run\n{server.log_tail()}"
        time.sleep(0.05)
    stored = check_spool(server, sent, first.acked, rng, cli_sample=CLI_SAMPLE)
    print(f"crash test: {stored} stored, {stored - len(first.acked)} of them never acknowledged")
    assert stored <= first.attempted

    # The restarted server takes mail, and the spool stays whole.
    more = sent[first.attempted:][:AFTER_RESTART]
    second = push(server.port, more, 10)
    assert second.refused == []
    assert len(second.acked) == len(more)
    check_spool(server, sent, first.acked | second.acked, rng)
    assert server.stop() == 0
    check_spool(server, sent, first.acked | second.acked, rng)


def test_a_second_server_on_the_same_spool_is_refused(mta_server: Callable[..., MtaServer],
                                                     tmp_path: Path) -> None:
    first = mta_server()
    port = free_port()  # its own port, so a greeting could only come from the second server
    config = tmp_path / "second.toml"
    config.write_text(toml_dumps(server_config(port, first.spool)))
    second = MtaServer(config, port, first.spool, tmp_path / "second.log")
    with pytest.raises(RuntimeError, match="another mta is already serving the queue"):
        second.start()
    assert not second.running


def test_workers_of_a_killed_master_close_idle_sessions_and_exit_cleanly(
        mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server()

    async def idle_session_after_the_kill() -> str:
        client = await SmtpClient.connect(server.port)
        server.kill9(whole_group=False)
        try:
            return str(await asyncio.wait_for(client.read_reply(), 10))
        finally:
            await client.close()

    assert asyncio.run(idle_session_after_the_kill()).startswith("421 4.3.2 ")
    deadline = time.monotonic() + 10
    while server.orphans_alive():
        assert time.monotonic() < deadline, f"workers of the killed master still run\n{server.log_tail()}"
        time.sleep(0.05)
    log = server.log_bytes().decode()
    assert "event=master_gone" in log
    assert "Traceback" not in log, server.log_tail()
