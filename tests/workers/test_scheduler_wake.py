"""The scheduler's wake-up timer under uvloop (sub-millisecond delays return a plain Handle)."""

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
