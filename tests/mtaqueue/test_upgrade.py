"""Upgrading a format-1 spool (and recounting one): real LMDB files, a real process killed
with SIGKILL halfway.

A format-1 spool is built here with the old layout written table by table (envelope,
body, a due entry for every message, meta b"bytes"; no format key, no counts, no
bydest), as the previous release left it.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from mtaqueue import records, upgrade
from mtaqueue.backend import QueueIOError
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from tests.mtaqueue import spoolindex

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
STATES = ["ready", "deferred", "held", "delivered", "bounced"]


def _envelope(rnd: random.Random, n: int) -> Envelope:
    recipients = [Recipient(f"u{k}@{rnd.choice(['a.test', 'B.test', 'c.test.'])}", None, None, rnd.choice(STATES))
                  for k in range(rnd.randint(1, 4))]
    msgid = MessageId(f"{1_700_000_000_000_000 + n * 1000:013X}{n:08X}")
    return Envelope(msgid, "s@c.test", recipients, 4, 1.7e9 + n, 1.7e9 + n + rnd.choice([0, 600]))


def _format1(path: Path, count: int, seed: int = 1, garbage: tuple[int, ...] = ()) -> list[Envelope]:
    """The previous release's spool: what it held (the envelopes that decode)."""
    rnd = random.Random(seed)
    envelopes = [_envelope(rnd, n) for n in range(count)]
    path.mkdir(mode=0o700)
    env = lmdb.open(str(path), map_size=256 * MIB, max_dbs=8)
    stored = 0
    with env.begin(write=True) as txn:
        tables = {name: env.open_db(name, txn=txn) for name in (b"envelope", b"body", b"due", b"meta", b"corrupt")}
        for n, e in enumerate(envelopes):
            raw = b"\xc1not msgpack" if n in garbage else records.encode(e)
            txn.put(e.id.encode(), raw, db=tables[b"envelope"])
            txn.put(e.id.encode(), b"body", db=tables[b"body"])
            txn.put(struct.pack(">Q", int(e.next_attempt * 1000)) + e.id.encode(), b"", db=tables[b"due"])
            stored += len(raw) + 4
        txn.put(b"bytes", struct.pack(">Q", stored), db=tables[b"meta"])
    env.close()
    return [e for n, e in enumerate(envelopes) if n not in garbage]


def _exact(path: Path, envelopes: list[Envelope]) -> dict[bytes, bytes]:
    found, want, meta = spoolindex.read(str(path))
    assert found == spoolindex.expected(envelopes) == want
    return meta


def test_the_first_read_write_open_upgrades_in_batches_with_progress(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upgrade, "BATCH", 7)
    envelopes = _format1(tmp_path / "q", 50, garbage=(3, 31))
    progress: list[tuple[int, int]] = []
    corrupt: list[tuple[str, bool]] = []
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB, on_progress=lambda *a: progress.append(a),
                        on_corrupt=lambda msgid, _error, moved: corrupt.append((msgid, moved)))
    assert progress == [(n, 50) for n in (7, 14, 21, 28, 35, 42, 49, 50)]
    assert sorted(m for m, _ in corrupt) == sorted(f"{1_700_000_000_000_000 + n * 1000:013X}{n:08X}" for n in (3, 31))
    queued = [e for e in envelopes if any(r.state in ("ready", "deferred", "held") for r in e.recipients)]
    assert spool.totals()["messages"] == 48 and spool.ids(None, 100) == [e.id for e in envelopes]
    assert spool.due(2e9, 100) == [e.id for e in sorted(envelopes, key=lambda e: (int(e.next_attempt * 1000), e.id))
                                   if any(r.state in ("ready", "deferred") for r in e.recipients)]
    assert {m for _, m in spool.by_destination()} == {e.id for e in queued}
    spool.close()
    meta = _exact(tmp_path / "q", envelopes)
    assert meta[b"format"] == b"2" and b"rebuild" not in meta and b"recount" not in meta
    progress.clear()
    LmdbBackend(str(tmp_path / "q"), 64 * MIB, on_progress=lambda *a: progress.append(a)).close()
    assert progress == []  # once


def test_a_read_only_open_of_a_format_1_spool_names_the_fix(tmp_path: Path) -> None:
    _format1(tmp_path / "q", 3)
    with pytest.raises(QueueIOError, match=r"format 1.*start `mta serve` once"):
        LmdbBackend(str(tmp_path / "q"), 64 * MIB, readonly=True)
    _, _, meta = spoolindex.read(str(tmp_path / "q"))
    assert b"format" not in meta and b"rebuild" not in meta  # untouched


