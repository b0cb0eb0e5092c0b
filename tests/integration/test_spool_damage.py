"""A damaged spool, with real LMDB files and real `mta serve` processes.

A spool of 80 queued messages is made once by a real server; each test damages a copy
of its data.mdb the way disks and operators do (truncation, flipped bytes, a record
overwritten through LMDB) and watches what mta serve, `mta queue check` and
`mta queue salvage` make of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest

from tests.integration.conftest import (MtaServer, SmtpClient, free_port, queued_id, server_config, spool_snapshot,
                                        toml_dumps, wait_until)
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering
from tests.integration.test_master import children_of
from tests.integration.test_metrics import get, sample

pytestmark = pytest.mark.integration

MESSAGES = 80
QUEUED = {"relay": {"relay_domains": ["remote.test"], "mynetworks": []}}  # accepted, never delivered (no workers)
MDB_DB = struct.Struct("=IHHQQQQQ")  # LMDB's MDB_db record: pad, flags, depth, pages..., entries, root


@dataclass
class Spool:
    """The data.mdb of a real server's spool and what it held."""

    data: bytes
    stored: dict[str, tuple[object, bytes]]  # id -> (envelope, body) as the server stored them

    def install(self, spool: Path) -> Path:
        spool.mkdir(parents=True, exist_ok=True)
        (spool / "data.mdb").write_bytes(self.data)
        return spool / "data.mdb"


def _message(n: int) -> bytes:
    lines = "".join(f"line {k} of message {n}\r\n" for k in range(3 + (n % 5) * 40))  # inline and overflow bodies
    return f"Message-ID: <m{n}@client.test>\r\nSubject: spool test {n}\r\n\r\n{lines}".encode()


async def _queue(port: int, count: int) -> list[str]:
    client = await SmtpClient.connect(port)
    ids = []
    for n in range(count):
        reply = await client.send_mail("a@client.test", [f"u{n}@remote.test", f"v{n}@remote.test"], _message(n))
        msgid = queued_id(reply)
        assert msgid is not None, reply
        ids.append(msgid)
    await client.close()
    return ids


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Spool:
    tmp = tmp_path_factory.mktemp("filled")
    port, spool = free_port(), tmp / "spool"
    config = tmp / "mta.toml"
    config.write_text(toml_dumps(server_config(port, spool, server={"inbound_workers": 1}, **QUEUED)))
    server = MtaServer(config, port, spool, tmp / "mta.log").start()
    try:
        ids = asyncio.run(_queue(port, MESSAGES))
    finally:
        server.stop()
    snap = spool_snapshot(spool)
    assert sorted(snap.envelopes) == sorted(ids) and not snap.problems()
    return Spool((spool / "data.mdb").read_bytes(),
                 {i: (snap.envelopes[i], snap.bodies[i]) for i in ids})


def _truncate(path: Path, fraction: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(len(f.read()) * fraction) // 4096 * 4096)


def _flip_id(path: Path, msgid: str) -> None:
    """Every stored copy of the envelope of `msgid`: its id string gets a byte that is not
    UTF-8 (what the scheduler died on: UnicodeDecodeError in records.decode)."""
    data = bytearray(path.read_bytes())
    marker = b"\xa1i\xb5" + msgid.encode()  # "i": a 21-character string, first in the map
    found = [m.start() for m in re.finditer(re.escape(marker), data)]
    assert found
    for at in found:
        data[at + 3] = 0xFF
    path.write_bytes(bytes(data))


def _table(spool: Path, name: bytes) -> tuple[int, int]:
    """(depth, root page) of a named table, from its record in LMDB's main tree."""
    env = lmdb.open(str(spool), readonly=True, max_dbs=8)
    try:
        with env.begin() as txn:
            record = txn.get(name)
    finally:
        env.close()
    assert record is not None
    fields = MDB_DB.unpack(record)
    return fields[2], fields[7]


def _scramble_page(path: Path, pgno: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pgno * 4096)
        f.write(b"\xa5" * 16)  # the page header: page number, flags, bounds


def _subjects(messages: list[bytes]) -> list[int]:
    found = [re.search(rb"Subject: spool test (\d+)", m) for m in messages]
    assert all(found)
    return sorted(int(m.group(1)) for m in found if m is not None)


def _copied(out: Path, filled: Spool) -> set[str]:
    """The salvaged spool's ids, after checking every message is the original, byte for byte."""
    snap = spool_snapshot(out)
    assert not snap.problems(), snap.problems()
    for msgid, envelope in snap.envelopes.items():
        assert (envelope, snap.bodies[msgid]) == filled.stored[msgid], msgid
    return set(snap.envelopes)


def test_serve_refuses_a_truncated_spool_before_forking_anything(mta_server, filled: Spool) -> None:
    server = mta_server(start=False, server={"inbound_workers": 1}, **QUEUED)
    data = filled.install(server.spool)
    _truncate(data, 0.6)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        server.start()
    assert time.monotonic() - started < 15  # (about 0.5 s unloaded)
    log = server.log_bytes().decode()
    assert f"the queue file {data} is damaged: the file was truncated" in log
    assert "mta queue check" in log and "mta queue salvage" in log
    assert "event=spawned" not in log and "SIGBUS" not in log  # nothing was forked


def test_queue_check_names_the_problem(mta_server, filled: Spool) -> None:
    server = mta_server(start=False, **QUEUED)
    data = filled.install(server.spool)
    sound = server.mta("queue", "check", check=False)
    assert sound.returncode == 0 and f"read {MESSAGES} envelope(s)" in sound.stdout.decode(), sound
    _truncate(data, 0.6)
    damaged = server.mta("queue", "check", check=False)
    out = damaged.stdout.decode()
    assert damaged.returncode == 1, out
    assert f"{data}:" in out and "DAMAGED: the file was truncated: it ends at page" in out
    assert "mta queue salvage OUT" in out


def test_salvage_of_a_truncated_spool_copies_what_survived_and_it_is_delivered(mta_server, filled: Spool,
                                                                               tmp_path: Path) -> None:
    source = mta_server(start=False, **QUEUED)
    _truncate(filled.install(source.spool), 0.6)
    out = tmp_path / "salvaged"
    result = source.mta("queue", "salvage", str(out), check=False)
    text = result.stdout.decode()
    assert result.returncode == 0, result
    copied = _copied(out, filled)
    assert 0 < len(copied) < MESSAGES
    assert f"copied {len(copied)} message(s)" in text and f"{MESSAGES - len(copied)} message(s) not copied" in text
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"},
                            queue={"path": str(out)})
        sink.wait_for_messages(len(copied), timeout=60)
        wait_until(lambda: server.queue_list() == [], 30, "an empty queue", server)
        time.sleep(0.5)
        arrived = _subjects([m.data for m in sink.messages])
    assert arrived == _subjects([filled.stored[i][1] for i in copied])  # each salvaged message once, nothing else


