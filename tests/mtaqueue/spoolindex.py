"""What a format-2 spool's due, counts and bydest tables must hold, worked out from the
envelopes alone (written here again from the rules in docs/architecture.md, not with
mtaqueue/indexes.py), and what an LMDB spool holds: tests compare the two."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import lmdb

from mtaqueue.records import Envelope

STATES = {"ready": "ready", "active": "ready", "deferred": "deferred", "held": "held"}


@dataclass
class Indexes:
    due: set[bytes] = field(default_factory=set)
    counts: dict[bytes, int] = field(default_factory=dict)  # dest\0state (dest b"": totals) -> recipients
    bydest: set[bytes] = field(default_factory=set)


def destination(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") or "localhost"


def expected(envelopes: Iterable[Envelope]) -> Indexes:
    out = Indexes()
    counts: Counter[bytes] = Counter()
    for e in envelopes:
        queued = [(destination(r.address), STATES[r.state]) for r in e.recipients if r.state in STATES]
        if any(state != "held" for _, state in queued):
            out.due.add(struct.pack(">Q", int(e.next_attempt * 1000)) + e.id.encode())
        for dest, state in queued:
            counts[dest.encode() + b"\0" + state.encode()] += 1
            counts[b"\0" + state.encode()] += 1
            out.bydest.add(dest.encode() + b"\0" + e.id.encode())
    out.counts = dict(counts)
    return out


def stored(env: lmdb.Environment, txn: lmdb.Transaction) -> Indexes:
    """The tables as they are (a format-1 spool has no counts or bydest: empty)."""
    def rows(name: bytes) -> list[tuple[bytes, bytes]]:
        try:
            table = env.open_db(name, txn=txn, create=False)
        except (lmdb.NotFoundError, lmdb.ReadonlyError):
            return []
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table)]
    counts = {k: struct.unpack(">Q", v)[0] for k, v in rows(b"counts")}
    return Indexes({k for k, _ in rows(b"due")}, counts, {k for k, _ in rows(b"bydest")})


def read(path: str) -> tuple[Indexes, Indexes, dict[bytes, bytes]]:
    """(stored, expected from the envelopes that decode, meta) of the spool at `path`, one read transaction."""
    from mtaqueue import records
    env = lmdb.open(path, readonly=True, max_dbs=8, subdir=True, lock=True)
    try:
        with env.begin(buffers=False) as txn:
            envelopes = [records.decode(raw) for _, raw in txn.cursor(db=env.open_db(b"envelope", txn=txn))]
            meta = dict(txn.cursor(db=env.open_db(b"meta", txn=txn)))
            return stored(env, txn), expected(envelopes), meta
    finally:
        env.close()


def to_format1(path: str) -> None:
    """Turn a spool back into the previous release's layout: no counts, no bydest, no
    format key, a due entry for every message (held and finished ones too)."""
    from mtaqueue import records
    env = lmdb.open(path, max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            for name in (b"counts", b"bydest"):
                txn.drop(env.open_db(name, txn=txn), delete=True)
            meta = env.open_db(b"meta", txn=txn)
            for key in (b"format", b"recount", b"rebuild"):
                txn.delete(key, db=meta)
            due = env.open_db(b"due", txn=txn)
            for key, raw in list(txn.cursor(db=env.open_db(b"envelope", txn=txn))):
                envelope = records.decode(raw)
                txn.put(struct.pack(">Q", int(envelope.next_attempt * 1000)) + key, b"", db=due)
    finally:
        env.close()
