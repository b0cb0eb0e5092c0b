"""The LMDB spool: envelopes, bodies, and the indexes and counts that serve the scheduler
and the operator's views without reading every envelope.

Layout (named databases; format 2, meta b"format"):
  envelope  msgid -> msgpack envelope (records.encode); ids sort by arrival
  body      msgid -> message bytes as received (with our Received header)
  due       be64(next_attempt in ms) + msgid -> b""  for messages with a ready or
            deferred recipient (byte order is the schedule)
  counts    destination + b"\0" + state -> be64 recipients (ready, deferred, held;
            destination b"": the totals)
  bydest    destination + b"\0" + msgid -> b""  (a message's queued destinations)
  meta      b"bytes" -> be64 octets of envelopes + bodies stored; b"format" -> b"2";
            b"recount", b"rebuild": see upgrade.py
  corrupt   msgid -> msgpack {"raw": envelope bytes, "error": str, "at": unix seconds}
  imported  msgid -> be64 ms of the import: every id `add_new` ever added (made at the
            first import; an import adds no id it holds, so it is idempotent per id even
            after the message was delivered and deleted)
due, counts and bydest change in the transaction of every change (indexes.py). A spool
of format 1 (no due rule, counts or bydest) is upgraded by the first read-write open
(upgrade.py); a read-only open of one raises QueueIOError.

An envelope that does not decode (records.CorruptRecord: damaged on disk) is moved to
`corrupt` by whichever process reads it first (its due entries go, its body stays),
reported once through `on_corrupt`, and from then on the message is absent: readers
go on with the rest, never crash on it. Its counts cannot be taken back (its recipients
are unknown): meta b"recount" is set and the next read-write open recounts; meanwhile
readers skip bydest entries whose envelope is gone. `mta queue check` lists the corrupt
table (mtaqueue/check.py, which also checks the file itself before `mta serve` forks).

Opened with sync on and without writemap, so every commit is fdatasync'ed before
commit() returns: the caller may say 250 after it. Open it after fork, never before:
an LMDB handle must not cross a fork. The folder is 0700 and its files 0600 (private.py).
Readers use short read transactions, one per batch: a long one would pin every page
written meanwhile and grow the file.

Room: `max_size_bytes` bounds the message data stored (meta b"bytes"); a commit that
would pass it raises QueueFull. The LMDB map itself is sized at twice that plus
MAP_HEADROOM_BYTES, because LMDB is copy-on-write: even a delete needs free pages,
and a map filled to the last page could not be emptied. Should LMDB still run out
(map or disk full), the transaction aborts (nothing half-written) -> QueueFull.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import lmdb

from mtaqueue import indexes, records, upgrade
from mtaqueue.backend import QueueFull, QueueIOError, QueueStats
from mtaqueue.ids import MessageId
from mtaqueue.indexes import BE64 as _BE64
from mtaqueue.indexes import Changes, Dbs
from mtaqueue.private import FILE_MODE, private_dir
from mtaqueue.records import CorruptRecord, Envelope, NewMessage

_SCAN_BATCH = 1000
_BYTES = b"bytes"
MAP_HEADROOM_BYTES = 16 * 1024 * 1024
TABLES = (b"envelope", b"body", b"due", b"meta", b"corrupt", b"counts", b"bydest")

OnCorrupt = Callable[[MessageId, str, bool], None]  # (id, error, moved to `corrupt`) of a damaged record
due_key = indexes.due_key


class LmdbBackend:
    def __init__(self, path: str, max_size_bytes: int, readonly: bool = False,
                 on_corrupt: OnCorrupt | None = None, on_progress: upgrade.OnProgress | None = None,
                 recount: bool = True) -> None:
        """readonly: never upgrade or recount (a format-1 spool raises QueueIOError).
        recount: run a pending recount (else leave it to a later open: mta serve's workers
        do, the master recounted before forking). on_progress(done, total): envelopes
        counted by an upgrade or recount this open runs."""
        self.path = path
        self.max_size_bytes = max_size_bytes
        self._on_corrupt = on_corrupt
        try:
            private_dir(path)
            self._env = lmdb.open(
                path, map_size=2 * max_size_bytes + MAP_HEADROOM_BYTES, max_dbs=8, sync=True, metasync=True,
                writemap=False, readahead=False, max_readers=512, subdir=True, mode=FILE_MODE,
            )
        except (lmdb.Error, PermissionError) as exc:
            raise QueueIOError(f"cannot open the queue at {path}: {exc}") from exc
        self._env.reader_check()  # clear reader slots of processes killed with -9
        self._dbs = dbs = Dbs(self._env)
        self._envelope, self._body, self._due, self._meta = dbs.envelope, dbs.body, dbs.due, dbs.meta
        self._corrupt, self._counts, self._bydest = dbs.corrupt, dbs.counts, dbs.bydest
        self._readonly = readonly
        self._imported: lmdb._Database | None = None  # opened by the first add_new
        try:
            upgrade.on_open(self._env, dbs, path, readonly, recount, on_progress, self._on_corrupt)
        except QueueIOError:
            self._env.close()
            raise

    def commit(self, messages: Sequence[NewMessage]) -> None:
        self._write(add=messages, enforce_limit=True)

    def add_new(self, messages: Sequence[NewMessage]) -> list[MessageId]:
        """Commit, as commit() does, the messages whose ids this spool has never held
        through add_new and does not hold now; the ids added (the rest are skipped)."""
        if self._imported is None:
            try:
                self._imported = self._env.open_db(b"imported")  # (its own write transaction: not inside ours)
            except lmdb.Error as exc:
                raise QueueIOError(f"cannot open the imported table of {self.path}: {exc}") from exc
        added: list[MessageId] = []
        self._write(add=messages, enforce_limit=True, added=added)
        return added

    def apply(self, update: Sequence[Envelope] = (), delete: Sequence[MessageId] = (),
              add: Sequence[NewMessage] = ()) -> None:
        # Bounces (`add` here) are not held to max_size_bytes: a failure record and its
        # bounce commit together, and the map's headroom is there for exactly this.
        self._write(update=update, delete=delete, add=add, enforce_limit=False)

    def begin_commit(self) -> _PendingCommit:
        """commit() in steps (backend.PendingCommit): the group committer begins and ends
        the transaction in its writer thread and adds to it on its event loop."""
        try:
            return _PendingCommit(self, self._env.begin(write=True, buffers=True))
        except lmdb.Error as exc:
            raise _queue_error(exc) from exc

    def _write(self, *, update: Sequence[Envelope] = (), delete: Sequence[MessageId] = (),
               add: Sequence[NewMessage] = (), enforce_limit: bool, added: list[MessageId] | None = None) -> int:
        """One transaction; the messages deleted. With `added` (add_new): only the messages
        of `add` new to the imported and envelope tables are added, their ids appended."""
        try:
            # buffers=True: reads are views into the map, not copies (a deletion reads the
            # body only for its length); each is used before the next write in this txn.
            with self._env.begin(write=True, buffers=True) as txn:
                return self._fill(txn, update, delete, add, enforce_limit, added)
        except lmdb.Error as exc:
            raise _queue_error(exc) from exc

    def _fill(self, txn: lmdb.Transaction, update: Sequence[Envelope], delete: Sequence[MessageId],
              add: Sequence[NewMessage], enforce_limit: bool, added: list[MessageId] | None) -> int:
        """_write's changes in `txn`; the messages deleted."""
        removed = 0
        stored = self._stored_bytes(txn)
        changes = Changes(txn, self._dbs)
        for envelope in update:
            key = envelope.id.encode()
            old = txn.get(key, db=self._envelope)
            if old is None:
                continue  # deleted meanwhile (e.g. by an operator): nothing to update
            raw = records.encode(envelope)
            stored += len(raw) - len(old)
            previous = self._decoded(changes, key, old)
            txn.put(key, raw, db=self._envelope)
            if previous is None:
                changes.add(key, envelope)
            else:
                changes.replace(key, previous, envelope)
        for msgid in delete:
            key = msgid.encode()
            raw = txn.get(key, db=self._envelope)
            if raw is None:
                continue
            stored -= len(raw) + len(txn.get(key, db=self._body) or b"")
            try:  # (only what the indexes need: a delete per delivered message)
                when, recipients = records.decode_queued(raw)
            except CorruptRecord:
                changes.drop_due_of(key)  # its due entries by a scan; its counts by a recount
            else:
                changes.remove(key, when, recipients)
            txn.delete(key, db=self._envelope)
            txn.delete(key, db=self._body)
            removed += 1
        envelopes, bodies = [], []
        stamp = _BE64.pack(int(time.time() * 1000))
        for m in add:
            key = m.envelope.id.encode()
            if added is not None:
                if txn.get(key, db=self._imported) is not None or txn.get(key, db=self._envelope) is not None:
                    continue
                txn.put(key, stamp, db=self._imported)
                added.append(m.envelope.id)
            raw = records.encode(m.envelope)
            stored += len(raw) + len(m.body)
            if enforce_limit and stored > self.max_size_bytes:
                raise QueueFull(f"the queue holds its limit of {self.max_size_bytes} bytes "
                                "([queue] max_size_bytes)")
            envelopes.append((key, raw))
            bodies.append((key, m.body))
            changes.add(key, m.envelope)
        if envelopes:  # one C loop per table (a group commit: ~25 messages)
            if txn.cursor(db=self._envelope).putmulti(envelopes, overwrite=False)[1] != len(envelopes):
                raise QueueIOError(f"a message id of {', '.join(m.envelope.id for m in add)} already exists")
            txn.cursor(db=self._body).putmulti(bodies)
        changes.flush()
        txn.put(_BYTES, _BE64.pack(max(stored, 0)), db=self._meta)
        return removed

    @staticmethod
    def _decoded(changes: Changes, key: bytes, raw: bytes) -> Envelope | None:
        """The stored envelope being replaced or deleted; None when it does not decode: its
        due entries go by a scan and its counts are left to a recount (indexes.py)."""
        try:
            return records.decode(raw)
        except CorruptRecord:
            changes.drop_due_of(key)
            return None

    def envelope(self, msgid: MessageId) -> Envelope | None:
        """The stored envelope; None when there is none (or it was damaged: moved to corrupt)."""
        with self._env.begin() as txn:
            raw = txn.get(msgid.encode(), db=self._envelope)
        return self._decode(msgid, raw)

    def envelopes_of(self, msgids: Sequence[MessageId]) -> list[Envelope | None]:
        """envelope() of each id, in order, one short read transaction per _SCAN_BATCH ids
        (the scheduler's New: an inbound group commit's ids at once)."""
        raws: list[bytes | None] = []
        for start in range(0, len(msgids), _SCAN_BATCH):
            with self._env.begin(buffers=False) as txn:
                get, table = txn.get, self._envelope
                raws += [get(msgid.encode(), db=table) for msgid in msgids[start:start + _SCAN_BATCH]]
        return [self._decode(msgid, raw) for msgid, raw in zip(msgids, raws)]

    def _decode(self, msgid: MessageId, raw: bytes | None) -> Envelope | None:
        if raw is None:
            return None
        try:
            return records.decode(raw)
        except CorruptRecord as exc:
            self.quarantine(msgid.encode(), str(exc))
            return None

    def body(self, msgid: MessageId) -> bytes | None:
        with self._env.begin(buffers=False) as txn:
            return txn.get(msgid.encode(), db=self._body)

    def message(self, msgid: MessageId) -> tuple[Envelope | None, bytes | None]:
        """Envelope and body in one read transaction: a delete is seen whole or not at all."""
        key = msgid.encode()
        with self._env.begin(buffers=False) as txn:
            raw, body = txn.get(key, db=self._envelope), txn.get(key, db=self._body)
        return self._decode(msgid, raw), body

    def envelopes(self) -> Iterator[Envelope]:
        """Every stored envelope; damaged ones are moved to corrupt and left out."""
        # One short read transaction per batch: the caller may be slow between items.
        after: bytes | None = None
        while True:
            batch: list[tuple[bytes, bytes]] = []
            with self._env.begin() as txn:
                cursor = txn.cursor(db=self._envelope)
                found = cursor.first() if after is None else cursor.set_range(after)
                if found and cursor.key() == after:
                    found = cursor.next()
                while found and len(batch) < _SCAN_BATCH:
                    batch.append((cursor.key(), cursor.value()))
                    found = cursor.next()
            for key, raw in batch:
                try:
                    envelope = records.decode(raw)
                except CorruptRecord as exc:
                    self.quarantine(key, str(exc))
                    continue
                yield envelope
            if len(batch) < _SCAN_BATCH:
                return
            after = batch[-1][0]

    def quarantine(self, key: bytes, error: str) -> bool:
        """Move the envelope stored under `key` to the corrupt table if it still does not
        decode; True when this call moved it. on_corrupt hears of each record moved (and of
        one that could not be moved, each time it is read)."""
        try:
            with self._env.begin(write=True) as txn:
                raw = txn.get(key, db=self._envelope)
                if raw is None:
                    return False  # moved (or deleted) by another process meanwhile
                try:
                    records.decode(raw)
                    return False  # rewritten meanwhile: it is fine now
                except CorruptRecord:
                    pass
                Changes(txn, self._dbs).quarantine(key, raw, error)  # and sets meta b"recount"
        except lmdb.Error as exc:  # (map or disk full) left in place, skipped all the same, reported each time
            moved, error = False, f"{error}; cannot move it: {exc}"
        else:
            moved = True
        if self._on_corrupt is not None:
            self._on_corrupt(MessageId(key.decode("ascii", "replace")), error, moved)
        return moved

    def delete(self, msgids: Sequence[MessageId]) -> int:
        return self._write(delete=msgids, enforce_limit=False)

    # --- the scheduler's due index ---------------------------------------------------

    def due(self, now: float, limit: int) -> list[MessageId]:
        return [msgid for _key, msgid in self.due_from(b"", now, limit)]

    def due_from(self, start: bytes, now: float, limit: int) -> list[tuple[bytes, MessageId]]:
        """Due entries with key >= start and time <= now, in key order, at most `limit`."""
        bound = _BE64.pack(int(now * 1000) + 1)
        out: list[tuple[bytes, MessageId]] = []
        with self._env.begin(buffers=False) as txn:
            cursor = txn.cursor(db=self._due)
            found = cursor.set_range(start)
            while found and len(out) < limit:
                key = cursor.key()
                if key >= bound:
                    break
                out.append((key, MessageId(key[8:].decode())))
                found = cursor.next()
        return out

    def next_due(self, start: bytes) -> float | None:
        """The time of the first due entry >= start; None when there is none."""
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._due)
            return indexes.due_time(cursor.key()) if cursor.set_range(start) else None

    due_key = staticmethod(indexes.due_key)
    due_floor = staticmethod(indexes.due_floor)

    # --- counts and views --------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """Recipients per spool state and envelopes stored; O(1)."""
        with self._env.begin() as txn:
            out = indexes.read_totals(txn, self._dbs)
            out["messages"] = txn.stat(self._envelope)["entries"]
        return out

    def destination_counts(self) -> dict[str, dict[str, int]]:
        """{destination: {ready, deferred, held}} for every destination with any."""
        with self._env.begin(buffers=False) as txn:
            return indexes.read_destination_counts(txn.cursor(db=self._counts).iternext())

    def oldest_arrival(self) -> float | None:
        """Arrival of the first envelope in id order; None when the spool is empty."""
        while True:
            with self._env.begin(buffers=False) as txn:
                cursor = txn.cursor(db=self._envelope)
                if not cursor.first():
                    return None
                key, raw = cursor.item()
            try:
                return records.decode(raw).arrival
            except CorruptRecord as exc:
                self.quarantine(key, str(exc))  # gone from the table: the next one is first

    def page(self, after: MessageId | None, limit: int, domain: str | None = None) -> list[Envelope]:
        """Up to `limit` envelopes with id > after, in id (arrival) order; with `domain`,
        only messages with a queued recipient there (through bydest)."""
        out: list[Envelope] = []
        position = after.encode() if after is not None else None
        while len(out) < limit:
            want = min(limit - len(out), _SCAN_BATCH)
            found = self._select(position, want, domain, values=True)
            for key, raw in found:
                try:
                    out.append(records.decode(raw))
                except CorruptRecord as exc:
                    self.quarantine(key, str(exc))
            if len(found) < want:
                break
            position = found[-1][0]
        return out

    def ids(self, after: MessageId | None, limit: int, domain: str | None = None) -> list[MessageId]:
        """The ids `page` would give (an envelope that does not decode included: whoever
        reads it moves it aside)."""
        found = self._select(after.encode() if after is not None else None, limit, domain, values=False)
        return [MessageId(key.decode()) for key, _ in found]

    def _select(self, after: bytes | None, limit: int, domain: str | None,
                values: bool) -> list[tuple[bytes, bytes]]:
        """(id, envelope or b"") of up to `limit` messages after `after`, one read transaction."""
        out: list[tuple[bytes, bytes]] = []
        with self._env.begin(buffers=False) as txn:
            if domain is None:
                cursor = txn.cursor(db=self._envelope)
                found = cursor.set_range(after) if after is not None else cursor.first()
                if found and cursor.key() == after:
                    found = cursor.next()
                while found and len(out) < limit:
                    out.append((cursor.key(), cursor.value() if values else b""))
                    found = cursor.next()
                return out
            prefix = indexes.bydest_key(records.destination_of("@" + domain), b"")
            cursor = txn.cursor(db=self._bydest)
            start = prefix + after if after is not None else prefix
            found = cursor.set_range(start)
            if found and cursor.key() == start and after is not None:
                found = cursor.next()
            stale = values or txn.get(indexes.RECOUNT, db=self._meta) is not None
            while found and len(out) < limit:
                key = cursor.key()
                if not key.startswith(prefix):
                    break
                msgid = key[len(prefix):]
                raw = txn.get(msgid, db=self._envelope) if stale else b""
                if raw is not None:  # else: moved aside, its bydest entry waits for the recount
                    out.append((msgid, raw if values else b""))
                found = cursor.next()
        return out

    def by_destination(self) -> Iterator[tuple[str, MessageId]]:
        """Every (destination, id) of bydest, in key order, in batches of short reads."""
        after: bytes | None = None
        while True:
            batch: list[tuple[str, MessageId]] = []
            with self._env.begin(buffers=False) as txn:
                stale = txn.get(indexes.RECOUNT, db=self._meta) is not None
                cursor = txn.cursor(db=self._bydest)
                found = cursor.set_range(after) if after is not None else cursor.first()
                if found and cursor.key() == after:
                    found = cursor.next()
                last = None
                while found and len(batch) < _SCAN_BATCH:
                    last = key = cursor.key()
                    dest, msgid = indexes.split_key(key)
                    if not stale or txn.get(msgid.encode(), db=self._envelope) is not None:
                        batch.append((dest, MessageId(msgid)))
                    found = cursor.next()
            yield from batch
            if not found or last is None:
                return
            after = last


    def stats(self) -> QueueStats:
        with self._env.begin() as txn:
            count = txn.stat(self._envelope)["entries"]
            stored = self._stored_bytes(txn)
        info = self._env.info()
        page = self._env.stat()["psize"]
        return QueueStats(messages=count, used_bytes=stored, max_bytes=self.max_size_bytes,
                          map_bytes=info["map_size"], map_used_bytes=(info["last_pgno"] + 1) * page)

    def _stored_bytes(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_BYTES, db=self._meta)
        return _BE64.unpack(raw)[0] if raw is not None else 0

    def copy_to(self, fd: int) -> None:
        """The whole spool (every table), compacted, written to `fd` as one LMDB file from
        one read transaction: consistent while others write. Free pages are left out."""
        try:
            self._env.copyfd(fd, compact=True)
        except lmdb.Error as exc:
            raise QueueIOError(f"cannot copy the queue at {self.path}: {exc}") from exc

    def close(self) -> None:
        self._env.close()


def _queue_error(exc: lmdb.Error) -> QueueFull | QueueIOError:
    """The queue's error for LMDB's: no room (map or disk full) or any other failure."""
    if isinstance(exc, (lmdb.MapFullError, lmdb.DiskError)):
        return QueueFull(str(exc))
    return QueueIOError(str(exc))


class _PendingCommit:
    """A write transaction begun in one thread (which must end it: LMDB's write lock is
    that thread's), added to once from another, e.g. the event loop's: its puts then
    run without handing the GIL to and fro between the two (backend.PendingCommit)."""

    __slots__ = ("_backend", "_txn")

    def __init__(self, backend: LmdbBackend, txn: lmdb.Transaction) -> None:
        self._backend = backend
        self._txn = txn

    def add(self, messages: Sequence[NewMessage]) -> None:
        try:
            self._backend._fill(self._txn, (), (), messages, True, None)
        except lmdb.Error as exc:
            raise _queue_error(exc) from exc

    def commit(self) -> None:
        try:
            self._txn.commit()
        except lmdb.Error as exc:
            raise _queue_error(exc) from exc

    def abort(self) -> None:
        self._txn.abort()
