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
old and new form (add, replace; remove takes only what records.decode_queued reads of the
old one: a delete decodes no more); deletes of index keys happen at once, puts wait
for `flush` (one putmulti per table), and count deltas are summed per (destination,
state) over the whole transaction and written at `flush`, one get + put per changed key
(a group commit of 25 messages at 2 domains: 3 keys, the totals included). `replace`
compares recipient by recipient, so an update that only defers some recipients costs
no set of destinations and no bydest write.

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

import collections
import functools
import itertools
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
    return _pack_ms(envelope.next_attempt) + envelope.id.encode()


def _pack_ms(when: float) -> bytes:
    return BE64.pack(int(when * 1000))


def due_floor(when: float) -> bytes:
    """The smallest due key at time `when`."""
    return BE64.pack(int(when * 1000))


def due_time(key: bytes) -> float:
    return BE64.unpack_from(key)[0] / 1000


def queued(envelope: Envelope) -> tuple[list[tuple[str, str]], bool]:
    """(destination, spool state) of each recipient still queued, and whether the message
    belongs in the due index. This runs for every message written: comprehensions, no loop."""
    pairs = [(destination_of(r.address), COUNTED[state]) for r in envelope.recipients
             if (state := r.state) in COUNTED]
    return pairs, any([state != "held" for _, state in pairs])


def is_due(envelope: Envelope) -> bool:
    return queued(envelope)[1]


def counted(envelope: Envelope) -> list[tuple[str, str]]:
    return queued(envelope)[0]


@functools.lru_cache(maxsize=65536)
def _prefix(dest: str) -> bytes:
    return dest.encode() + SEP


