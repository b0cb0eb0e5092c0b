"""Delivery sessions in the scheduler: parked ones are reused before opening, one job at a time,
a shrunk window closes the excess, expiry QUITs them. Real Scheduler, in-memory spool,
the messages it writes to a fake delivery worker decoded and checked. Busy ones are sent
jobs ahead while the window is full."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Iterable
from typing import Any

import uvloop

from mta import messages
from mta.messages import Message
from tests.workers.test_scheduler_tally import Driver, config, new_scheduler
from workers.scheduler.dispatch import LOOKAHEAD


def sent(driver: Driver) -> list[Message]:
    """Every message the scheduler wrote to the (one) worker so far, in order."""
    data = b"".join(driver.s.workers[0].writer.frames)  # type: ignore[attr-defined]
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append(messages.decode(data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


def kinds(driver: Driver) -> list[str]:
    return [type(m).__name__ for m in sent(driver)]


def done(driver: Driver, session: Any, job_id: int, rcpts: Iterable[int], failed: bool = False) -> None:
    driver.s._on_done(messages.Done(session.sid, job_id, tuple(
        (i, 451 if failed else 250, "4.4.1" if failed else "2.0.0", "x") for i in rcpts), failed=failed))


def answer(driver: Driver, failed: bool = False) -> None:
    """Every session carrying a job reports it done (250, or a failed session)."""
    for session in driver.carried_sessions():
        done(driver, session, session.job.id, session.job.rcpts, failed)


def test_parked_sessions_are_reused_shrunk_and_expired() -> None:
    async def main() -> None:
        s = new_scheduler(config(concurrency=3, initial_concurrency=3, max_messages_per_connection=100,
                                 connection_idle_seconds=0.3, min_backoff_seconds=60, max_backoff_seconds=60))
        driver = Driver(s, random.Random(1))
        s.workers[0].capacity = 10
        s._on_new([driver.commit([f"u{n}@one.test"]) for n in range(3)])
        s._dispatch()
        await asyncio.sleep(0)
        assert kinds(driver) == ["Open"] * 3
        answer(driver)  # the queue is empty: all three park, none QUITs
        await asyncio.sleep(0)
        assert sum(len(p) for p in s.parked.values()) == 3 and len(s.sessions) == 3
        assert "Close" not in kinds(driver)

        s._on_new([driver.commit(["late@one.test"])])  # rides a parked session, opens nothing
        s._dispatch()
        await asyncio.sleep(0)
        frames = sent(driver)
        assert kinds(driver).count("Open") == 3 and isinstance(frames[-1], messages.Job)
        busy = frames[-1].sid
        assert busy not in {sid for p in s.parked.values() for sid in p}  # one job at a time
        s.check_tally()

        answer(driver, failed=True)  # window 3 -> 1: the failed one closes, and enough parked ones
        s._dispatch()
        await asyncio.sleep(0)
        closes = [f.sid for f in sent(driver) if isinstance(f, messages.Close)]
        assert busy in closes and len(closes) == 2  # 3 open - 1 allowed = 2 closing
        for session in [x for x in s.sessions.values() if x.closing]:
            s._on_closed(session.worker, session.sid, True)
        assert len(s.sessions) == 1 and s.plan.destinations["one.test"].in_flight == 1

        expiry = asyncio.get_running_loop().create_task(s._expire_parked_forever())
        await asyncio.sleep(0.6)  # past connection_idle_seconds: the last one QUITs too
        assert not expiry.done(), expiry.exception()
        expiry.cancel()
        last = [f for f in sent(driver) if isinstance(f, messages.Close)]
        assert len(last) == 3 and s.parked == {}
        s.check_tally()
        if s._wake is not None:
            s._wake.cancel()
        await s.writes.flush_all()

    uvloop.run(main())


def test_a_full_window_sends_the_next_job_ahead() -> None:
    """With the window full and more ready, a session holds its next jobs too (the worker
    pipelines them); while the window has room, ready jobs open sessions instead; a failed
    session's jobs sent ahead are ready again when the session closes."""
    async def main() -> None:
        s = new_scheduler(config(concurrency=2, initial_concurrency=2, max_messages_per_connection=100,
                                 connection_idle_seconds=5, min_backoff_seconds=60, max_backoff_seconds=60))
        driver = Driver(s, random.Random(2))
        s.workers[0].capacity = 10
        s._on_new([driver.commit(["first@one.test"])])
        s._dispatch()
        await asyncio.sleep(0)
        s._on_new([driver.commit(["second@one.test"])])  # the window has room: a second session
        s._dispatch()
        await asyncio.sleep(0)
        assert kinds(driver) == ["Open", "Open"]
        s._on_new([driver.commit([f"u{n}@one.test"]) for n in range(5)])
        s._dispatch()
        await asyncio.sleep(0)
        assert kinds(driver) == ["Open", "Open"]  # both busy, the window is full

        a, b = sorted(s.sessions.values(), key=lambda x: x.sid)
        done(driver, a, a.job.id, [0])  # a takes its next job and two ahead
        await asyncio.sleep(0)
        assert kinds(driver)[2:] == ["Job"] * LOOKAHEAD and len(a.jobs) == LOOKAHEAD == 3
        s.check_tally()
        active = s._query(messages.ActiveQuery())
        assert isinstance(active, messages.ActiveJobs) and sorted(sum(active.active.values(), ())) == [0, 0, 0, 0]

        ahead = a.jobs[-1]
        done(driver, a, a.job.id, [0], failed=True)  # a's connection failed: nothing more for it
        await asyncio.sleep(0)
        assert a.closing and a.jobs[-1] == ahead and len(a.jobs) == 2 and kinds(driver)[-1] == "Close"
        ready_before = s.plan.ready_jobs()
        s._on_closed(a.worker, a.sid, False)  # the jobs sent ahead did not run: ready again
        assert s.plan.ready_jobs() == ready_before + 2 and ahead.msgid not in s.carried
        s.check_tally()

        for _ in range(10):  # b drains the rest, holding LOOKAHEAD at most, then parks
            if not b.jobs:
                break
            done(driver, b, b.job.id, list(b.job.rcpts))
            s._dispatch()
            await asyncio.sleep(0)
            assert len(b.jobs) <= LOOKAHEAD
            s.check_tally()
        assert s.plan.ready_jobs() == 0 and not b.jobs and b.idle_since > 0
        if s._wake is not None:
            s._wake.cancel()
        await s.writes.flush_all()

    uvloop.run(main())


