"""The spool check, salvage and corrupt records on real LMDB files (no server).

The pread reader must agree with LMDB on every sound file whatever the history of
writes, frees and overflow pages; on a damaged one it must report, never raise or
read outside the file, and salvage must copy only what the spool really held.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import lmdb
import msgpack
import pytest

from mtaqueue import check, records
from mtaqueue.backend_lmdb import TABLES, LmdbBackend
from mtaqueue.ids import MessageId
from mtaqueue.lmdbfile import DataFile, Snapshot
from mtaqueue.records import CorruptRecord, Envelope, NewMessage, Recipient

MIB = 1024 * 1024
PAGE = 4096


def _message(rnd: random.Random, n: int) -> NewMessage:
    msgid = MessageId(f"{1_700_000_000_000_000 + n:013X}{rnd.getrandbits(32):08X}")
    size = rnd.choice([200, 1900, 2100, 9000, 70_000])  # inline, around the overflow limit, overflow
    body = f"Received: from c.test by mx.test (mta) with ESMTP id {msgid};\r\n".encode()
    body += bytes(rnd.getrandbits(8) for _ in range(64)) * (size // 64)
    recipients = [Recipient(f"u{k}@d{k % 7}.test", ("FAILURE",), f"rfc822;u{k}@d{k % 7}.test")
                  for k in range(rnd.choice([1, 2, 40]))]  # 40: an envelope on overflow pages
    envelope = Envelope(msgid, "a@client.test", recipients, len(body), 1e9 + n, 1e9 + n, client={"ip": "192.0.2.1"})
    return NewMessage(envelope, body)


def _spool(path: Path, seed: int = 1, rounds: int = 40) -> dict[str, tuple[Envelope, bytes]]:
    """A spool with a history: commits, state updates, deletes; what it holds at the end."""
    rnd = random.Random(seed)
    spool = LmdbBackend(str(path), 64 * MIB)
    held: dict[str, tuple[Envelope, bytes]] = {}
    n = 0
    for _ in range(rounds):
        batch = [_message(rnd, n + k) for k in range(rnd.randint(1, 12))]
        n += len(batch)
        spool.commit(batch)
        held.update({m.envelope.id: (m.envelope, m.body) for m in batch})
        changed = rnd.sample(sorted(held), min(len(held), 3))
        for msgid in changed:
            held[msgid][0].recipients[0].state = "deferred"
            held[msgid][0].next_attempt += 60
        gone = rnd.sample(sorted(held), min(len(held), rnd.randint(0, 5)))
        spool.apply(update=[held[m][0] for m in changed if m not in gone], delete=gone)
        for msgid in gone:
            del held[msgid]
    last = [_message(rnd, n + k) for k in range(5)]  # the previous transaction differs only by these
    spool.commit(last)
    held.update({m.envelope.id: (m.envelope, m.body) for m in last})
    spool.close()
    return held


def _lmdb_view(path: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    env = lmdb.open(str(path), readonly=True, max_dbs=8)
    try:
        with env.begin() as txn:
            return {name: list(txn.cursor(db=env.open_db(name, txn=txn))) for name in TABLES}
    finally:
        env.close()


@contextlib.contextmanager
def _table(path: Path) -> Iterator[tuple[lmdb.Transaction, object]]:
    """A write transaction on the envelope table, through LMDB itself (the file stays sound)."""
    env = lmdb.open(str(path), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            yield txn, env.open_db(b"envelope", txn=txn)
    finally:
        env.close()


def _read(path: Path) -> dict[str, tuple[Envelope, bytes]]:
    spool = LmdbBackend(str(path), 64 * MIB)
    try:
        return {e.id: (e, spool.body(e.id) or b"") for e in spool.envelopes()}
    finally:
        spool.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_reader_sees_exactly_what_lmdb_sees_and_accounts_for_every_page(tmp_path: Path, seed: int) -> None:
    _spool(tmp_path / "q", seed)
    with DataFile(str(tmp_path / "q" / "data.mdb")) as data:
        snap = Snapshot(data, data.newest())
        named = snap.named()
        for name, rows in _lmdb_view(tmp_path / "q").items():
            assert [(leaf.key, snap.value(leaf)) for leaf in snap.tree(named[name], name.decode())] == rows
        snap.read_free()
        assert snap.damage == [] and snap.free_complete
        assert snap.used.count(0) == 0  # every page is in a tree or free (mdb.c's invariant)
    report = check.check_spool(str(tmp_path / "q"))
    assert report.ok and report.messages == len(_lmdb_view(tmp_path / "q")[b"envelope"])


def test_truncated_anywhere_is_reported_and_salvage_copies_only_true_messages(tmp_path: Path) -> None:
    held = _spool(tmp_path / "q")
    data = (tmp_path / "q" / "data.mdb").read_bytes()
    pages = len(data) // PAGE
    fatal = 0
    for cut in sorted({0, 1, PAGE + 100, 2 * PAGE, *range(3 * PAGE, len(data), len(data) // 23)}):
        damaged = tmp_path / f"cut{cut}"
        damaged.mkdir()
        (damaged / "data.mdb").write_bytes(data[:cut])
        report = check.check_spool(str(damaged))
        assert report.fatal, cut  # any cut below the last page the trees use
        fatal += 1
        if cut < 2 * PAGE:
            continue  # no meta page left: nothing to salvage
        out = tmp_path / f"out{cut}"
        salvaged = check.salvage(str(damaged), str(out), 64 * MIB)
        copied = _read(out)
        assert len(copied) == salvaged.copied
        assert all(copied[i] == held[i] for i in copied), cut  # nothing old, nothing half-read
        if salvaged.counted is not None:  # every message copied, or named, or counted as lost
            assert salvaged.copied + len(salvaged.skipped) + salvaged.unaccounted == salvaged.counted, cut
            # the previous transaction (the last one committed a batch) holds fewer
            assert salvaged.counted == len(held) if not salvaged.previous else salvaged.counted < len(held), cut
    assert fatal > 20 and pages > 100


def test_flipped_bytes_are_reported_or_harmless_never_an_exception(tmp_path: Path) -> None:
    _spool(tmp_path / "q", rounds=15)
    data = (tmp_path / "q" / "data.mdb").read_bytes()
    rnd = random.Random(7)
    for attempt in range(60):
        damaged = tmp_path / f"flip{attempt}"
        damaged.mkdir()
        scrambled = bytearray(data)
        for _ in range(rnd.choice([1, 20, 200])):
            scrambled[rnd.randrange(len(scrambled))] ^= 1 << rnd.randrange(8)
        (damaged / "data.mdb").write_bytes(bytes(scrambled))
        report = check.check_spool(str(damaged))
        assert report.fatal or report.messages > 0
        try:
            check.salvage(str(damaged), str(tmp_path / f"out{attempt}"), 64 * MIB)
        except check.Damage as exc:  # both meta pages unusable
            assert "meta page" in str(exc)


def test_decode_raises_corrupt_record_for_any_damage() -> None:
    rnd = random.Random(3)
    raw = records.encode(_message(rnd, 1).envelope)
    outcomes = {"ok": 0, "corrupt": 0}
    for at in range(len(raw)):
        for value in (0x00, 0xFF, 0xC1, raw[at] ^ 0x20):
            flipped = bytearray(raw)
            flipped[at] = value
            try:
                records.decode(bytes(flipped))
                outcomes["ok"] += 1
            except CorruptRecord:
                outcomes["corrupt"] += 1
    assert outcomes["corrupt"] > len(raw)
    with pytest.raises(CorruptRecord, match="recipients"):
        records.decode(msgpack.packb({**msgpack.unpackb(raw), "r": [["a@b", None, None, "lost", 0, None]]}))


@pytest.mark.parametrize("field", ["z", "p", "t", "a"])
def test_a_flipped_true_or_false_in_a_number_field_is_corrupt_not_a_crash(field: str) -> None:
    """msgpack's 0x01 flipped to 0xc3 is True: a bool is an int to isinstance, never to us."""
    raw = records.encode(_message(random.Random(4), 1).envelope)
    with pytest.raises(CorruptRecord, match="wrong type"):
        records.decode(msgpack.packb({**msgpack.unpackb(raw), field: True}))
    recipients = msgpack.unpackb(raw)["r"]
    recipients[0][1] = "SUCCESS"  # NOTIFY as a string, not a list
    with pytest.raises(CorruptRecord):
        records.decode(msgpack.packb({**msgpack.unpackb(raw), "r": recipients}))


