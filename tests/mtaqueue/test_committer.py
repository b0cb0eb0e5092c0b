"""GroupCommitter over a real LMDB spool: a caller's group of messages is one unit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from mtaqueue import Envelope, NewMessage, QueueFull, Recipient, new_id
from mtaqueue.backend import QueueIOError
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.committer import FILL_WAIT_SECONDS, LOOP_FILL_BYTES, MAX_BATCH, GroupCommitter

MIB = 1024 * 1024


def message(size: int) -> NewMessage:
    body = b"Subject: x\r\n\r\n" + b"x" * size
    envelope = Envelope(id=new_id(), sender="a@example.org", recipients=[Recipient("b@local.test")],
                        size=len(body), arrival=1000.0, next_attempt=1000.0)
    return NewMessage(envelope, body)


def test_a_group_is_stored_whole_or_not_at_all_and_never_fails_its_neighbours(tmp_path: Path) -> None:
    backend = LmdbBackend(str(tmp_path / "q"), MIB)

    async def run() -> list[BaseException | None]:
        committer = GroupCommitter(backend, asyncio.get_running_loop())
        try:
            # One batch: a small message, a group whose second message does not fit, another small one.
            return await asyncio.gather(committer.commit(small[0]), committer.commit_all(group),
                                        committer.commit(small[1]), return_exceptions=True)
        finally:
            committer.close()

    small = [message(100), message(100)]
    group = (message(100), message(2 * MIB))
    try:
        results = asyncio.run(run())
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], QueueFull)
        stored = {e.id for e in backend.envelopes()}
        assert stored == {small[0].envelope.id, small[1].envelope.id}  # not the group's first either
        ok = (message(100), message(100))

        async def again() -> None:
            committer = GroupCommitter(backend, asyncio.get_running_loop())
            try:
                await committer.commit_all(ok)
            finally:
                committer.close()

        asyncio.run(again())
        assert {m.envelope.id for m in ok} <= {e.id for e in backend.envelopes()}
    finally:
        backend.close()


def commit_together(backend: LmdbBackend, messages: list[NewMessage]) -> list[int]:
    """Each message committed by a caller of its own, all at once; the rounds' sizes."""
    rounds: list[int] = []

    async def run() -> None:
        committer = GroupCommitter(backend, asyncio.get_running_loop(), on_commit=lambda n, _s: rounds.append(n))
        try:
            await asyncio.gather(*(committer.commit(m) for m in messages))
        finally:
            committer.close()

    asyncio.run(run())
    return rounds


class Signalling(LmdbBackend):
    """The real backend, telling when the writer has begun a round (holds the write lock);
    `hold_second`: the second round's begin waits that long first (as it would for the
    write lock another process holds)."""

    def __init__(self, path: str, size: int, hold_second: float = 0.0) -> None:
        super().__init__(path, size)
        self.begun = threading.Event()
        self.rounds = 0
        self.hold_second = hold_second

    def begin_commit(self):  # type: ignore[no-untyped-def]
        self.rounds += 1
        if self.rounds == 2:
            time.sleep(self.hold_second)
        pending = super().begin_commit()
        self.begun.set()
        return pending


async def commit_begun(backend: Signalling, message: NewMessage) -> tuple[GroupCommitter, asyncio.Task[None]]:
    """A committer, and a commit of `message` whose round the writer has begun: it holds the
    write lock and waits for this loop (blocked here until then) to fill it."""
    loop = asyncio.get_running_loop()
    committer = GroupCommitter(backend, loop)
    task = loop.create_task(committer.commit(message))
    await asyncio.sleep(0)  # the round is asked for
    assert backend.begun.wait(10)
    return committer, task


