"""redisclient.Scripts against a real, private redis-server: concurrent calls each get their own
answer, a Redis that forgot the script (restart, SCRIPT FLUSH) or closed the idle connections
(restart) still answers, and a call that timed out never leaves its late reply to the next one."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import RedisError

from mta import redisclient
from mta.sections import ClusterConfig
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (fixture)

ECHO = "return {ARGV[1], redis.call('INCR', KEYS[1])}"
# Busy for ARGV[1] ms inside Redis (a script cannot sleep), then answers ARGV[2].
SLOW = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 - start >= tonumber(ARGV[1])
return ARGV[2]
"""


def run(redis_server: RedisServer, scenario, timeout_seconds: float = 0.5):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        client = redisclient.client(ClusterConfig(redis=redis_server.url), timeout_seconds, no_retry=True)
        scripts = redisclient.Scripts(client, timeout_seconds)
        try:
            return await scenario(scripts)
        finally:
            await scripts.close()
            await client.aclose()
    return asyncio.run(main())


def test_concurrent_calls_each_get_their_own_answer_and_a_flushed_script_is_sent_again(
        redis_server: RedisServer) -> None:
    async def scenario(scripts: redisclient.Scripts) -> tuple[list[bytes], list[bytes], int]:
        echo = scripts.script(ECHO)
        first = await asyncio.gather(*(echo(["n"], [f"call{i}"]) for i in range(40)))
        redis_server.cli("SCRIPT", "FLUSH")  # as after a Redis restart
        again = await asyncio.gather(*(echo(["n"], [f"again{i}"]) for i in range(5)))
        return [a[0] for a in first], [a[0] for a in again], max(a[1] for a in again)

    first, again, count = run(redis_server, scenario)
    assert first == [f"call{i}".encode() for i in range(40)]
    assert again == [f"again{i}".encode() for i in range(5)] and count == 45


def test_a_call_that_timed_out_leaves_no_late_reply_for_the_next(redis_server: RedisServer) -> None:
    async def scenario(scripts: redisclient.Scripts) -> tuple[bytes, bytes]:
        slow = scripts.script(SLOW)
        assert await slow([], [0, "warm"]) == b"warm"  # the script is loaded, one connection idle
        with pytest.raises(TimeoutError):
            await slow([], [400, "late"])
        await asyncio.sleep(0.5)  # the late reply has arrived on that connection by now
        return await slow([], [0, "next"]), await slow([], [0, "after"])

    assert run(redis_server, scenario, timeout_seconds=0.2) == (b"next", b"after")


def test_a_restart_between_calls_goes_unnoticed_a_stopped_redis_is_an_error(redis_server: RedisServer) -> None:
    async def scenario(scripts: redisclient.Scripts) -> list[object]:
        echo = scripts.script(ECHO)
        seen: list[object] = [(await echo(["n"], ["up"]))[0]]
        redis_server.stop()
        redis_server.start()  # the idle connection is closed, and Redis forgot the script
        seen.append((await echo(["n"], ["restarted"]))[0])
        redis_server.stop()
        with pytest.raises((RedisError, OSError)):
            await echo(["n"], ["down"])
        redis_server.start()
        seen.append((await echo(["n"], ["back"]))[0])
        return seen

    assert run(redis_server, scenario) == [b"up", b"restarted", b"back"]
