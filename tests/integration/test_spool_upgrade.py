"""The spool's indexes through `mta serve`: a format-1 spool (the previous release's) is
upgraded by the master before it forks, with progress in the log, and every message is
then delivered once; a record quarantined while running is recounted at the next start."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import lmdb
import pytest

from tests.integration.conftest import wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, message, send_all
from tests.mtaqueue import spoolindex

pytestmark = pytest.mark.integration

QUEUED = {"relay": {"relay_domains": ["remote.test", "other.test"], "mynetworks": ["127.0.0.1/32"]}}  # no delivery


def _queue(mta_server, count: int):  # type: ignore[no-untyped-def]
    server = mta_server(server={"inbound_workers": 1}, **QUEUED)
    mails = [("a@client.test", [f"u{n}@remote.test", f"v{n}@Other.test"], message(n)) for n in range(count)]
    ids = asyncio.run(send_all(server.port, mails))
    server.stop()
    return server, ids


def _subject(data: bytes) -> int:
    found = re.search(rb"Subject: delivery test (\d+)", data)
    assert found is not None
    return int(found.group(1))


def test_serve_upgrades_a_format_1_spool_before_forking_and_delivers_every_message_once(mta_server,
                                                                                         tmp_path: Path) -> None:
    old, ids = _queue(mta_server, 30)
    held = ids[:5]
    old.mta("queue", "hold", *held)  # offline: applied to the spool
    bodies = old.spool_snapshot().bodies
    delivered = sorted(_subject(bodies[i]) for i in ids if i not in held)
    spoolindex.to_format1(str(old.spool))
    found, want, meta = spoolindex.read(str(old.spool))
    assert b"format" not in meta and found.counts == {} and len(found.due) == 30 != len(want.due)
    with SmtpSink("127.0.0.2") as sink:
        route = f"{sink.address}:{sink.port}"
        server = delivering(mta_server, tmp_path, {"remote.test": route, "other.test": route},
                            queue={"path": str(old.spool)})
        sink.wait_for_messages(25 * 2, timeout=60)
        wait_until(lambda: len(server.queue_list()) == 5, 30, "only the held messages left", server)
        log = server.log_bytes().decode()
        check = re.search(r"event=spool_check .*", log)
        assert check and "check=full" in check.group() and "rebuild=upgrade" in check.group(), log
        done = log.index("event=spool_rebuild reason=upgrade state=done")
        assert log.index("event=spool_rebuild reason=upgrade done=30 total=30") < done < log.index("event=spawned")
        assert sorted(e["id"] for e in server.queue_list()) == sorted(held)
        server.stop()
        arrived = sorted(_subject(m.data) for m in sink.messages)
    assert arrived == sorted(delivered * 2)  # each once per domain, none of the held
    snap = old.spool_snapshot()  # the spool both servers used
    assert not snap.problems(), snap.problems()  # due, counts, bydest exact
    assert snap.indexes.due == set() and snap.indexes.counts[b"\0held"] == 10
    assert snap.indexes.counts[b"other.test\0held"] == 5


def test_a_record_quarantined_while_running_is_recounted_at_the_next_start(mta_server) -> None:
    server, ids = _queue(mta_server, 12)
    env = lmdb.open(str(server.spool), max_dbs=8)
    with env.begin(write=True) as txn:  # garbage written through LMDB itself: the file is sound
        txn.put(ids[3].encode(), b"\xc1garbage", db=env.open_db(b"envelope", txn=txn))
    env.close()
    server.start()  # the scheduler loads every envelope: it meets the damaged one
    wait_until(lambda: f"event=corrupt_record msgid={ids[3]}".encode() in server.log_bytes(), 20, "the quarantine",
               server)
    server.stop()
    found, want, meta = spoolindex.read(str(server.spool))
    assert meta[b"recount"] and found.counts[b"\0ready"] == 24 != want.counts[b"\0ready"] == 22
    server.start()
    log = server.log_bytes().decode()
    assert "rebuild=recount" in log and "event=spool_rebuild reason=recount state=done" in log, log
    server.stop()
    found, want, meta = spoolindex.read(str(server.spool))
    assert found == want and b"recount" not in meta
    assert len(server.spool_snapshot().envelopes) == 11