def test_an_undecodable_envelope_is_moved_to_corrupt_once(tmp_path: Path) -> None:
    reported: list[tuple[str, str, bool]] = []
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB, on_corrupt=lambda *args: reported.append(args))
    rnd = random.Random(5)
    kept, bad, updated = (_message(rnd, n) for n in range(3))
    spool.commit([kept, bad, updated])
    spool.close()
    with _table(tmp_path / "q") as (txn, table):
        for victim in (bad, updated):
            raw = bytearray(txn.get(victim.envelope.id.encode(), db=table))
            raw[4] = 0xFF  # not UTF-8
            txn.put(victim.envelope.id.encode(), bytes(raw), db=table)
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB, on_corrupt=lambda *args: reported.append(args))
    assert [e.id for e in spool.envelopes()] == [kept.envelope.id]
    assert spool.envelope(bad.envelope.id) is None and spool.due(2e9, 10) == [kept.envelope.id]
    assert [(i, moved) for i, _error, moved in reported] == [(bad.envelope.id, True), (updated.envelope.id, True)]
    assert "UnicodeDecodeError" in reported[0][1]
    assert list(spool.envelopes()) and len(reported) == 2  # reported once, not at every read
    assert spool.body(bad.envelope.id) == bad.body  # kept for an operator
    spool.close()
    report = check.check_spool(str(tmp_path / "q"))
    assert not report.fatal and not report.ok
    assert [q[0] for q in report.quarantined] == [bad.envelope.id, updated.envelope.id]