def test_a_new_spool_is_format_2_and_a_newer_format_is_refused(tmp_path: Path) -> None:
    LmdbBackend(str(tmp_path / "q"), MIB).close()
    _, _, meta = spoolindex.read(str(tmp_path / "q"))
    assert meta[b"format"] == b"2"
    env = lmdb.open(str(tmp_path / "q"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"3", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(QueueIOError, match="format 3, written by a newer mta"):
        LmdbBackend(str(tmp_path / "q"), MIB)


KILLER = """
import os, signal, sys
from mtaqueue import upgrade
from mtaqueue.backend_lmdb import LmdbBackend
upgrade.BATCH = 10
def progress(done, total):
    print(done, flush=True)
    if done >= int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
LmdbBackend(sys.argv[1], 64 << 20, on_progress=progress)
"""


def _killed_upgrade(path: Path, after: int) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'queue'}")
    done = subprocess.run([sys.executable, "-c", KILLER, str(path), str(after)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and done.stdout.split()[-1] == str(after), done


def test_kill_9_in_the_middle_of_an_upgrade_leaves_a_spool_the_next_open_upgrades(tmp_path: Path) -> None:
    envelopes = _format1(tmp_path / "q", 95)
    _killed_upgrade(tmp_path / "q", 40)
    _, _, meta = spoolindex.read(str(tmp_path / "q"))
    assert b"format" not in meta and meta[b"rebuild"] == envelopes[39].id.encode()  # four batches done
    with pytest.raises(QueueIOError, match="format 1"):
        LmdbBackend(str(tmp_path / "q"), 64 * MIB, readonly=True)  # still not usable read-only
    progress: list[tuple[int, int]] = []
    LmdbBackend(str(tmp_path / "q"), 64 * MIB, on_progress=lambda *a: progress.append(a)).close()
    assert progress[-1] == (55, 95)  # the rest only
    assert _exact(tmp_path / "q", envelopes)[b"format"] == b"2"


def test_writes_while_a_rebuild_is_halfway_keep_it_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process writes (inbound, the scheduler, an operator) between two batches:
    below the cursor it keeps the indexes, above it leaves them to the rebuild."""
    envelopes = {e.id: e for e in _format1(tmp_path / "q", 60)}
    _killed_upgrade(tmp_path / "q", 30)
    monkeypatch.setattr(upgrade, "on_open", lambda *args: None)  # a writer that does not rebuild itself
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB)
    ids = sorted(envelopes)
    for msgid in (ids[5], ids[29], ids[30], ids[50]):  # both sides of the cursor (after ids[29])
        envelopes[msgid].recipients[0].state = "deferred" if envelopes[msgid].recipients[0].state != "deferred" else "held"
        envelopes[msgid].next_attempt += 90
    spool.apply(update=[envelopes[i] for i in (ids[5], ids[29], ids[30], ids[50])], delete=[ids[7], ids[45]])
    del envelopes[ids[7]], envelopes[ids[45]]
    new = [NewMessage(_envelope(random.Random(n), 100 + n), b"body") for n in range(3)]
    spool.commit(new)
    envelopes.update({m.envelope.id: m.envelope for m in new})
    assert upgrade.rebuild(spool._env, spool._dbs) == 30 - 1 + 3  # what is above the cursor now (ids[45] gone)
    spool.close()
    assert _exact(tmp_path / "q", list(envelopes.values()))[b"format"] == b"2"


def test_a_quarantined_record_is_recounted_by_the_next_open(tmp_path: Path) -> None:
    rnd = random.Random(4)
    envelopes = [_envelope(rnd, n) for n in range(20)]
    for e in envelopes:
        e.recipients[0].state = "deferred"
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB)
    spool.commit([NewMessage(e, b"body") for e in envelopes])
    with spool._env.begin(write=True) as txn:
        txn.put(envelopes[4].id.encode(), b"\xc1", db=spool._envelope)
    assert spool.envelope(envelopes[4].id) is None  # moved to corrupt
    assert envelopes[4].id not in spool.ids(None, 100, domain=spoolindex.destination(envelopes[4].recipients[0].address))
    assert envelopes[4].id not in {m for _, m in spool.by_destination()}  # stale entries skipped meanwhile
    spool.close()
    found, want, meta = spoolindex.read(str(tmp_path / "q"))
    assert meta[b"recount"] and found.counts != want.counts  # its recipients are still counted
    progress: list[tuple[int, int]] = []
    LmdbBackend(str(tmp_path / "q"), 64 * MIB, recount=False, on_progress=lambda *a: progress.append(a)).close()
    LmdbBackend(str(tmp_path / "q"), 64 * MIB, readonly=True, on_progress=lambda *a: progress.append(a)).close()
    assert progress == [] and spoolindex.read(str(tmp_path / "q"))[2][b"recount"]  # a worker's open leaves it
    LmdbBackend(str(tmp_path / "q"), 64 * MIB, on_progress=lambda *a: progress.append(a)).close()
    assert progress == [(19, 19)]
    assert b"recount" not in _exact(tmp_path / "q", envelopes[:4] + envelopes[5:])
