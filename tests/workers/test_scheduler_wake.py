"""The scheduler's timers and flush waits under uvloop: the wake-up timer (sub-millisecond delays
return a plain Handle), and an operator's flush under a steady stream of outcomes."""

import asyncio
import time

import uvloop

from workers.scheduler.main import Scheduler


def test_rearming_a_wake_that_is_due_now_does_not_crash() -> None:
    fired: list[float] = []

    async def main() -> None:
        s = object.__new__(Scheduler)
        s._wake, s._wake_at = None, 0.0
        s._on_wake = lambda: fired.append(time.time())  # type: ignore[method-assign]
        s._arm_wake(time.time())  # due now: uvloop returns a Handle without .when()
        s._arm_wake(time.time() + 5)  # later than the armed one: kept
        s._arm_wake(time.time() - 1)  # earlier: replaces it
        await __import__("asyncio").sleep(0.05)

    uvloop.run(main())
    assert len(fired) == 1


def test_an_operator_flush_waits_for_its_change_not_for_a_quiet_queue() -> None:
    # Under steady delivery, outcomes keep arriving; an operator's command must be answered
    # once its own change is written, not when the scheduler has nothing left to write.
    from tests.workers.test_scheduler_tally import config, new_scheduler

    async def main() -> tuple[float, int]:
        s = new_scheduler(config())
        stop = time.monotonic() + 3.0

        async def steady_outcomes() -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                s.writes.delete.add(f"{n:021X}")  # type: ignore[arg-type]  # unknown ids: skipped
                s.writes.schedule()
                await asyncio.sleep(0.001)

        load = asyncio.get_running_loop().create_task(steady_outcomes())
        await asyncio.sleep(0.1)
        s.writes.delete.add("OPERATOR-CHANGE-00000")  # type: ignore[arg-type]
        written_before = s.writes.written
        started = time.monotonic()
        await s.writes.flush_now()
        took = time.monotonic() - started
        await load
        await s.writes.flush_all()
        return took, s.writes.written - written_before

    took, rounds = uvloop.run(main())
    assert took < 1.0, f"the operator waited {took:.2f} s for a quiet queue"
    assert rounds >= 2