def _two_committed(path: Path, seed: int) -> tuple[NewMessage, NewMessage]:
    """Two messages committed to a new spool at `path`, closed (to be damaged through LMDB)."""
    spool = LmdbBackend(str(path), 64 * MIB)
    rnd = random.Random(seed)
    first, second = _message(rnd, 1), _message(rnd, 2)
    spool.commit([first, second])
    spool.close()
    return first, second


def test_a_write_over_an_undecodable_envelope_drops_its_due_entry(tmp_path: Path) -> None:
    first, second = _two_committed(tmp_path / "q", 6)
    with _table(tmp_path / "q") as (txn, table):
        txn.put(first.envelope.id.encode(), b"\xc1garbage", db=table)
        txn.put(second.envelope.id.encode(), b"\x93\x01\x02", db=table)
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB)
    first.envelope.next_attempt = 5e9
    spool.apply(update=[first.envelope], delete=[second.envelope.id])  # the scheduler's copy wins
    assert spool.due(4e9, 10) == [] and spool.due(6e9, 10) == [first.envelope.id]
    assert spool.envelope(first.envelope.id) == first.envelope and spool.body(second.envelope.id) is None
    spool.close()


def test_what_a_delete_reads_of_a_record_is_what_decode_reads_or_corrupt() -> None:
    """records.decode_queued (a delete's read: next attempt, each recipient's address and
    state) gives decode's values wherever decode succeeds, and refuses those fields damaged."""
    raw = records.encode(_message(random.Random(7), 1).envelope)
    for at in range(len(raw)):
        for value in (0x00, 0xFF, 0xC1, 0xC3, raw[at] ^ 0x20):
            flipped = bytes(raw[:at]) + bytes([value]) + raw[at + 1:]
            try:
                envelope = records.decode(flipped)
            except CorruptRecord:
                continue
            assert records.decode_queued(flipped) == (envelope.next_attempt,
                                                      [(r.address, r.state) for r in envelope.recipients])
    fields = msgpack.unpackb(raw)
    for damage in ({"n": 1e300}, {"n": True}, {"n": "soon"}, {"r": []}, {"r": [["a@b", None, None, "lost", 0, None]]},
                   {"r": [[7, None, None, "ready", 0, None]]}, {"r": [["a@b"]]}, {"r": "ready"}):
        with pytest.raises(CorruptRecord):
            records.decode_queued(msgpack.packb({**fields, **damage}))


