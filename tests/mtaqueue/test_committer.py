"""GroupCommitter over a real LMDB spool: a caller's group of messages is one unit."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from mtaqueue import Envelope, NewMessage, QueueFull, Recipient, new_id
from mtaqueue.backend import QueueIOError
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.committer import FILL_WAIT_SECONDS, MAX_BATCH, GroupCommitter

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

    runner = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    runner.start()
    runner.join(30)
    try:
        assert not runner.is_alive(), "close() never returned"
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

    class Signalling(LmdbBackend):
        begun = threading.Event()

        def begin_commit(self):  # type: ignore[no-untyped-def]
            pending = super().begin_commit()
            self.begun.set()
            return pending

    backend = Signalling(str(tmp_path / "q"), MIB)
    first, later = message(100), message(100)
    backend.commit([first])
    done: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        committer = GroupCommitter(backend, loop)
        task = loop.create_task(committer.commit(later))
        await asyncio.sleep(0)  # the round is asked for
        assert backend.begun.wait(10)  # the writer has the write lock and waits for this loop
        started = time.monotonic()
        backend.delete([first.envelope.id])  # this loop's own write transaction
        done.append(time.monotonic() - started)
        await task
        committer.close()

    runner = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    runner.start()
    runner.join(30)
    try:
        assert not runner.is_alive(), "deadlocked: the loop and the writer wait for each other"
        assert done and done[0] >= FILL_WAIT_SECONDS * 0.9  # it waited for the round to be given up
        assert [e.id for e in backend.envelopes()] == [later.envelope.id]
    finally:
        backend.close()
