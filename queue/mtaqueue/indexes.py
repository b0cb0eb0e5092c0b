"""The spool's indexes and counts (format 2), kept in the transaction of each change.

Tables (named LMDB databases beside envelope, body, meta and corrupt):
  due     be64(next_attempt in ms) + msgid -> b""   iff the message has a recipient in
          state ready or deferred (held-only and finished messages have none)
  counts  destination + b"\\0" + state -> be64 recipients, for the spool states ready,
          deferred, held; destination b"" holds the totals. A count of 0 has no key.
  bydest  destination + b"\\0" + msgid -> b"", one per (message, destination where it
          has a ready, deferred or held recipient)
A destination is records.destination_of(address). "active" is never stored (it is the
scheduler's view of a ready recipient in a session's job); were it met, it counts as ready.

`Changes` is one write transaction's bookkeeping: the writer hands it each envelope's
old and new form (None: absent); due and bydest keys change at once, count deltas are
summed per (destination, state) over the whole transaction and written at `flush`, one
get + put per changed key (a group commit of 25 messages at 2 domains: 3 keys).

Rebuild (upgrade.py): while meta b"rebuild" holds a key, counts and bydest describe
exactly the envelopes with id <= that key; a write to a message above it leaves them
alone (the rebuild counts that message when it gets there). So a rebuild in batches is
exact whoever writes meanwhile.

Invariant: every count >= 0. A count that would go negative means a change was missed
(a bug, or a record that no longer decodes): it is dropped and meta b"recount" is set,
so the next read-write open rebuilds the counts. Refusing the write instead would stop
the relay taking mail over a gauge.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable

import lmdb
import msgpack

from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, destination_of

BE64 = struct.Struct(">Q")
SEP = b"\x00"
SPOOL_STATES = ("ready", "deferred", "held")
COUNTED = {"ready": "ready", "active": "ready", "deferred": "deferred", "held": "held"}
DUE = frozenset({"ready", "active", "deferred"})
REBUILD = b"rebuild"  # meta: the last envelope key a rebuild has counted
RECOUNT = b"recount"  # meta: counts may be wrong (a record that does not decode); rebuild at next open
_STATE_KEYS = {state: SEP + state.encode() for state in SPOOL_STATES}


def due_key(envelope: Envelope) -> bytes:
    return BE64.pack(int(envelope.next_attempt * 1000)) + envelope.id.encode()


def due_floor(when: float) -> bytes:
    """The smallest due key at time `when`."""
    return BE64.pack(int(when * 1000))


def due_time(key: bytes) -> float:
    return BE64.unpack_from(key)[0] / 1000


def is_due(envelope: Envelope) -> bool:
    return any(r.state in DUE for r in envelope.recipients)


def counted(envelope: Envelope) -> list[tuple[str, str]]:
    """(destination, spool state) of each recipient still queued."""
    out = []
    for r in envelope.recipients:
        state = COUNTED.get(r.state)
        if state is not None:
            out.append((destination_of(r.address), state))
    return out


def bydest_key(dest: str, msgid: MessageId | bytes) -> bytes:
    return dest.encode() + SEP + (msgid if isinstance(msgid, bytes) else msgid.encode())


def split_key(key: bytes) -> tuple[str, str]:
    """(destination, state or id) of a counts or bydest key."""
    dest, _, tail = bytes(key).rpartition(SEP)
    return dest.decode(), tail.decode()


class Dbs:
    """The named databases of one open spool."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.envelope = env.open_db(b"envelope")
        self.body = env.open_db(b"body")
        self.due = env.open_db(b"due")
        self.meta = env.open_db(b"meta")
        self.corrupt = env.open_db(b"corrupt")
        self.counts = env.open_db(b"counts")
        self.bydest = env.open_db(b"bydest")


