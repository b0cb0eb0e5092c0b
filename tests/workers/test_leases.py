"""The scheduler's lease task (leases.py) against a real, private redis-server: how often a node
asks Redis while a destination waits for slots another node holds, and how soon it asks for
something new meanwhile."""

from __future__ import annotations

import asyncio
import time

import redis

from mta.sections import ClusterConfig
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (fixture)
from tests.workers.test_plan import job
from workers.scheduler.leases import LEASE_LUA, LEASE_SECONDS, POLL_SECONDS, Leases, lease_keys
from workers.scheduler.plan import Limits, Plan

WAIT_SECONDS = 1.0


def script_runs(server: RedisServer) -> int:
    with redis.Redis(port=server.port) as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_a_destination_refused_slots_asks_again_at_the_polls_pace_and_news_go_out_at_once(
        redis_server: RedisServer) -> None:
    plan = Plan()
    plan.shared_start = 0
    for n in range(10):
        plan.add(job(n, "full.test"), Limits(2, 2, 100, 0))
    with redis.Redis(port=redis_server.port) as other:  # another node holds both slots
        other.eval(LEASE_LUA, 2, *lease_keys("full.test"), "other", 2, 2, int(LEASE_SECONDS * 1000), 2)

    async def scenario() -> tuple[int, float]:
        leases = Leases(ClusterConfig(redis=redis_server.url, node="a"), plan.destinations.values,
                        lambda: None, lambda: (0, 100))
        task = asyncio.get_running_loop().create_task(leases.run_forever())
        await asyncio.sleep(0.3)  # asked once, refused: the destination waits
        before, until = script_runs(redis_server), time.monotonic() + WAIT_SECONDS
        while time.monotonic() < until:  # the dispatcher finds it short at every dispatch
            leases.want_more()
            await asyncio.sleep(0.002)
        asks = script_runs(redis_server) - before
        plan.add(job(99, "rate.test"), Limits(2, 2, 100, 50))  # meanwhile: a new destination's rate tokens
        rated = plan.destinations["rate.test"]
        rated.shared, rated.tokens, rated.wants_tokens = 1, 0.0, True
        asked = time.monotonic()
        leases.want_more()
        while not rated.tokens and time.monotonic() - asked < 1.0:
            await asyncio.sleep(0.001)
        took = time.monotonic() - asked
        task.cancel()
        await leases.release_all()
        return asks, took

    asks, took = asyncio.run(scenario())
    assert plan.destinations["full.test"].shared == 0
    assert asks <= WAIT_SECONDS / POLL_SECONDS + 2, f"{asks} lease requests in {WAIT_SECONDS} s while refused"
    assert took < POLL_SECONDS, f"new rate tokens were asked for only after {took:.3f} s"