def test_a_job_sent_ahead_then_held_is_skipped_not_deferred() -> None:
    """The worker skips recipients an operator held after their job was sent ahead: they
    stay held (no attempt counted, no retry time); released meanwhile, they are ready again."""
    async def main() -> None:
        s = new_scheduler(config(concurrency=1, initial_concurrency=1, max_messages_per_connection=100,
                                 connection_idle_seconds=5, min_backoff_seconds=60, max_backoff_seconds=60))
        driver = Driver(s, random.Random(3))
        ids = [driver.commit([f"u{n}@one.test"]) for n in range(4)]
        s._on_new(ids)
        s._dispatch()
        await asyncio.sleep(0)
        [session] = s.sessions.values()
        done(driver, session, session.job.id, [0])  # the window (1) is full: jobs go ahead
        assert len(session.jobs) == LOOKAHEAD
        held, released = session.jobs[1], session.jobs[2]
        await s._command(messages.QueueCommand("hold", (held.msgid, released.msgid)))
        await s._command(messages.QueueCommand("release", (released.msgid,)))
        for job in (held, released):
            s._on_done(messages.Done(session.sid, job.id, (), skipped=(0,)))
        await s.writes.flush_all()
        assert held.msgid not in s.messages  # held: in the spool only, not in the active set
        stored = s.backend.envelope(held.msgid)
        assert stored is not None and (stored.recipients[0].state, stored.recipients[0].attempts) == ("held", 0)
        assert s.messages[released.msgid].recipients[0].state == "ready"
        assert released.msgid in s.busy  # queued again (or given to the session again)
        assert held.msgid not in s.busy
        s.check_tally()
        if s._wake is not None:
            s._wake.cancel()
        await s.writes.flush_all()

    uvloop.run(main())