class Changes:
    """The index side of one write transaction."""

    __slots__ = ("txn", "dbs", "cursor", "deltas")

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs) -> None:
        self.txn = txn
        self.dbs = dbs
        cursor = txn.get(REBUILD, db=dbs.meta)
        self.cursor = bytes(cursor) if cursor is not None else None
        self.deltas: dict[tuple[str, str], int] = {}

    def _indexed(self, key: bytes) -> bool:
        return self.cursor is None or key <= self.cursor

    def add(self, key: bytes, new: Envelope) -> None:
        if is_due(new):
            self.txn.put(due_key(new), b"", db=self.dbs.due)
        if self._indexed(key):
            self._count(counted(new), key, +1)

    def remove(self, key: bytes, old: Envelope) -> None:
        if is_due(old):
            self.txn.delete(due_key(old), db=self.dbs.due)
        if self._indexed(key):
            self._count(counted(old), key, -1)

    def replace(self, key: bytes, old: Envelope, new: Envelope) -> None:
        old_due = due_key(old) if is_due(old) else None
        new_due = due_key(new) if is_due(new) else None
        if old_due != new_due:
            if old_due is not None:
                self.txn.delete(old_due, db=self.dbs.due)
            if new_due is not None:
                self.txn.put(new_due, b"", db=self.dbs.due)
        if not self._indexed(key):
            return
        before, after = counted(old), counted(new)
        if before == after:
            return
        deltas = self.deltas
        for pair in before:
            deltas[pair] = deltas.get(pair, 0) - 1
        for pair in after:
            deltas[pair] = deltas.get(pair, 0) + 1
        gone = {dest for dest, _ in before}
        kept = {dest for dest, _ in after}
        for dest in gone - kept:
            self.txn.delete(bydest_key(dest, key), db=self.dbs.bydest)
        for dest in kept - gone:
            self.txn.put(bydest_key(dest, key), b"", db=self.dbs.bydest)

    def _count(self, pairs: list[tuple[str, str]], key: bytes, sign: int) -> None:
        deltas = self.deltas
        for pair in pairs:
            deltas[pair] = deltas.get(pair, 0) + sign
        for dest in {dest for dest, _ in pairs}:
            if sign > 0:
                self.txn.put(bydest_key(dest, key), b"", db=self.dbs.bydest)
            else:
                self.txn.delete(bydest_key(dest, key), db=self.dbs.bydest)

    def count_rebuilt(self, key: bytes, envelope: Envelope) -> None:
        """A rebuild (upgrade.py) counts `envelope`, whatever the cursor, and puts or drops
        its due entry by the due rule."""
        if is_due(envelope):
            self.txn.put(due_key(envelope), b"", db=self.dbs.due)
        else:
            self.txn.delete(due_key(envelope), db=self.dbs.due)
        self._count(counted(envelope), key, +1)

    def quarantine(self, key: bytes, raw: bytes, error: str) -> None:
        """Move the envelope `raw` stored under `key`, which does not decode, to the corrupt table."""
        self.txn.put(key, msgpack.packb({"raw": bytes(raw), "error": error, "at": time.time()}), db=self.dbs.corrupt)
        self.drop_due_of(key)
        self.txn.delete(key, db=self.dbs.envelope)

    def drop_due_of(self, key: bytes) -> None:
        """Every due entry of `key` (a scan of the index: only for a record that does not
        decode, whose due key is unknown); its counts are then wrong until a recount."""
        cursor = self.txn.cursor(db=self.dbs.due)
        found = cursor.first()
        while found:
            found = cursor.delete() if bytes(cursor.key()[8:]) == key else cursor.next()
        if self._indexed(key):
            self.txn.put(RECOUNT, b"1", db=self.dbs.meta)

    def flush(self) -> None:
        """Write the summed deltas: one get + put (or delete) per changed count."""
        totals: dict[str, int] = {}
        for (dest, state), n in self.deltas.items():
            if n:
                self._bump(dest.encode() + _STATE_KEYS[state], n)
                totals[state] = totals.get(state, 0) + n
        for state, n in totals.items():
            if n:
                self._bump(_STATE_KEYS[state], n)
        self.deltas.clear()

    def _bump(self, key: bytes, n: int) -> None:
        raw = self.txn.get(key, db=self.dbs.counts)
        value = (BE64.unpack(raw)[0] if raw is not None else 0) + n
        if value > 0:
            self.txn.put(key, BE64.pack(value), db=self.dbs.counts)
            return
        if raw is not None:
            self.txn.delete(key, db=self.dbs.counts)
        if value < 0:
            self.txn.put(RECOUNT, b"1", db=self.dbs.meta)


def read_totals(txn: lmdb.Transaction, dbs: Dbs) -> dict[str, int]:
    out = {}
    for state, key in _STATE_KEYS.items():
        raw = txn.get(key, db=dbs.counts)
        out[state] = BE64.unpack(raw)[0] if raw is not None else 0
    return out


def read_destination_counts(rows: Iterable[tuple[bytes, bytes]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, raw in rows:
        if key[:1] == SEP:
            continue  # the totals
        dest, state = split_key(key)
        out.setdefault(dest, dict.fromkeys(SPOOL_STATES, 0))[state] = BE64.unpack(raw)[0]
    return out