def run_within(seconds: float, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run(main()) in a thread of its own; fails when it has not returned in time."""
    runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    runner.start()
    runner.join(seconds)
    assert not runner.is_alive(), f"not done within {seconds} s: the loop and the writer wait for each other"


def test_messages_waiting_together_share_one_transaction(tmp_path: Path) -> None:
    backend = LmdbBackend(str(tmp_path / "q"), MIB)
    messages = [message(100) for _ in range(30)]
    try:
        rounds = commit_together(backend, messages)
        assert {e.id for e in backend.envelopes()} == {m.envelope.id for m in messages}
        assert sum(rounds) == 30 and len(rounds) <= 2, rounds  # one fsync for all (two at most)
    finally:
        backend.close()


def test_a_round_takes_at_most_max_batch_callers_and_the_rest_go_in_the_next(tmp_path: Path) -> None:
    backend = LmdbBackend(str(tmp_path / "q"), 8 * MIB)
    messages = [message(10) for _ in range(MAX_BATCH + 40)]
    try:
        rounds = commit_together(backend, messages)
        assert backend.stats().messages == len(messages)
        assert sum(rounds) == len(messages) and len(rounds) >= 2 and max(rounds) <= MAX_BATCH, rounds
    finally:
        backend.close()


def test_close_on_the_loop_finishes_the_messages_waiting(tmp_path: Path) -> None:
    """close() runs on the loop's thread, which then cannot take the writer's turns (the
    round's fill): close takes them itself, stores what waits, and returns."""
    backend = LmdbBackend(str(tmp_path / "q"), MIB)
    messages = [message(100) for _ in range(5)]
    results: list[object] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        committer = GroupCommitter(backend, loop)
        tasks = [loop.create_task(committer.commit(m)) for m in messages]
        await asyncio.sleep(0)  # each message waits, the round is asked for
        committer.close()  # blocks the loop until the writer has stopped
        results.extend(await asyncio.gather(*tasks, return_exceptions=True))

    try:
        run_within(30, run)
        assert results == [None] * 5
        assert {e.id for e in backend.envelopes()} == {m.envelope.id for m in messages}
    finally:
        backend.close()


def test_a_message_that_cannot_be_written_fails_its_round_and_the_writer_goes_on(tmp_path: Path) -> None:
    backend = LmdbBackend(str(tmp_path / "q"), MIB)
    broken = message(100)
    broken.envelope.client = {"ip": object()}  # does not encode: a defect, not a full queue
    later = message(100)

    async def run() -> tuple[BaseException | None, None]:
        committer = GroupCommitter(backend, asyncio.get_running_loop())
        try:
            (error,) = await asyncio.gather(committer.commit(broken), return_exceptions=True)
            await committer.commit(later)
            return error, None
        finally:
            committer.close()

    try:
        error, _ = asyncio.run(run())
        assert isinstance(error, QueueIOError) and "the commit failed" in str(error)  # 451, not a hang
        assert [e.id for e in backend.envelopes()] == [later.envelope.id]
    finally:
        backend.close()


def test_a_loop_waiting_for_the_write_lock_gets_it_and_the_round_is_stored_after(tmp_path: Path) -> None:
    """The writer holds the write lock while it waits for the loop's fill; should the loop
    need the lock itself (moving a damaged record aside writes), the writer gives the round
    up after FILL_WAIT_SECONDS, and stores it in the next: no deadlock."""
    backend = Signalling(str(tmp_path / "q"), MIB)
    first, later = message(100), message(100)
    backend.commit([first])
    done: list[float] = []

    async def run() -> None:
        committer, task = await commit_begun(backend, later)
        started = time.monotonic()
        backend.delete([first.envelope.id])  # this loop's own write transaction
        done.append(time.monotonic() - started)
        await task
        committer.close()

    try:
        run_within(30, run)
        assert done and done[0] >= FILL_WAIT_SECONDS * 0.9  # it waited for the round to be given up
        assert [e.id for e in backend.envelopes()] == [later.envelope.id]
    finally:
        backend.close()


def test_close_in_the_turn_after_a_round_was_given_up_stores_what_waits(tmp_path: Path) -> None:
    backend = Signalling(str(tmp_path / "q"), MIB)
    waiting = message(100)
    resolved: list[bool] = []

    async def run() -> None:
        committer, task = await commit_begun(backend, waiting)
        time.sleep(FILL_WAIT_SECONDS + 0.3)  # a loop this busy: the writer gives the round up
        committer.close()  # in the same busy stretch: the round is asked for again, and stored
        done, _ = await asyncio.wait([task], timeout=5)
        resolved.append(bool(done) and task.exception() is None)

    try:
        run_within(30, run)
        assert resolved == [True]
        assert [e.id for e in backend.envelopes()] == [waiting.envelope.id]
    finally:
        backend.close()


def test_a_full_queue_and_a_broken_message_in_one_round_are_each_answered(tmp_path: Path) -> None:
    """The round fails with QueueFull, so each group is tried alone: the big one is refused
    as full (452), the broken one as a failure (451), and the writer goes on."""
    backend = LmdbBackend(str(tmp_path / "q"), MIB)
    big, broken, later = message(2 * MIB), message(100), message(100)
    broken.envelope.client = {"ip": object()}

    async def run() -> list[BaseException | None]:
        committer = GroupCommitter(backend, asyncio.get_running_loop())
        try:
            errors = await asyncio.gather(committer.commit(big), committer.commit(broken), return_exceptions=True)
            await committer.commit(later)
            return errors
        finally:
            committer.close()

    errors: list[BaseException | None] = []

    async def main() -> None:
        errors.extend(await run())

    try:
        run_within(30, main)  # (a writer thread that died would leave `later` waiting forever)
        full, failed = errors
        assert isinstance(full, QueueFull)
        assert isinstance(failed, QueueIOError) and "the commit failed" in str(failed)
        assert [e.id for e in backend.envelopes()] == [later.envelope.id]
    finally:
        backend.close()


def test_a_committed_round_is_answered_without_waiting_for_the_next_rounds_write_lock(tmp_path: Path) -> None:
    backend = Signalling(str(tmp_path / "q"), MIB, hold_second=1.0)
    answered: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        committer = GroupCommitter(backend, loop, on_commit=lambda _n, _s: time.sleep(0.1))
        started = time.monotonic()
        first = loop.create_task(committer.commit(message(100)))
        await asyncio.sleep(0.05)  # the first round is committing: the second waits behind it
        second = loop.create_task(committer.commit(message(100)))
        await first
        answered.append(time.monotonic() - started)
        await second
        committer.close()

    try:
        run_within(30, run)
        assert answered and answered[0] < 0.8, answered  # not held for the second round's lock (1 s)
        assert backend.stats().messages == 2
    finally:
        backend.close()


class AddsRecorded(LmdbBackend):
    """The real backend, noting which thread adds each round's messages to its transaction."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__(path, size)
        self.adders: list[int] = []

    def begin_commit(self):  # type: ignore[no-untyped-def]
        backend, pending = self, super().begin_commit()

        class Noted:
            commit, abort = pending.commit, pending.abort

            def add(self, messages: list[NewMessage]) -> None:
                backend.adders.append(threading.get_ident())
                pending.add(messages)

        return Noted()


def test_a_round_is_filled_on_the_loop_and_a_big_one_by_the_writer(tmp_path: Path) -> None:
    """The puts of a round run on the event loop (from the writer thread, py-lmdb's GIL
    release around each one handed the GIL to the busy loop and back: the futex calls of
    issue 21); more than LOOP_FILL_BYTES of messages in a round, the writer copies them
    (it would stall the loop's sessions) and they are stored all the same."""
    backend = AddsRecorded(str(tmp_path / "q"), 8 * MIB)
    small = [message(100) for _ in range(5)]
    big = [message(LOOP_FILL_BYTES // 2 + 1) for _ in range(3)]
    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    try:
        assert sum(commit_together(backend, small)) == 5
        assert backend.adders == [loop_thread]
        assert sum(commit_together(backend, big)) == 3
        assert len(backend.adders) == 2 and backend.adders[1] != loop_thread
        assert {backend.body(m.envelope.id) for m in small + big} == {m.body for m in small + big}
    finally:
        backend.close()