def test_salvage_of_a_byte_flipped_spool_copies_every_readable_message(mta_server, filled: Spool,
                                                                       tmp_path: Path) -> None:
    source = mta_server(start=False, **QUEUED)
    data = filled.install(source.spool)
    depth, root = _table(source.spool, b"envelope")
    assert depth >= 2  # the root is a branch page: its leaves survive it
    victim = sorted(filled.stored)[7]
    _flip_id(data, victim)
    _scramble_page(data, root)
    check = source.mta("queue", "check", check=False)
    assert check.returncode == 1 and f"DAMAGED: table envelope: page {root}" in check.stdout.decode(), check
    out = tmp_path / "salvaged"
    result = source.mta("queue", "salvage", str(out), check=False)
    text = result.stdout.decode()
    assert result.returncode == 0, result
    assert _copied(out, filled) == set(filled.stored) - {victim}
    assert f"copied {MESSAGES - 1} message(s)" in text and "1 message(s) not copied" in text
    assert f"not copied: {victim}: UnicodeDecodeError" in text, text
    server = mta_server(server={"inbound_workers": 1}, queue={"path": str(out)}, **QUEUED)
    assert sorted(e["id"] for e in server.queue_list()) == sorted(set(filled.stored) - {victim})


def test_an_envelope_that_does_not_decode_is_moved_aside_and_the_rest_is_delivered(mta_server, filled: Spool,
                                                                                   tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"}, start=False)
        filled.install(server.spool)
        victim = sorted(filled.stored)[3]
        env = lmdb.open(str(server.spool), max_dbs=8)
        with env.begin(write=True) as txn:  # garbage written through LMDB itself: the file is sound
            table = env.open_db(b"envelope", txn=txn)
            raw = bytearray(txn.get(victim.encode(), db=table))
            raw[4] = 0xFF  # the first byte of the id string
            txn.put(victim.encode(), bytes(raw), db=table)
        env.close()
        server.start()
        sink.wait_for_messages(MESSAGES - 1, timeout=60)
        wait_until(lambda: server.queue_list() == [], 30, "the other messages delivered", server)
        time.sleep(0.5)
        others = [body for msgid, (_envelope, body) in filled.stored.items() if msgid != victim]
        assert _subjects([m.data for m in sink.messages]) == _subjects(others)
        wait_until(lambda: sample(get(server, "/metrics")[1], "mta_queue_corrupt_records_total") == 1, 10,
                   "the metric", server)
        log = server.log_bytes().decode()
        assert re.search(rf"event=corrupt_record msgid={victim}\S* error=\"?UnicodeDecodeError", log), log
        assert log.count('event=spawned child="scheduler#1') == 1 and 'replacing child="scheduler' not in log
        check = server.mta("queue", "check", check=False)
        assert check.returncode == 1
        assert re.search(rf"in the corrupt table \(not delivered\): {victim}\S*: moved .*UnicodeDecodeError",
                         check.stdout.decode()), check


def test_readyz_is_not_ready_while_the_scheduler_crash_loops(mta_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTA_TEST_HOOKS", "1")
    server = mta_server(server={"inbound_workers": 1})
    wait_until(lambda: get(server, "/readyz") == (200, "ready\n"), 15, "ready", server)
    crash = server.spool / "crash-scheduler"
    crash.write_text("")
    scheduler = next(pid for pid, title in children_of(server.master_pid).items() if "scheduler#" in title)
    os.kill(scheduler, signal.SIGKILL)
    wait_until(lambda: get(server, "/readyz") == (503, "crash-looping: scheduler#1\n"), 20, "503", server)
    wait_until(lambda: server.log_bytes().count(b'event=replacing child="scheduler') >= 3, 30,
               "the back-off", server)
    assert get(server, "/readyz")[0] == 503 and get(server, "/healthz")[0] == 200
    crash.unlink()
    wait_until(lambda: get(server, "/readyz") == (200, "ready\n"), 40, "ready again", server)
    assert b'event=readyz ready=True' in server.log_bytes()
