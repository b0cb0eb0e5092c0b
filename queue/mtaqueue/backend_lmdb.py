"""The LMDB spool: envelopes, bodies and the due-time index in one environment.

Layout (named databases):
  envelope  msgid -> msgpack envelope (records.encode)
  body      msgid -> message bytes as received (with our Received header)
  due       be64(next_attempt in ms) + msgid -> b""   (byte order is the schedule)
  meta      b"bytes" -> be64 octets of envelopes + bodies stored

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

import os
import struct
from collections.abc import Iterator, Sequence

import lmdb

from mtaqueue import records
from mtaqueue.backend import QueueFull, QueueIOError, QueueStats
from mtaqueue.ids import MessageId
from mtaqueue.private import FILE_MODE, private_dir
from mtaqueue.records import Envelope, NewMessage

_BE64 = struct.Struct(">Q")
_SCAN_BATCH = 1000
_BYTES = b"bytes"
MAP_HEADROOM_BYTES = 16 * 1024 * 1024


def due_key(envelope: Envelope) -> bytes:
    return _BE64.pack(int(envelope.next_attempt * 1000)) + envelope.id.encode()


class LmdbBackend:
    def __init__(self, path: str, max_size_bytes: int, readonly: bool = False) -> None:
        self.path = path
        self.max_size_bytes = max_size_bytes
        try:
            private_dir(path)
            self._env = lmdb.open(
                path, map_size=2 * max_size_bytes + MAP_HEADROOM_BYTES, max_dbs=5, sync=True, metasync=True,
                writemap=False, readahead=False, max_readers=512, subdir=True, mode=FILE_MODE,
            )
        except (lmdb.Error, PermissionError) as exc:
            raise QueueIOError(f"cannot open the queue at {path}: {exc}") from exc
        self._env.reader_check()  # clear reader slots of processes killed with -9
        self._envelope = self._env.open_db(b"envelope")
        self._body = self._env.open_db(b"body")
        self._due = self._env.open_db(b"due")
        self._meta = self._env.open_db(b"meta")
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
                    txn.delete(due_key(records.decode(old)), db=self._due)
                    txn.put(key, raw, db=self._envelope)
                    txn.put(due_key(envelope), b"", db=self._due)
                for msgid in delete:
                    key = msgid.encode()
                    raw = txn.get(key, db=self._envelope)
                    if raw is None:
                        continue
                    stored -= len(raw) + len(txn.get(key, db=self._body) or b"")
                    txn.delete(due_key(records.decode(raw)), db=self._due)
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

    def envelope(self, msgid: MessageId) -> Envelope | None:
        with self._env.begin() as txn:
            raw = txn.get(msgid.encode(), db=self._envelope)
        return records.decode(raw) if raw is not None else None

    def body(self, msgid: MessageId) -> bytes | None:
        with self._env.begin(buffers=False) as txn:
            return txn.get(msgid.encode(), db=self._body)

    def message(self, msgid: MessageId) -> tuple[Envelope | None, bytes | None]:
        """Envelope and body in one read transaction: a delete is seen whole or not at all."""
        key = msgid.encode()
        with self._env.begin(buffers=False) as txn:
            raw, body = txn.get(key, db=self._envelope), txn.get(key, db=self._body)
        return (records.decode(raw) if raw is not None else None), body

    def envelopes(self) -> Iterator[Envelope]:
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
            yield from (records.decode(raw) for _, raw in batch)
            if len(batch) < _SCAN_BATCH:
                return
            after = batch[-1][0]

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
