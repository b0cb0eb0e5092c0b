"""SharedLimits against a real, private redis-server: two "nodes" (each its own LMDB cache and
RateLimiter) share the windows and AUTH failures; Redis stopped -> local or tempfail; back -> shared."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from mtaqueue.cache_lmdb import LmdbCache
from prometheus_client import REGISTRY

from mta import logs
from mta.config import AuthConfig, ClusterConfig, Config, RateConfig
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (fixture)
from workers.inbound.ratelimit import LOCKED_OUT, RateLimiter
from workers.inbound.sharedlimits import (
    AUTH_TEMPFAIL,
    CLUSTER_TEMPFAIL,
    PROBE_SECONDS,
    SharedLimits,
)

IP = "192.0.2.7"
OTHER, THIRD = "192.0.2.8", "192.0.2.9"


def make_config(url: str, on_redis_down: str = "local", auth: AuthConfig | None = None, **rate: Any) -> Config:
    return Config(rate=RateConfig(**rate), auth=auth or AuthConfig(),
                  cluster=ClusterConfig(redis=url, on_redis_down=on_redis_down))


@pytest.fixture
def caches(tmp_path: Path) -> Iterator[list[LmdbCache]]:
    made = [LmdbCache(str(tmp_path / f"cache{n}")) for n in (1, 2)]
    yield made
    for cache in made:
        cache.close()


def nodes(config: Config, caches: list[LmdbCache]) -> list[SharedLimits]:
    """Two nodes' shared limits: each falls back on its own LMDB cache."""
    return [SharedLimits(config, RateLimiter(config, cache)) for cache in caches]


def decided(limit: str, result: str) -> float:
    return REGISTRY.get_sample_value("mta_cluster_shared_decisions_total", {"limit": limit, "result": result}) or 0.0


def redis_up() -> float | None:
    return REGISTRY.get_sample_value("mta_cluster_redis_up", {"side": "inbound"})


def round_trips(server: RedisServer) -> int:
    """Scripts the server was asked to run or load (INFO commandstats; a script's own commands
    and the connections' HELLO are not round trips of ours)."""
    with redis.Redis(port=server.port) as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load"))


def reply_of(decision: Any) -> str | None:
    return None if decision is None else str(decision.reply)[:9]


def test_two_nodes_share_each_window_and_a_refusal_costs_nothing(redis_server: RedisServer,
                                                                 caches: list[LmdbCache]) -> None:
    config = make_config(redis_server.url, messages_per_window=3, user_messages_per_window=1,
                         recipients_per_window=2)

    async def scenario() -> dict[str, Any]:
        a, b = nodes(config, caches)
        out = {
            "msgs": [reply_of(await node.message(IP, None, False)) for node in (a, b, a, b)],
            "other_ip": reply_of(await a.message("192.0.2.8", None, False)),
            "trusted": reply_of(await b.message(IP, None, True)),  # mynetworks: exempt
            # The user's window refuses the second; the address's count taken with it is given back.
            "user": [reply_of(await node.message("192.0.2.9", "alice", False)) for node in (a, b)],
            "same_ip_other_user": [reply_of(await b.message("192.0.2.9", None, False)) for _ in range(3)],
            "rcpts": [reply_of(await node.recipient(IP, None, False)) for node in (b, a, b)],
        }
        for node in (a, b):
            await node.close()
        return out

    refused = decided("message_rate", "refused")
    out = asyncio.run(scenario())
    assert out["msgs"] == [None, None, None, "450 4.7.1"], out
    assert out["other_ip"] is None and out["trusted"] is None, out
    assert out["user"] == [None, "450 4.7.1"], out
    assert out["same_ip_other_user"] == [None, None, "450 4.7.1"], out  # 3 per address: alice's 1 + 2
    assert out["rcpts"] == [None, None, "450 4.7.1"], out
    assert decided("message_rate", "refused") == refused + 3


def test_two_nodes_share_the_connection_window(redis_server: RedisServer, caches: list[LmdbCache]) -> None:
    config = make_config(redis_server.url, connections_per_window=2)

    async def scenario() -> list[str | None]:
        a, b = nodes(config, caches)
        out = [reply_of(await node.connection(IP, False)) for node in (a, b, b)]
        out.append(reply_of(await a.connection(IP, True)))  # mynetworks: exempt
        for node in (a, b):
            await node.close()
        return out

    assert asyncio.run(scenario()) == [None, None, "421 4.7.0", None]


def test_round_trips_one_per_counted_command_none_when_exempt_or_known_full(
        redis_server: RedisServer, caches: list[LmdbCache]) -> None:
    config = make_config(redis_server.url, messages_per_window=2)

    async def scenario() -> list[int]:
        (a, _b), before = nodes(config, caches), round_trips(redis_server)
        counts = []
        await a.message(IP, None, True)  # exempt: no window applies
        await a.recipient(IP, None, False)  # recipients_per_window = 0: none either
        counts.append(round_trips(redis_server) - before)
        for _ in range(3):  # two allowed, the third refused by Redis
            await a.message(IP, None, False)
        counts.append(round_trips(redis_server) - before)
        for _ in range(5):  # the window is known full until its key expires: no round trip
            assert (await a.message(IP, None, False)) is not None
        counts.append(round_trips(redis_server) - before)
        await a.close()
        return counts

    # One EVALSHA per counted MAIL; the first also met NOSCRIPT: EVAL, with the script.
    assert asyncio.run(scenario()) == [0, 3 + 1, 3 + 1]


