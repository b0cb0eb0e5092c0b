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
    def keys(name: bytes) -> set[bytes]:
        return set(txn.cursor(db=env.open_db(name, txn=txn)).iternext(values=False))
    counts = {bytes(k): struct.unpack(">Q", v)[0] for k, v in txn.cursor(db=env.open_db(b"counts", txn=txn))}
    return Indexes(keys(b"due"), counts, keys(b"bydest"))


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