def test_a_delete_takes_back_what_a_record_is_indexed_by_even_when_the_rest_is_damaged(tmp_path: Path) -> None:
    client_damaged, state_damaged = _two_committed(tmp_path / "q", 8)
    with _table(tmp_path / "q") as (txn, table):
        for victim, damage in ((client_damaged, {"c": "192.0.2.1"}), (state_damaged, {"r": [["u0@d0.test", None,
                                                                                          None, "lost", 0, None]]})):
            key = victim.envelope.id.encode()
            txn.put(key, msgpack.packb({**msgpack.unpackb(txn.get(key, db=table)), **damage}), db=table)
    spool = LmdbBackend(str(tmp_path / "q"), 64 * MIB)
    spool.apply(delete=[client_damaged.envelope.id])  # its queue fields are sound: taken back exactly
    assert spool.due(2e9, 10) == [state_damaged.envelope.id]
    assert spool.destination_counts() == {"d0.test": {"ready": 1, "deferred": 0, "held": 0}}
    assert spool._env.begin().get(b"recount", db=spool._meta) is None
    spool.apply(delete=[state_damaged.envelope.id])  # its recipients unknown: a recount at the next open
    assert spool.due(2e9, 10) == [] and spool.totals()["messages"] == 0
    assert spool._env.begin().get(b"recount", db=spool._meta) == b"1"
    spool.close()


@pytest.mark.parametrize("before_warned", [False, True])
def test_salvage_finds_envelopes_cut_off_from_their_tree_in_either_record_form(tmp_path: Path,
                                                                              before_warned: bool) -> None:
    held = _spool(tmp_path / "q", rounds=60)
    if before_warned:  # records as written before `warned`: maps of 13 keys
        with _table(tmp_path / "q") as (txn, db):
            for key, raw in list(txn.cursor(db=db)):
                old = msgpack.unpackb(raw)
                del old["W"]
                txn.put(key, msgpack.packb(old), db=db)
    envelopes = _tables(tmp_path / "q")[b"envelope"]
    assert envelopes.depth >= 2  # type: ignore[attr-defined]  # its leaves survive the root
    _scramble(tmp_path / "q", envelopes.root)  # type: ignore[attr-defined]
    salvaged = check.salvage(str(tmp_path / "q"), str(tmp_path / "out"), 64 * MIB)
    assert salvaged.copied == len(held) and _read(tmp_path / "out") == held