def test_a_window_ends_with_its_key(redis_server: RedisServer, caches: list[LmdbCache]) -> None:
    config = make_config(redis_server.url, window_seconds=0.5, messages_per_window=1)

    async def scenario() -> list[str | None]:
        a, b = nodes(config, caches)
        out = [reply_of(await a.message(IP, None, False)), reply_of(await b.message(IP, None, False))]
        await asyncio.sleep(0.6)
        out += [reply_of(await b.message(IP, None, False)), reply_of(await a.message(IP, None, False))]
        for node in (a, b):
            await node.close()
        return out

    assert asyncio.run(scenario()) == [None, "450 4.7.1", None, "450 4.7.1"]


def test_auth_failures_on_two_nodes_lock_the_address_out_on_both(redis_server: RedisServer,
                                                                caches: list[LmdbCache]) -> None:
    config = make_config(redis_server.url, auth=AuthConfig(max_failures=4, lockout_seconds=60))

    async def scenario() -> dict[str, Any]:
        a, b = nodes(config, caches)
        before = [await node.auth_admit(IP) for node in (a, b)]
        failures = [await node.auth_failed(IP) for node in (a, b, a, b)]
        after = [await node.auth_admit(IP) for node in (a, b)]
        other = await b.auth_admit("192.0.2.8")
        for node in (a, b):
            await node.close()
        return {"before": before, "failures": failures, "after": after, "other": other}

    out = asyncio.run(scenario())
    assert out["before"] == [None, None] and out["other"] is None, out
    assert out["failures"] == [1, 2, 3, 4], out
    assert [d.reply for d in out["after"]] == [LOCKED_OUT, LOCKED_OUT], out


def test_redis_down_local_falls_back_on_each_nodes_own_limits_then_shared_again(
        redis_server: RedisServer, caches: list[LmdbCache], monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(redis_server.url, messages_per_window=2)
    log = io.StringIO()
    monkeypatch.setattr(logs, "_stream", log)

    async def scenario() -> dict[str, Any]:
        a, b = nodes(config, caches)
        watchers = [asyncio.get_running_loop().create_task(node.watch()) for node in (a, b)]
        out: dict[str, Any] = {"shared": [reply_of(await node.message(IP, None, False)) for node in (a, b, a)]}
        redis_server.stop()
        # Each node now enforces the window alone, in its own LMDB cache: 2 per node; a window
        # the cluster filled stays refused where that is known (IP: until its key would expire).
        out["local"] = [reply_of(await node.message(OTHER, None, False)) for node in (a, a, a, b, b, b)]
        out["known_full"] = reply_of(await a.message(IP, None, False))
        out["up_while_down"] = redis_up()
        redis_server.start()  # empty: no persistence
        await asyncio.sleep(PROBE_SECONDS + 0.5)
        out["up_again"] = redis_up()
        out["again"] = [reply_of(await node.message(THIRD, None, False)) for node in (a, b, a)]
        for task in watchers:
            task.cancel()
        for node in (a, b):
            await node.close()
        return out

    local = decided("message_rate", "local")
    out = asyncio.run(scenario())
    assert out["shared"] == [None, None, "450 4.7.1"], out
    assert out["local"] == [None, None, "450 4.7.1"] * 2 and out["known_full"] == "450 4.7.1", out
    assert decided("message_rate", "local") == local + 6
    assert out["up_while_down"] == 0 and out["up_again"] == 1, out
    assert out["again"] == [None, None, "450 4.7.1"], out
    text = log.getvalue()
    assert text.count("event=cluster_redis_down") == 2, text  # once per outage per node
    assert text.count("event=cluster_redis_up") == 2, text


def test_redis_down_tempfail_answers_4xx_for_what_needs_redis(redis_server: RedisServer,
                                                             caches: list[LmdbCache]) -> None:
    config = make_config(redis_server.url, "tempfail", messages_per_window=2, recipients_per_window=5,
                         connections_per_window=5)

    async def scenario() -> list[Any]:
        a, _b = nodes(config, caches)
        redis_server.stop()
        started = time.monotonic()
        out = [await a.message(IP, None, False), await a.recipient(IP, None, False), await a.auth_admit(IP),
               await a.message(IP, None, True),  # exempt: needs no shared decision
               await a.connection(IP, False)]
        out.append(time.monotonic() - started)
        await a.close()
        return out

    mail, rcpt, auth, exempt, connect, took = asyncio.run(scenario())
    assert mail.reply == CLUSTER_TEMPFAIL and mail.reason == "cluster_unavailable"
    assert rcpt.reply == CLUSTER_TEMPFAIL
    assert auth.reply == AUTH_TEMPFAIL and str(AUTH_TEMPFAIL).startswith("454 4.7.0")
    assert str(CLUSTER_TEMPFAIL).startswith("451 4.3.0")
    assert exempt is None
    assert str(connect.reply).startswith("421 4.3.0") and connect.reason == "cluster_unavailable"
    assert took < 1.0, took  # a stopped server refuses at once: no timeout per command