def bydest_key(dest: str, msgid: MessageId | bytes) -> bytes:
    return _prefix(dest) + (msgid if isinstance(msgid, bytes) else msgid.encode())


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
    """The index side of one write transaction. Puts wait for `flush` (one putmulti per
    table: a C loop, not a Python call per key); a delete also cancels a put waiting for
    the same key."""

    __slots__ = ("txn", "dbs", "cursor", "_plus", "_minus", "_due", "_bydest", "_due_puts", "_bydest_puts")

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs) -> None:
        self.txn = txn
        self.dbs = dbs
        self._due, self._bydest = dbs.due, dbs.bydest
        cursor = txn.get(REBUILD, db=dbs.meta)
        self.cursor = bytes(cursor) if cursor is not None else None
        self._plus: list[tuple[str, str]] = []  # (destination, state) counted once more; summed at flush
        self._minus: list[tuple[str, str]] = []
        self._due_puts: list[bytes] = []
        self._bydest_puts: list[bytes] = []

    def _indexed(self, key: bytes) -> bool:
        return self.cursor is None or key <= self.cursor

    def add(self, key: bytes, new: Envelope) -> None:
        # The inbound group commit's path: one comprehension, no helper calls per recipient.
        pairs = [(destination_of(r.address), COUNTED[state]) for r in new.recipients if (state := r.state) in COUNTED]
        if not pairs:
            return
        for _, state in pairs:
            if state != "held":
                self._due_puts.append(BE64.pack(int(new.next_attempt * 1000)) + key)
                break
        if self.cursor is None or key <= self.cursor:
            self._plus += pairs
            self._bydest_puts += [_prefix(dest) + key for dest in {dest for dest, _ in pairs}]

    def remove(self, key: bytes, next_attempt: float, recipients: Iterable[tuple[str, str]]) -> None:
        """A stored envelope goes, known by its next attempt and each recipient's (address,
        state): what records.decode_queued reads, without decoding the whole record."""
        pairs = [(destination_of(address), COUNTED[state]) for address, state in recipients if state in COUNTED]
        if any([state != "held" for _, state in pairs]):
            self._delete(_pack_ms(next_attempt) + key, self._due, self._due_puts)
        if self.cursor is None or key <= self.cursor:
            self._count(pairs, key, -1)

    def replace(self, key: bytes, old: Envelope, new: Envelope) -> None:
        # The scheduler's path (apply): compare recipient by recipient and count only the
        # ones whose spool state changed; the destination sets only when one entered or
        # left the queue (then bydest may change).
        olds, news = old.recipients, new.recipients
        if len(olds) != len(news):
            return self._replace_whole(key, old, new)
        old_due = new_due = whole = False
        minus, plus = self._minus, self._plus
        marks = len(minus), len(plus)
        indexed = self.cursor is None or key <= self.cursor
        for ro, rn in zip(olds, news):
            a, b = ro.state, rn.state
            if a in DUE:
                old_due = True
            if b in DUE:
                new_due = True
            if a == b and ro.address == rn.address or not indexed:
                continue
            was, now = COUNTED.get(a), COUNTED.get(b)
            if was is None or now is None or ro.address != rn.address:
                whole = True  # a recipient entered or left the queue (or moved)
            elif was != now:
                dest = destination_of(rn.address)
                minus.append((dest, was))
                plus.append((dest, now))
        if old_due != new_due or old_due and old.next_attempt != new.next_attempt:
            if old_due:
                self._delete(_pack_ms(old.next_attempt) + key, self._due, self._due_puts)
            if new_due:
                self._due_puts.append(_pack_ms(new.next_attempt) + key)
        if whole:
            del minus[marks[0]:], plus[marks[1]:]  # counted whole instead
            self._count_whole(key, old, new)

    def _replace_whole(self, key: bytes, old: Envelope, new: Envelope) -> None:
        before, old_due = queued(old)
        after, new_due = queued(new)
        if old_due != new_due or old_due and old.next_attempt != new.next_attempt:
            if old_due:
                self._delete(_pack_ms(old.next_attempt) + key, self._due, self._due_puts)
            if new_due:
                self._due_puts.append(_pack_ms(new.next_attempt) + key)
        if self.cursor is None or key <= self.cursor:
            self._count_whole(key, old, new, before, after)

    def _count_whole(self, key: bytes, old: Envelope, new: Envelope, before: list[tuple[str, str]] | None = None,
                 after: list[tuple[str, str]] | None = None) -> None:
        """Count `old` out and `new` in, whole, and move its bydest entries."""
        before = queued(old)[0] if before is None else before
        after = queued(new)[0] if after is None else after
        if before == after:
            return
        self._minus += before
        self._plus += after
        gone = {dest for dest, _ in before}
        kept = {dest for dest, _ in after}
        if gone != kept:
            for dest in gone - kept:
                self._delete(_prefix(dest) + key, self._bydest, self._bydest_puts)
            for dest in kept - gone:
                self._bydest_puts.append(_prefix(dest) + key)

    def _count(self, pairs: list[tuple[str, str]], key: bytes, sign: int) -> None:
        if sign > 0:
            self._plus += pairs
            self._bydest_puts += [_prefix(dest) + key for dest in {dest for dest, _ in pairs}]
        else:
            self._minus += pairs
            for dest in {dest for dest, _ in pairs}:
                self._delete(_prefix(dest) + key, self._bydest, self._bydest_puts)

    def _delete(self, key: bytes, table: lmdb._Database, puts: list[bytes]) -> None:
        while key in puts:  # put earlier in this transaction (rare: a message written twice)
            puts.remove(key)
        self.txn.delete(key, db=table)

    def count_rebuilt(self, key: bytes, envelope: Envelope) -> None:
        """A rebuild (upgrade.py) counts `envelope`, whatever the cursor, and puts or drops
        its due entry by the due rule."""
        pairs, due = queued(envelope)
        if due:
            self._due_puts.append(due_key(envelope))
        else:
            self._delete(due_key(envelope), self._due, self._due_puts)
        self._count(pairs, key, +1)

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
        """Write the index keys waiting and the summed deltas: one get + put (or delete)
        per changed count."""
        for table, puts in ((self._due, self._due_puts), (self._bydest, self._bydest_puts)):
            if puts:
                self.txn.cursor(db=table).putmulti(zip(puts, itertools.repeat(b"")))
                puts.clear()
        deltas = collections.Counter(self._plus)  # counted in C
        if self._minus:
            for pair, n in collections.Counter(self._minus).items():
                deltas[pair] -= n
        self._plus.clear()
        self._minus.clear()
        totals: dict[str, int] = {}
        for (dest, state), n in deltas.items():
            if n:
                self._bump(_prefix(dest) + _STATE_KEYS[state][1:], n)
                totals[state] = totals.get(state, 0) + n
        for state, n in totals.items():
            if n:
                self._bump(_STATE_KEYS[state], n)

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
