"""The queue backend interface and its errors; implementations are backend_<kind>.py.

Contract (tests/mtaqueue/test_contract.py runs it against every backend):
- commit(messages) stores all of them in one durable transaction or none of them;
  it raises QueueFull when the store has no room, QueueIOError on any other failure.
- begin_commit() is commit() in three steps for the group committer (committer.py):
  begun and ended (commit or abort) in one thread, `add`ed to once, from any one thread,
  in between. add raises what commit() would (then abort); commit may raise it too.
- Nothing half-written is ever visible: an envelope is listed only with its body.
- apply() is the scheduler's one transaction for delivery outcomes: updated envelopes
  (states, attempts, next attempt: the due index moves with them), finished messages
  deleted, and bounces added, all or nothing.
- The due index holds a message iff it has a recipient in state ready or deferred; its
  keys (due_key: be64 milliseconds + id) sort by time, then id.
- totals() and destination_counts() count recipients per spool state (ready, deferred,
  held) exactly after every write, without reading envelopes; `messages` is envelopes.
- page() and ids() go in id (= arrival) order from a cursor, a batch at a time; with
  `domain`, only messages with a ready, deferred or held recipient there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage


class QueueError(Exception):
    """A queue operation failed; nothing was changed."""


class QueueFull(QueueError):
    """No room (map full or disk full): the client should retry later (452 4.3.1)."""


class QueueIOError(QueueError):
    """The store failed for another reason (451 4.3.0)."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    messages: int
    used_bytes: int  # message data stored (envelopes + bodies)
    max_bytes: int
    map_bytes: int = 0  # LMDB: the map's size (0 for backends without one)
    map_used_bytes: int = 0  # LMDB: pages in use up to the last one written, free pages included


class PendingCommit(Protocol):
    def add(self, messages: Sequence[NewMessage]) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class QueueBackend(Protocol):
    def commit(self, messages: Sequence[NewMessage]) -> None: ...
    def begin_commit(self) -> PendingCommit: ...
    def apply(self, update: Sequence[Envelope] = (), delete: Sequence[MessageId] = (),
              add: Sequence[NewMessage] = ()) -> None: ...  # one transaction; `add` ignores the size limit
    def envelope(self, msgid: MessageId) -> Envelope | None: ...
    def envelopes_of(self, msgids: Sequence[MessageId]) -> list[Envelope | None]: ...  # envelope() of each, in order
    def body(self, msgid: MessageId) -> bytes | None: ...
    def message(self, msgid: MessageId) -> tuple[Envelope | None, bytes | None]: ...  # both, one read
    def envelopes(self) -> Iterator[Envelope]: ...
    def delete(self, msgids: Sequence[MessageId]) -> int: ...
    def due(self, now: float, limit: int) -> list[MessageId]: ...
    def due_from(self, start: bytes, now: float, limit: int) -> list[tuple[bytes, MessageId]]: ...  # key >= start, time <= now
    def next_due(self, start: bytes) -> float | None: ...  # the time of the first due key >= start
    def due_key(self, envelope: Envelope) -> bytes: ...
    def due_floor(self, when: float) -> bytes: ...  # the smallest due key at `when`
    def totals(self) -> dict[str, int]: ...  # {"ready", "deferred", "held": recipients, "messages": envelopes}
    def destination_counts(self) -> dict[str, dict[str, int]]: ...  # {dest: {"ready", "deferred", "held"}}
    def oldest_arrival(self) -> float | None: ...
    def page(self, after: MessageId | None, limit: int, domain: str | None = None) -> list[Envelope]: ...
    def ids(self, after: MessageId | None, limit: int, domain: str | None = None) -> list[MessageId]: ...
    def by_destination(self) -> Iterator[tuple[str, MessageId]]: ...  # every (dest, id) of a queued recipient
    def stats(self) -> QueueStats: ...
    def close(self) -> None: ...
