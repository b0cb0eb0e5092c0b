"""The in-memory queue backend: the contract without durability, for tests and tools.

`max_bytes` bounds stored envelope + body bytes, so QueueFull behaves as on LMDB.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

from mtaqueue import records
from mtaqueue.backend import QueueFull, QueueIOError, QueueStats
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage


class MemoryBackend:
    def __init__(self, max_bytes: int = 1 << 62) -> None:
        self.max_bytes = max_bytes
        self._envelopes: dict[MessageId, Envelope] = {}
        self._bodies: dict[MessageId, bytes] = {}
        self._used = 0

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

    def envelope(self, msgid: MessageId) -> Envelope | None:
        found = self._envelopes.get(msgid)
        return copy.deepcopy(found) if found is not None else None

    def body(self, msgid: MessageId) -> bytes | None:
        return self._bodies.get(msgid)

    def message(self, msgid: MessageId) -> tuple[Envelope | None, bytes | None]:
        return self.envelope(msgid), self.body(msgid)

    def envelopes(self) -> Iterator[Envelope]:
        for msgid in sorted(self._envelopes):
            yield copy.deepcopy(self._envelopes[msgid])

    def delete(self, msgids: Sequence[MessageId]) -> int:
        removed = 0
        for msgid in msgids:
            envelope = self._envelopes.pop(msgid, None)
            if envelope is not None:
                self._used -= len(self._bodies.pop(msgid)) + len(records.encode(envelope))
                removed += 1
        return removed

    def due(self, now: float, limit: int) -> list[MessageId]:
        ready = sorted((e.next_attempt, e.id) for e in self._envelopes.values() if e.next_attempt <= now)
        return [msgid for _, msgid in ready[:limit]]

    def stats(self) -> QueueStats:
        return QueueStats(messages=len(self._envelopes), used_bytes=self._used, max_bytes=self.max_bytes)

    def close(self) -> None:
        self._envelopes.clear()
        self._bodies.clear()
