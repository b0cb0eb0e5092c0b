"""The in-memory queue backend: the contract without durability, for tests and tools.

`max_bytes` bounds stored envelope + body bytes, so QueueFull behaves as on LMDB.
The due index, counts and bydest are computed from the envelopes when asked (the
rules of indexes.py, not its cost): a reference for the contract, not for a million.
Thread-safe like LMDB is for its callers: one lock around every method (the scheduler
writes from its writer thread while its loop reads), and listings are snapshots.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from mtaqueue import indexes, records
from mtaqueue.backend import QueueFull, QueueIOError, QueueStats
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    @functools.wraps(method)
    def call(self: MemoryBackend, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return call  # type: ignore[return-value]


class MemoryBackend:
    def __init__(self, max_bytes: int = 1 << 62) -> None:
        self._lock = threading.RLock()
        self.max_bytes = max_bytes
        self._envelopes: dict[MessageId, Envelope] = {}
        self._bodies: dict[MessageId, bytes] = {}
        self._used = 0

    @_locked
    def commit(self, messages: Sequence[NewMessage]) -> None:
        ids = [m.envelope.id for m in messages]
        if len(set(ids)) != len(ids) or any(i in self._envelopes for i in ids):
            raise QueueIOError("message id already exists")
        size = sum(len(m.body) + len(records.encode(m.envelope)) for m in messages)
        if self._used + size > self.max_bytes:
            raise QueueFull("memory queue is full")
        for m in messages:
            self._envelopes[m.envelope.id] = copy.deepcopy(m.envelope)
            self._bodies[m.envelope.id] = bytes(m.body)
        self._used += size

    def begin_commit(self) -> _PendingCommit:
        return _PendingCommit(self)

    @_locked
    def apply(self, update: Sequence[Envelope] = (), delete: Sequence[MessageId] = (),
              add: Sequence[NewMessage] = ()) -> None:
        ids = [m.envelope.id for m in add]
        if len(set(ids)) != len(ids) or any(i in self._envelopes for i in ids):
            raise QueueIOError("message id already exists")
        for envelope in update:
            old = self._envelopes.get(envelope.id)
            if old is not None:
                self._used += len(records.encode(envelope)) - len(records.encode(old))
                self._envelopes[envelope.id] = copy.deepcopy(envelope)
        self.delete(delete)
        for m in add:  # not held to max_bytes, as on LMDB
            self._envelopes[m.envelope.id] = copy.deepcopy(m.envelope)
            self._bodies[m.envelope.id] = bytes(m.body)
            self._used += len(m.body) + len(records.encode(m.envelope))

    @_locked
    def envelope(self, msgid: MessageId) -> Envelope | None:
        found = self._envelopes.get(msgid)
        return copy.deepcopy(found) if found is not None else None

    @_locked
    def envelopes_of(self, msgids: Sequence[MessageId]) -> list[Envelope | None]:
        return [self.envelope(msgid) for msgid in msgids]

    @_locked
    def body(self, msgid: MessageId) -> bytes | None:
        return self._bodies.get(msgid)

    @_locked
    def message(self, msgid: MessageId) -> tuple[Envelope | None, bytes | None]:
        return self.envelope(msgid), self.body(msgid)

    @_locked
    def envelopes(self) -> Iterator[Envelope]:
        return iter([copy.deepcopy(self._envelopes[msgid]) for msgid in sorted(self._envelopes)])

    @_locked
    def delete(self, msgids: Sequence[MessageId]) -> int:
        removed = 0
        for msgid in msgids:
            envelope = self._envelopes.pop(msgid, None)
            if envelope is not None:
                self._used -= len(self._bodies.pop(msgid)) + len(records.encode(envelope))
                removed += 1
        return removed

    @_locked
    def due(self, now: float, limit: int) -> list[MessageId]:
        return [msgid for _key, msgid in self.due_from(b"", now, limit)]

    @_locked
    def due_from(self, start: bytes, now: float, limit: int) -> list[tuple[bytes, MessageId]]:
        bound = indexes.due_floor(now) + b"\xff"
        keys = sorted(k for k in map(indexes.due_key, filter(indexes.is_due, self._envelopes.values()))
                      if start <= k < bound)
        return [(k, MessageId(k[8:].decode())) for k in keys[:limit]]

    @_locked
    def next_due(self, start: bytes) -> float | None:
        keys = [k for k in map(indexes.due_key, filter(indexes.is_due, self._envelopes.values())) if k >= start]
        return indexes.due_time(min(keys)) if keys else None

    due_key = staticmethod(indexes.due_key)
    due_floor = staticmethod(indexes.due_floor)

    @_locked
    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(indexes.SPOOL_STATES, 0)
        for counts in self.destination_counts().values():
            for state, n in counts.items():
                out[state] += n
        out["messages"] = len(self._envelopes)
        return out

    @_locked
    def destination_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for envelope in self._envelopes.values():
            for dest, state in indexes.counted(envelope):
                out.setdefault(dest, dict.fromkeys(indexes.SPOOL_STATES, 0))[state] += 1
        return out

    @_locked
    def oldest_arrival(self) -> float | None:
        return self._envelopes[min(self._envelopes)].arrival if self._envelopes else None

    @_locked
    def page(self, after: MessageId | None, limit: int, domain: str | None = None) -> list[Envelope]:
        return [copy.deepcopy(self._envelopes[msgid]) for msgid in self.ids(after, limit, domain)]

    @_locked
    def ids(self, after: MessageId | None, limit: int, domain: str | None = None) -> list[MessageId]:
        dest = records.destination_of("@" + domain) if domain is not None else None
        chosen = sorted(msgid for msgid, e in self._envelopes.items() if (after is None or msgid > after)
                        and (dest is None or any(d == dest for d, _ in indexes.counted(e))))
        return chosen[:limit]

    @_locked
    def by_destination(self) -> Iterator[tuple[str, MessageId]]:
        return iter(sorted({(dest, msgid) for msgid, e in self._envelopes.items() for dest, _ in indexes.counted(e)}))

    @_locked
    def stats(self) -> QueueStats:
        return QueueStats(messages=len(self._envelopes), used_bytes=self._used, max_bytes=self.max_bytes)

    @_locked
    def close(self) -> None:
        self._envelopes.clear()
        self._bodies.clear()


class _PendingCommit:
    """commit() in steps (backend.PendingCommit): the messages are stored at commit."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self._messages: Sequence[NewMessage] = ()

    def add(self, messages: Sequence[NewMessage]) -> None:
        self._messages = messages

    def commit(self) -> None:
        self._backend.commit(self._messages)

    def abort(self) -> None:
        self._messages = ()
