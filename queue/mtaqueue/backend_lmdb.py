"""The LMDB spool: envelopes, bodies and the due-time index in one environment.

Layout (named databases):
  envelope  msgid -> msgpack envelope (records.encode)
  body      msgid -> message bytes as received (with our Received header)
  due       be64(next_attempt in ms) + msgid -> b""   (byte order is the schedule)
  meta      b"bytes" -> be64 octets of envelopes + bodies stored
  corrupt   msgid -> msgpack {"raw": envelope bytes, "error": str, "at": unix seconds}

An envelope that does not decode (records.CorruptRecord: damaged on disk) is moved to
`corrupt` by whichever process reads it first (its due entries go, its body stays),
reported once through `on_corrupt`, and from then on the message is absent: readers
go on with the rest, never crash on it. `mta queue check` lists the corrupt table
(mtaqueue/check.py, which also checks the file itself before `mta serve` forks).

Opened with sync on and without writemap, so every commit is fdatasync'ed before
commit() returns: the caller may say 250 after it. Open it after fork, never before:
an LMDB handle must not cross a fork. The folder is 0700 and its files 0600 (private.py).

Room: `max_size_bytes` bounds the message data stored (meta b"bytes"); a commit that
would pass it raises QueueFull. The LMDB map itself is sized at twice that plus
MAP_HEADROOM_BYTES, because LMDB is copy-on-write: even a delete needs free pages,
and a map filled to the last page could not be emptied. Should LMDB still run out
(map or disk full), the transaction aborts (nothing half-written) -> QueueFull.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator, Sequence

import lmdb
import msgpack

from mtaqueue import records
from mtaqueue.backend import QueueFull, QueueIOError, QueueStats
from mtaqueue.ids import MessageId
from mtaqueue.private import FILE_MODE, private_dir
from mtaqueue.records import CorruptRecord, Envelope, NewMessage

_BE64 = struct.Struct(">Q")
_SCAN_BATCH = 1000
_BYTES = b"bytes"
MAP_HEADROOM_BYTES = 16 * 1024 * 1024
TABLES = (b"envelope", b"body", b"due", b"meta", b"corrupt")

OnCorrupt = Callable[[MessageId, str, bool], None]  # (id, error, moved to `corrupt`) of a damaged record


def due_key(envelope: Envelope) -> bytes:
    return _BE64.pack(int(envelope.next_attempt * 1000)) + envelope.id.encode()


class LmdbBackend:
    def __init__(self, path: str, max_size_bytes: int, readonly: bool = False,
                 on_corrupt: OnCorrupt | None = None) -> None:
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
        self._envelope = self._env.open_db(b"envelope")
        self._body = self._env.open_db(b"body")
        self._due = self._env.open_db(b"due")
        self._meta = self._env.open_db(b"meta")
        self._corrupt = self._env.open_db(b"corrupt")
        self._readonly = readonly

    def commit(self, messages: Sequence[NewMessage]) -> None:
        self._write(add=messages, enforce_limit=True)

    def apply(self, update: Sequence[Envelope] = (), delete: Sequence[MessageId] = (),
              add: Sequence[NewMessage] = ()) -> None:
        # Bounces (`add` here) are not held to max_size_bytes: a failure record and its
        # bounce commit together, and the map's headroom is there for exactly this.
        self._write(update=update, delete=delete, add=add, enforce_limit=False)

    def _write(self, *, update: Sequence[Envelope] = (), delete: Sequence[MessageId] = (),
               add: Sequence[NewMessage] = (), enforce_limit: bool) -> int:
        removed = 0
        try:
            # buffers=True: reads are views into the map, not copies (a deletion reads the
            # body only for its length); each is used before the next write in this txn.
            with self._env.begin(write=True, buffers=True) as txn:
                stored = self._stored_bytes(txn)
                for envelope in update:
                    key = envelope.id.encode()
                    old = txn.get(key, db=self._envelope)
                    if old is None:
                        continue  # deleted meanwhile (e.g. by an operator): nothing to update
                    raw = records.encode(envelope)
                    stored += len(raw) - len(old)
                    self._drop_due(txn, key, old)
                    txn.put(key, raw, db=self._envelope)
                    txn.put(due_key(envelope), b"", db=self._due)
                for msgid in delete:
                    key = msgid.encode()
                    raw = txn.get(key, db=self._envelope)
                    if raw is None:
                        continue
                    stored -= len(raw) + len(txn.get(key, db=self._body) or b"")
                    self._drop_due(txn, key, raw)
                    txn.delete(key, db=self._envelope)
                    txn.delete(key, db=self._body)
                    removed += 1
                for m in add:
                    key = m.envelope.id.encode()
                    raw = records.encode(m.envelope)
                    stored += len(raw) + len(m.body)
                    if enforce_limit and stored > self.max_size_bytes:
                        raise QueueFull(f"the queue holds its limit of {self.max_size_bytes} bytes "
                                        "([queue] max_size_bytes)")
                    if not txn.put(key, raw, db=self._envelope, overwrite=False):
                        raise QueueIOError(f"message id {m.envelope.id} already exists")
                    txn.put(key, m.body, db=self._body)
                    txn.put(due_key(m.envelope), b"", db=self._due)
                txn.put(_BYTES, _BE64.pack(max(stored, 0)), db=self._meta)
        except (lmdb.MapFullError, lmdb.DiskError) as exc:
            raise QueueFull(str(exc)) from exc
        except lmdb.Error as exc:
            raise QueueIOError(str(exc)) from exc
        return removed

    def _drop_due(self, txn: lmdb.Transaction, key: bytes, raw: bytes) -> None:
        """Delete the due entry of the stored envelope `raw`; when it does not decode, every
        due entry of that id (a scan of the index: only ever for a damaged record)."""
        try:
            txn.delete(due_key(records.decode(raw)), db=self._due)
            return
        except CorruptRecord:
            pass
        cursor = txn.cursor(db=self._due)
        found = cursor.first()
        while found:
            found = cursor.delete() if bytes(cursor.key()[8:]) == key else cursor.next()

    def envelope(self, msgid: MessageId) -> Envelope | None:
        """The stored envelope; None when there is none (or it was damaged: moved to corrupt)."""
        with self._env.begin() as txn:
            raw = txn.get(msgid.encode(), db=self._envelope)
        return self._decode(msgid, raw)

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
                entry = msgpack.packb({"raw": raw, "error": error, "at": time.time()})
                txn.put(key, entry, db=self._corrupt)
                self._drop_due(txn, key, raw)
                txn.delete(key, db=self._envelope)
        except lmdb.Error as exc:  # (map or disk full) left in place, skipped all the same, reported each time
            moved, error = False, f"{error}; cannot move it: {exc}"
        else:
            moved = True
        if self._on_corrupt is not None:
            self._on_corrupt(MessageId(key.decode("ascii", "replace")), error, moved)
        return moved

    def delete(self, msgids: Sequence[MessageId]) -> int:
        return self._write(delete=msgids, enforce_limit=False)

    def due(self, now: float, limit: int) -> list[MessageId]:
        bound = _BE64.pack(int(now * 1000) + 1)
        out: list[MessageId] = []
        with self._env.begin() as txn:
            for key in txn.cursor(db=self._due).iternext(keys=True, values=False):
                if key >= bound or len(out) >= limit:
                    break
                out.append(MessageId(bytes(key[8:]).decode()))
        return out

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

    def close(self) -> None:
        self._env.close()
