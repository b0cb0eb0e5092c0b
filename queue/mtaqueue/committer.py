"""Group commit: one writer thread per process turns concurrent commits into one fsync.

`await committer.commit(message)` queues the message; the messages waiting when a
round starts (up to MAX_BATCH callers) are stored in one transaction (one fsync), then
each caller's future is resolved on its event loop. `commit_all(messages)` is one
caller's group (a message and its mailing lists' copies): always in one transaction,
stored together or not at all. A round that fails with QueueFull is retried one group
at a time, so one large message cannot fail its neighbours; any other failure, a
defect included, answers the round's callers with QueueIOError and the writer goes on.
The fsync never runs on the event loop thread.

A round, in three steps (backend.PendingCommit): the writer thread begins the
transaction (LMDB's write lock is the thread's that takes it, and taking it may wait
for another process's commit), the event loop adds the messages waiting to it in one
callback, and the writer commits it. The puts run on the loop, which holds the GIL
anyway: written from the writer thread, each of them (about five a message) released
the GIL and, with the loop busy, handed it to the loop and back, a few futex calls
each; a round now hands it over a few times whatever its size. A round of more than
LOOP_FILL_BYTES of messages is filled by the writer instead (copying them would stall
the loop's sessions). The loop owns the waiting messages and whether a round is under
way (`_active`); the writer hands it turns (`_turns`: a round's outcome to resolve, a
transaction to fill, the end of its rounds) and the loop answers a fill through
`_filled`. The writer holds the write lock while it waits for the fill: should the loop
itself wait for that lock (a read that finds a damaged record moves it aside in a write
transaction of its own), the writer gives the round up after FILL_WAIT_SECONDS and the
loop asks for it again.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable

from mtaqueue.backend import PendingCommit, QueueBackend, QueueError, QueueFull, QueueIOError
from mtaqueue.records import NewMessage

MAX_BATCH = 512  # groups in one transaction; the rest wait for the next round
FILL_WAIT_SECONDS = 1.0  # a round whose fill the loop has not begun by then is given up
LOOP_FILL_BYTES = 1 << 20  # a round of more is filled by the writer thread
_ROUND = object()
_STOP = object()
_RESOLVE, _FILL, _END = range(3)  # the kinds of turn

Batch = list[tuple[tuple[NewMessage, ...], asyncio.Future[None]]]
Outcome = list[QueueError | None]
Turn = tuple["tuple[Batch, Outcome] | None", int, "PendingCommit | QueueError | None"]


class GroupCommitter:
    def __init__(self, backend: QueueBackend, loop: asyncio.AbstractEventLoop,
                 on_commit: Callable[[int, float], None] | None = None) -> None:
        self._backend = backend
        self._loop = loop
        self._on_commit = on_commit  # (messages, seconds), called in the writer thread
        self._waiting: Batch = []  # the loop's: the groups for the next round
        self._active = False  # the loop's: a round is under way or asked for (_ROUND sent)
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        # From the writer to the loop (appended and popped whole: atomic): a round's batch
        # and outcome to resolve (or None); the kind of turn; for _FILL, the transaction
        # to fill, or the error that kept it from beginning.
        self._turns: collections.deque[Turn] = collections.deque()
        self._filled = threading.Lock()  # released by the loop when the fill is done
        self._filled.acquire()
        self._asking = threading.Lock()  # guards _asked: a fill asked for, neither begun nor given up
        self._asked = False
        # The fill's answer: its batch, its error, and whether the writer is to fill it.
        self._taken: tuple[Batch, BaseException | None, bool] = ([], None, False)
        self._thread = threading.Thread(target=self._run, name="queue-writer", daemon=True)
        self._thread.start()

    async def commit(self, message: NewMessage) -> None:
        await self.commit_all((message,))

    async def commit_all(self, messages: tuple[NewMessage, ...]) -> None:
        """`messages` in one transaction: all are stored, or none (the error is raised)."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append((messages, future))
        if not self._active:
            self._active = True
            self._inbox.put(_ROUND)
        await future

    def close(self) -> None:
        """Store what is waiting, then stop the writer thread. Called on the loop's thread,
        which cannot run the writer's turns meanwhile: close takes them."""
        while (self._waiting or self._active) and self._thread.is_alive():
            if self._waiting and not self._active:
                self._active = True
                self._inbox.put(_ROUND)
            self._take_turn()
            self._thread.join(0.001)
        self._inbox.put(_STOP)
        while self._thread.is_alive():  # (a round asked for before, now empty, still takes a turn)
            self._take_turn()
            self._thread.join(0.001)
        while self._turns:
            self._take_turn()

    # --- the writer thread ----------------------------------------------------------

    def _run(self) -> None:
        while self._inbox.get() is _ROUND:
            if not self._rounds():
                return

    def _rounds(self) -> bool:
        """Rounds while messages wait; False when the loop is gone."""
        while True:
            started = time.monotonic()
            pending = self._begin()
            if not self._hand(None, _FILL, pending):
                return False
            if not self._filled.acquire(timeout=FILL_WAIT_SECONDS) and self._give_up(pending):
                return True
            batch, error, fill_here = self._taken
            if not batch:  # the loop had nothing waiting: it is idle again
                if not isinstance(pending, QueueError):
                    pending.abort()
                return True
            if fill_here:
                error = self._add(pending, batch)
            done = self._finish(pending, batch, error, started)
            more = bool(self._waiting)  # (a hint, read once: the loop decides at an _END turn)
            if not self._hand(done, _RESOLVE if more else _END, None):  # the replies go at once
                return False
            if not more:
                return True

    def _begin(self) -> PendingCommit | QueueError:
        try:
            return self._backend.begin_commit()
        except QueueError as exc:
            return exc
        except Exception as exc:  # a defect: the round's callers answer 451, the writer goes on
            return QueueIOError(f"the commit failed: {exc!r}")

    @staticmethod
    def _add(pending: PendingCommit | QueueError | None, batch: Batch) -> BaseException | None:
        """The batch added to the transaction (on the loop, or in the writer for a big one);
        the error it raised."""
        if pending is None or isinstance(pending, QueueError):
            return None  # (_finish answers with it)
        try:
            pending.add([m for group, _ in batch for m in group])
        except Exception as exc:
            return exc
        return None

    def _give_up(self, pending: PendingCommit | QueueError) -> bool:
        """The loop has not filled the round in FILL_WAIT_SECONDS: give the round up (and
        the write lock: the loop may be waiting for it, e.g. to move a damaged record
        aside, and would never fill), unless its fill has begun. True when given up: the
        loop asks for the round again when it takes the turn."""
        with self._asking:
            asked, self._asked = self._asked, False
        if asked:
            if not isinstance(pending, QueueError):
                pending.abort()
            return True
        self._filled.acquire()  # being filled: the loop is not waiting for us
        return False

    def _hand(self, done: tuple[Batch, Outcome] | None, kind: int,
              pending: PendingCommit | QueueError | None) -> bool:
        """Give the loop a turn; False when the loop is gone (nobody waits any more)."""
        if kind == _FILL:
            with self._asking:
                self._asked = True
        turn = (done, kind, pending)
        self._turns.append(turn)
        try:
            self._loop.call_soon_threadsafe(self._take_turn)
        except RuntimeError:  # the loop is closed
            with self._asking:
                self._asked = False
            try:
                self._turns.remove(turn)
            except ValueError:
                pass
            if pending is not None and not isinstance(pending, QueueError):
                pending.abort()
            return False
        return True

    def _finish(self, pending: PendingCommit | QueueError, batch: Batch,
                error: BaseException | None, started: float) -> tuple[Batch, Outcome]:
        """Commit (or abort) the filled transaction; the batch's outcome, one per group."""
        if isinstance(pending, QueueError):
            error = pending
        elif error is None:
            try:
                pending.commit()
            except Exception as exc:
                error = exc
        else:
            pending.abort()
        outcome: Outcome
        if error is None:
            outcome = [None] * len(batch)
        elif isinstance(error, QueueFull) and len(batch) > 1:
            outcome = [self._commit_one(group) for group, _ in batch]
        else:
            outcome = [_queue_error(error)] * len(batch)
        if self._on_commit is not None:
            try:
                self._on_commit(len(batch), time.monotonic() - started)
            except Exception:  # (a metric: never worth the writer thread)
                pass
        return batch, outcome

    def _commit_one(self, group: tuple[NewMessage, ...]) -> QueueError | None:
        try:
            self._backend.commit(list(group))
        except Exception as exc:
            return _queue_error(exc)
        return None

    # --- the loop's side --------------------------------------------------------------

    def _take_turn(self) -> None:
        try:
            done, kind, pending = self._turns.popleft()
        except IndexError:  # (taken by close already)
            return
        if done is not None:
            _resolve(*done)
        if kind == _FILL:
            with self._asking:
                asked, self._asked = self._asked, False
            if asked:
                self._fill(pending)
                return
            kind = _END  # the writer gave the round up: ask for it again if messages wait
        if kind == _END:
            if self._waiting:
                self._inbox.put(_ROUND)
            else:
                self._active = False

    def _fill(self, pending: PendingCommit | QueueError | None) -> None:
        batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        error: BaseException | None = QueueIOError("the commit failed: its fill was interrupted")
        fill_here = False
        try:
            if not batch:
                self._active, error = False, None
            elif sum(len(m.body) for group, _ in batch for m in group) > LOOP_FILL_BYTES:
                fill_here, error = True, None  # the writer copies them
            else:
                error = self._add(pending, batch)  # (answered to the callers by _finish, in the writer)
        finally:  # whatever happened, the writer hears of it (it holds the write lock)
            self._taken = batch, error, fill_here
            self._filled.release()


def _queue_error(error: BaseException) -> QueueError:
    """What a caller is told: a queue error as it is, anything else (a defect) as QueueIOError."""
    return error if isinstance(error, QueueError) else QueueIOError(f"the commit failed: {error!r}")


def _resolve(batch: Batch, outcome: Outcome) -> None:
    for (_, future), error in zip(batch, outcome):
        if future.done():  # the session went away while we were committing
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
