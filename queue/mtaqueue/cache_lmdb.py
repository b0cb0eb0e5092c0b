"""The shared cache: a small LMDB-backed TTL cache used by every worker process.

One environment, separate from the spool, shared by the DNS cache, the auth cache and
the inbound rate windows (which count with `update`, a read-modify-write in one write
transaction: LMDB serialises writers across processes). Layout (named databases):
  entry   ns + b"\\0" + key -> be64(expiry in ms) + msgpack(value)
          (keys too long for LMDB: ns + b"\\1" + blake2b(key))
  expiry  be64(expiry in ms) + entry key -> b""   (byte order is the eviction order)
  meta    b"bytes" -> be64 estimated bytes of entries + index
  (a `live` database of earlier builds, open connections per client IP, is no longer
  read or written: workers/inbound/conncount.py counts them in shared memory)

Opened with sync and metasync off and with writemap (commits are memory writes, no
page-write syscalls): a crash may lose the last writes, which for a cache is harmless. Open it after fork, never before: an LMDB handle must not cross a fork
(checked on every call). LMDB makes it safe for many processes at once.

Bounded: a put (or update) that would pass `max_entries`, or the byte budget (half the
map: LMDB is copy-on-write and needs free pages even to delete), first evicts expired
entries, then the ones expiring soonest, in the same transaction. Should LMDB still run
out of map (the byte estimate fell short), a quarter of the entries go in a transaction
of their own, and if even that cannot commit (a map full to its last page cannot
delete), the cache is emptied. A full cache is never the caller's problem: at worst the
write is skipped. Expired entries are never returned; each write also sweeps a few of
them, so they do not pile up.

Invariants: every entry has exactly one expiry index key and vice versa; meta b"bytes"
is the sum of `_cost` over the entries. Values round-trip through msgpack (tuples come
back as lists).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any

import lmdb
import msgpack

from mtaqueue.private import FILE_MODE, private_dir

_BE64 = struct.Struct(">Q")
_BYTES = b"bytes"
_MAX_KEY_BYTES = 511 - _BE64.size  # LMDB's default key limit, less the expiry prefix of the index key
_NODE_OVERHEAD_BYTES = 64  # per entry: node headers and half-full pages of both trees (measured)
_SWEEP_BATCH = 16  # expired entries removed by each put, beyond what room requires
MIB = 1024 * 1024
_RawUpdate = Callable[[bytes | memoryview | None], bytes | None]  # stored raw value -> new one (None: remove)


class LmdbCache:
    def __init__(self, path: str, max_size_bytes: int = 256 * MIB, max_entries: int = 100_000) -> None:
        if max_entries < 1 or max_size_bytes < MIB:
            raise ValueError(f"cache bounds too small: max_entries={max_entries}, max_size_bytes={max_size_bytes}")
        private_dir(path)
        self.path = path
        self.max_entries = max_entries
        self.budget_bytes = max_size_bytes // 2
        self._pid = os.getpid()
        self._forks = _forks
        self._env = lmdb.open(
            path, map_size=max_size_bytes, max_dbs=4, sync=False, metasync=False, writemap=True,
            readahead=False, max_readers=512, subdir=True, mode=FILE_MODE,
        )
        self._env.reader_check()  # clear reader slots of processes killed with -9
        self._entry = self._env.open_db(b"entry")
        self._expiry = self._env.open_db(b"expiry")
        self._meta = self._env.open_db(b"meta")

    def get(self, namespace: str, key: str, now: float) -> Any | None:
        """The value, or None when absent or expired at `now`."""
        self._check_pid()
        with self._begin() as txn:
            raw = txn.get(_entry_key(namespace, key), db=self._entry)
        return _live_value(raw, _ms(now))

    def put(self, namespace: str, key: str, value: Any, ttl_seconds: float, now: float) -> None:
        """Store `value` until now + ttl; a ttl <= 0 removes the entry. Skipped when the cache is full."""
        self._check_pid()
        if ttl_seconds <= 0:
            self.delete(namespace, key)
            return
        raw = _BE64.pack(_ms(now + ttl_seconds)) + msgpack.packb(value, use_bin_type=True)
        self._store(_entry_key(namespace, key), lambda _old: raw, _ms(now))

    def update(self, namespace: str, key: str, fn: Callable[[Any | None], Any], ttl_seconds: float,
               now: float) -> Any:
        """Read-modify-write in one write transaction: store fn(current value) until now + ttl.

        fn gets the value, or None when absent or expired; what it returns is stored (None:
        the entry is removed) and returned, as fn returned it (not round-tripped through
        msgpack). LMDB serialises writers, so concurrent updates from many processes never
        lose one another. fn may run more than once (again after a full map), and must
        therefore only compute. With a ttl <= 0, or a cache too full to store anything,
        fn's value is returned but not stored.
        """
        self._check_pid()
        now_ms = _ms(now)
        expiry = _BE64.pack(_ms(now + ttl_seconds))
        result: Any = None

        def new_raw(old: bytes | memoryview | None) -> bytes | None:
            nonlocal result
            result = fn(_live_value(old, now_ms))
            if result is None or ttl_seconds <= 0:
                return None
            return expiry + msgpack.packb(result, use_bin_type=True)

        self._store(_entry_key(namespace, key), new_raw, now_ms)
        return result

    def delete(self, namespace: str, key: str) -> None:
        self._check_pid()
        ekey = _entry_key(namespace, key)
        try:
            with self._begin(write=True) as txn:
                stored = self._stored_bytes(txn)
                stored -= self._remove(txn, ekey)
                txn.put(_BYTES, _BE64.pack(max(stored, 0)), db=self._meta)
        except (lmdb.MapFullError, lmdb.DiskError):
            return  # cannot even delete: the entry expires on its own

    def entries(self) -> int:
        """Entries stored, including expired ones not yet swept."""
        self._check_pid()
        with self._begin() as txn:
            return int(txn.stat(self._entry)["entries"])

    def entries_by_namespace(self) -> dict[str, int]:
        """Entries per namespace (expired ones not yet swept included): one pass over the keys."""
        self._check_pid()
        counts: dict[str, int] = {}
        with self._begin() as txn:
            for key in txn.cursor(db=self._entry).iternext(keys=True, values=False):
                raw = bytes(key)
                end = min((i for i in (raw.find(b"\0"), raw.find(b"\1")) if i >= 0), default=len(raw))
                name = raw[:end].decode("utf-8", "replace")
                counts[name] = counts.get(name, 0) + 1
        return counts

    def close(self) -> None:
        self._env.close()

    # --- internals ------------------------------------------------------------------

    def _store(self, ekey: bytes, new_raw: _RawUpdate, now_ms: int) -> None:
        """_write, making room when LMDB runs out of map; at worst nothing is stored."""
        try:
            self._write(ekey, new_raw, now_ms)
            return
        except (lmdb.MapFullError, lmdb.DiskError):
            pass
        # The estimate fell short of LMDB's real use: make room in a transaction of its
        # own (freed pages are reusable only after it commits), then try once more. A map
        # filled to its last page cannot even delete: then empty the cache at once.
        for make_room in (self._evict_quarter, self._clear):
            try:
                make_room()
                self._write(ekey, new_raw, now_ms)
                return
            except (lmdb.MapFullError, lmdb.DiskError):
                continue
        # Still full: skip caching, the caller works without it.

    def _write(self, ekey: bytes, new_raw: _RawUpdate, now_ms: int) -> None:
        """One write transaction: replace the entry by new_raw(its stored raw value, or None).

        new_raw returns be64(expiry in ms) + msgpack(value), or None to remove the entry.
        """
        with self._begin(write=True) as txn:
            stored = self._stored_bytes(txn)
            raw = new_raw(txn.get(ekey, db=self._entry))
            stored -= self._remove(txn, ekey)
            cost = _cost(ekey, raw) if raw is not None else 0
            if raw is not None and cost <= self.budget_bytes:  # a value larger than the budget is not cached
                count = int(txn.stat(self._entry)["entries"])
                stored, count = self._make_room(txn, stored, count, cost, now_ms)
                txn.put(ekey, raw, db=self._entry)
                txn.put(raw[:_BE64.size] + ekey, b"", db=self._expiry)
                stored += cost
            txn.put(_BYTES, _BE64.pack(max(stored, 0)), db=self._meta)

    def _make_room(self, txn: lmdb.Transaction, stored: int, count: int, cost: int, now_ms: int) -> tuple[int, int]:
        """Evict from the front of the expiry index: expired entries first, as the order has them."""
        swept = 0
        cursor = txn.cursor(db=self._expiry)
        cursor.first()
        while index_key := cursor.key():  # b"" once past the last key (or the tree is empty)
            expired = _BE64.unpack_from(index_key)[0] <= now_ms
            over = count + 1 > self.max_entries or stored + cost > self.budget_bytes
            if not over and not (expired and swept < _SWEEP_BATCH):
                break
            ekey = bytes(index_key[_BE64.size:])
            raw = txn.get(ekey, db=self._entry)
            if raw is None:  # an index key without its entry breaks the invariant
                raise RuntimeError(f"cache {self.path}: expiry index key without an entry")
            txn.delete(ekey, db=self._entry)
            stored -= _cost(ekey, raw)
            count -= 1
            swept += expired
            cursor.delete()  # moves to the next key
        return stored, count

    def _evict_quarter(self) -> None:
        with self._begin(write=True) as txn:
            stored = self._stored_bytes(txn)
            victims = max(1, int(txn.stat(self._entry)["entries"]) // 4)
            cursor = txn.cursor(db=self._expiry)
            cursor.first()
            while victims > 0 and (index_key := cursor.key()):
                ekey = bytes(index_key[_BE64.size:])
                stored -= _cost(ekey, txn.get(ekey, db=self._entry) or b"")
                txn.delete(ekey, db=self._entry)
                cursor.delete()
                victims -= 1
            txn.put(_BYTES, _BE64.pack(max(stored, 0)), db=self._meta)

    def _clear(self) -> None:
        with self._begin(write=True) as txn:
            txn.drop(self._entry, delete=False)
            txn.drop(self._expiry, delete=False)
            txn.put(_BYTES, _BE64.pack(0), db=self._meta)

    def _remove(self, txn: lmdb.Transaction, ekey: bytes) -> int:
        """Delete one entry and its index key; returns the bytes it cost (0 when absent)."""
        old = txn.get(ekey, db=self._entry)
        if old is None:
            return 0
        txn.delete(bytes(old[:_BE64.size]) + ekey, db=self._expiry)
        txn.delete(ekey, db=self._entry)
        return _cost(ekey, old)

    def _stored_bytes(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_BYTES, db=self._meta)
        return _BE64.unpack(raw)[0] if raw is not None else 0

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        try:
            return self._env.begin(write=write)
        except lmdb.MapResizedError:
            # Another process opened the environment with a larger map (a changed
            # max_size_bytes): adopt its size and go on.
            self._env.set_mapsize(0)
            return self._env.begin(write=write)

    def _check_pid(self) -> None:
        if _forks != self._forks:
            raise RuntimeError(f"cache {self.path} was opened in process {self._pid}, before a fork: "
                               "open the cache after fork")


# Forks of this process so far (an at-fork hook counts them): comparing it is the
# per-operation fork check, without a getpid() system call each time.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def _entry_key(namespace: str, key: str) -> bytes:
    ns = namespace.encode()
    if b"\0" in ns or b"\1" in ns:
        raise ValueError(f"cache namespace {namespace!r} contains a separator byte")
    k = key.encode()
    if len(ns) + 1 + len(k) <= _MAX_KEY_BYTES:
        return ns + b"\0" + k
    return ns + b"\1" + hashlib.blake2b(k, digest_size=32).digest()


def _live_value(raw: bytes | memoryview | None, now_ms: int) -> Any | None:
    """The value of a stored entry; None when absent or expired at now_ms."""
    if raw is None or _BE64.unpack_from(raw)[0] <= now_ms:
        return None
    return msgpack.unpackb(raw[_BE64.size:], raw=False)


def _cost(ekey: bytes, raw: bytes | memoryview) -> int:
    # The entry (key + value) and its index key (expiry + key), with B-tree node overhead.
    return len(ekey) + len(raw) + _BE64.size + len(ekey) + _NODE_OVERHEAD_BYTES


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 0)