def test_salvage_refuses_a_non_empty_out_and_a_spool_without_meta_pages(tmp_path: Path) -> None:
    _spool(tmp_path / "q", rounds=3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(FileExistsError):
        check.salvage(str(tmp_path / "q"), str(tmp_path / "out"), 64 * MIB)
    shutil.copytree(tmp_path / "q", tmp_path / "broken")
    with open(tmp_path / "broken" / "data.mdb", "r+b") as f:
        f.write(b"\0" * PAGE * 2)
    with pytest.raises(check.Damage, match="meta page"):
        check.salvage(str(tmp_path / "broken"), str(tmp_path / "out2"), 64 * MIB)
    assert check.check_spool(str(tmp_path / "broken")).fatal
    assert not os.path.exists(tmp_path / "nothing") and check.check_spool(str(tmp_path / "nothing")).ok


# --- the start-time check (mta serve, before it forks) -------------------------------------

def test_the_start_time_check_reads_the_branch_pages_not_the_leaves(tmp_path: Path) -> None:
    held = _spool(tmp_path / "q", rounds=60)
    start, whole = check.check_spool(str(tmp_path / "q"), full=False), check.check_spool(str(tmp_path / "q"))
    assert start.ok and not start.full and whole.ok and whole.full
    assert start.messages == whole.messages == len(held) and start.rebuild is whole.rebuild is None
    body = _tables(tmp_path / "q")[b"body"]
    assert body.depth >= 2 and body.leaf_pages > 20  # a tree with branch pages: the check reads those only
    # a leaf scrambled: the full walk sees it, the start-time check leaves it to the process that reads it
    leaf = _a_leaf(tmp_path / "q", b"body")
    _scramble(tmp_path / "q", leaf)
    assert not check.check_spool(str(tmp_path / "q"), full=False).fatal
    assert any(f"page {leaf}" in d for d in check.check_spool(str(tmp_path / "q")).damage)
    # a branch page scrambled: every lookup would read it, so the start-time check refuses the file
    _scramble(tmp_path / "q", body.root)
    report = check.check_spool(str(tmp_path / "q"), full=False)
    assert report.fatal and not report.full and any(d.startswith(f"table body: page {body.root}")
                                                    for d in report.damage), report.damage


def test_the_start_time_check_of_a_truncated_file_falls_back_to_the_full_walk(tmp_path: Path) -> None:
    _spool(tmp_path / "q", rounds=20)
    data = (tmp_path / "q" / "data.mdb").read_bytes()
    for cut in range(3 * PAGE, len(data), len(data) // 17):
        damaged = tmp_path / f"cut{cut}"
        damaged.mkdir()
        (damaged / "data.mdb").write_bytes(data[:cut])
        report = check.check_spool(str(damaged), full=False)
        assert report.fatal and report.full, cut


def test_the_check_says_when_the_next_open_rebuilds_the_indexes(tmp_path: Path) -> None:
    _spool(tmp_path / "q", rounds=5)
    env = lmdb.open(str(tmp_path / "q"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"recount", b"1", db=env.open_db(b"meta", txn=txn))
    env.close()
    assert check.check_spool(str(tmp_path / "q"), full=False).rebuild == "recount"
    assert check.check_spool(str(tmp_path / "q")).rebuild == "recount"
    env = lmdb.open(str(tmp_path / "q"), max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.delete(b"recount", db=meta)
        txn.delete(b"format", db=meta)  # the previous release's spool
    env.close()
    assert check.check_spool(str(tmp_path / "q"), full=False).rebuild == "upgrade"
    LmdbBackend(str(tmp_path / "q"), 64 * MIB).close()  # the first read-write open upgrades it
    assert check.check_spool(str(tmp_path / "q"), full=False).rebuild is None


def _tables(path: Path) -> dict[bytes, object]:
    with DataFile(str(path / "data.mdb")) as data:
        return Snapshot(data, data.newest()).named()  # type: ignore[return-value]


def _a_leaf(path: Path, table: bytes) -> int:
    with DataFile(str(path / "data.mdb")) as data:
        snap = Snapshot(data, data.newest())
        leaves = sorted({leaf.page for leaf in snap.tree(snap.named()[table], table.decode())})
    return leaves[len(leaves) // 2]


def _scramble(path: Path, pgno: int) -> None:
    with open(path / "data.mdb", "r+b") as f:
        f.seek(pgno * PAGE)
        f.write(b"\xa5" * 16)  # the page header
