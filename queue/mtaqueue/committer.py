"""Group commit: one writer thread per process turns concurrent commits into one fsync.

`await committer.commit(message)` queues the message; the writer thread takes every
message waiting at that moment, commits them in one transaction (one fsync), and
resolves each caller's future on its event loop. A batch that fails with QueueFull is
retried one caller at a time, so one large message cannot fail its neighbours.
`commit_all(messages)` is one caller's group (a message and its mailing lists' copies):
always in one transaction, stored together or not at all. Writes never run on the
event loop thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

from mtaqueue.backend import QueueBackend, QueueError, QueueFull
from mtaqueue.records import NewMessage

MAX_BATCH = 512
_STOP = object()

Batch = list[tuple[tuple[NewMessage, ...], asyncio.Future[None]]]


class GroupCommitter:
    def __init__(self, backend: QueueBackend, loop: asyncio.AbstractEventLoop,
                 on_commit: Callable[[int, float], None] | None = None) -> None:
        self._backend = backend
        self._loop = loop
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._on_commit = on_commit  # (messages, seconds), called in the writer thread
        self._thread = threading.Thread(target=self._run, name="queue-writer", daemon=True)
        self._thread.start()

    async def commit(self, message: NewMessage) -> None:
        await self.commit_all((message,))

    async def commit_all(self, messages: tuple[NewMessage, ...]) -> None:
        """`messages` in one transaction: all are stored, or none (the error is raised)."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._inbox.put((messages, future))
        await future

    def close(self) -> None:
        """Finish what is queued, then stop the writer thread."""
        self._inbox.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            batch: Batch = [item]  # type: ignore[list-item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)  # type: ignore[arg-type]
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: Batch) -> None:
        started = time.monotonic()
        try:
            self._backend.commit([m for group, _ in batch for m in group])
            outcome: list[QueueError | None] = [None] * len(batch)
        except QueueFull as exc:
            outcome = [exc] if len(batch) == 1 else [self._commit_one(group) for group, _ in batch]
        except QueueError as exc:
            outcome = [exc] * len(batch)
        if self._on_commit is not None:
            self._on_commit(len(batch), time.monotonic() - started)
        self._loop.call_soon_threadsafe(_resolve, batch, outcome)

    def _commit_one(self, group: tuple[NewMessage, ...]) -> QueueError | None:
        try:
            self._backend.commit(list(group))
        except QueueError as exc:
            return exc
        return None


def _resolve(batch: Batch, outcome: list[QueueError | None]) -> None:
    for (_, future), error in zip(batch, outcome):
        if future.done():  # the session went away while we were committing
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
