"""Cluster leases: per-destination concurrency as a cluster total, held in Redis ([cluster]).

A node holds, per destination, a lease of k session slots in Redis: the hash
`mta:conc:{<dest>}:held` (node -> k) with each node's expiry in the sorted set
`mta:conc:{<dest>}:exp`. One Lua script (LEASE_LUA) drops expired leases, then sets
this node's to min(want, concurrency - the other nodes' slots) and renews its expiry, all
atomically; so the slots of a node that died come back LEASE_SECONDS after its last
renewal. The scheduler opens sessions within its lease without asking Redis
(plan.Destination.shared); this task asks for more when a destination has ready jobs
and no room, renews every RENEW_SECONDS, and gives slots back when sessions close
(want = open sessions + ready jobs, capped by the window).

Redis down ([cluster] on_redis_down): "local": each destination's `shared` is None,
the node's own full limits (the cluster total is not divided by the node count: nodes
do not know how many are alive without Redis); "tempfail": no session beyond those
already open. Either is logged once per outage and counted. Redis calls run on this
task with short timeouts: the scheduler's loop never waits for them.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mta import logs, metrics
from mta.sections import ClusterConfig
from workers.scheduler.plan import Destination

LEASE_SECONDS = 10.0  # a dead node's slots come back this long after its last renewal
RENEW_SECONDS = LEASE_SECONDS / 4
POLL_SECONDS = 0.1  # a destination waiting for slots asks again this often
REDIS_TIMEOUT_SECONDS = 0.5

LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held, exp = KEYS[1], KEYS[2]
local node, want, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now)) do
  redis.call('HDEL', held, gone)
  redis.call('ZREM', exp, gone)
end
local others = 0
local all = redis.call('HGETALL', held)
for i = 1, #all, 2 do
  if all[i] ~= node then others = others + tonumber(all[i + 1]) end
end
local grant = math.max(0, math.min(want, limit - others))
if grant > 0 then
  redis.call('HSET', held, node, grant)
  redis.call('ZADD', exp, now + ttl, node)
  redis.call('PEXPIRE', held, ttl * 2)
  redis.call('PEXPIRE', exp, ttl * 2)
else
  redis.call('HDEL', held, node)
  redis.call('ZREM', exp, node)
end
return grant
"""


def lease_keys(dest: str) -> list[str]:
    """The destination's keys; {dest} is a hash tag, so both sit on one Redis Cluster slot."""
    return [f"mta:conc:{{{dest}}}:held", f"mta:conc:{{{dest}}}:exp"]


def want_of(dest: Destination, now: float) -> int:
    """Slots the node could use now: its open sessions, plus ready jobs within the window."""
    if len(dest) and now >= dest.suspended_until:
        return min(dest.limit, dest.in_flight + len(dest))
    return dest.in_flight


class Leases:
    def __init__(self, config: ClusterConfig, destinations: Callable[[], Iterable[Destination]],
                 on_change: Callable[[], None]) -> None:
        self.node = config.node or socket.gethostname()
        self.on_redis_down = config.on_redis_down
        self._destinations = destinations
        self._on_change = on_change
        self._client = aioredis.Redis.from_url(config.redis, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                               socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self._script = self._client.register_script(LEASE_LUA)
        self._wake = asyncio.Event()
        self._waiting: dict[str, float] = {}  # destination -> when it first wanted more than its lease
        self.up: bool | None = None

    def want_more(self) -> None:
        """A destination has ready jobs and no room in its lease: ask Redis soon."""
        self._wake.set()

    async def run_forever(self) -> None:
        metrics.CLUSTER_REDIS_UP.set(0)
        while True:
            pending = await self._sync()
            self._on_change()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS if pending else RENEW_SECONDS)
            except TimeoutError:
                pass
            if pending:
                await asyncio.sleep(POLL_SECONDS / 4)  # a burst of wake-ups costs one round trip

    async def release_all(self) -> None:
        """At close: this node's leases go back now, not at their expiry."""
        for dest in self._destinations():
            if dest.shared:
                dest.shared = 0
        await self._sync()
        await self._client.aclose()

    async def _sync(self) -> bool:
        """One round trip for every destination with a lease or a wish; True while one waits."""
        now = time.time()
        asks = [(dest, want_of(dest, now)) for dest in self._destinations()]
        asks = [(d, w) for d, w in asks if w or d.shared]
        if not asks:
            return False
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for dest, want in asks:
                    await self._script(keys=lease_keys(dest.name), client=pipe,
                                       args=[self.node, want, dest.limits.concurrency, int(LEASE_SECONDS * 1000)])
                grants = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._down(asks, str(exc))
            return False
        if self.up is not True:
            self.up = True
            metrics.CLUSTER_REDIS_UP.set(1)
            logs.event("cluster_redis_up", node=self.node)
        pending = False
        for (dest, want), grant in zip(asks, grants):
            grant = int(grant)
            if want > (dest.shared or 0):
                metrics.CLUSTER_DECISIONS.labels("concurrency", "allowed" if grant > (dest.shared or 0)
                                                 else "waiting").inc()
            if want > grant:
                self._waiting.setdefault(dest.name, time.monotonic())
                pending = True
            if grant > (dest.shared or 0) or want <= grant:
                since = self._waiting.pop(dest.name, None)
                if since is not None and grant > (dest.shared or 0):
                    metrics.CLUSTER_LEASE_WAIT_SECONDS.observe(time.monotonic() - since)
            dest.shared = grant
        return pending

    def _down(self, asks: list[tuple[Destination, int]], error: str) -> None:
        if self.up is not False:
            self.up = False
            metrics.CLUSTER_REDIS_UP.set(0)
            logs.event("cluster_redis_down", node=self.node, fallback=self.on_redis_down, error=error,
                       action="check [cluster] redis and the Redis server; limits are "
                       + ("this node's own" if self.on_redis_down == "local" else "held: no new sessions"))
        self._waiting.clear()
        for dest, want in asks:
            if self.on_redis_down == "local":
                dest.shared = None
            else:
                dest.shared = min(dest.shared or 0, dest.in_flight)
            if want > dest.in_flight:
                metrics.CLUSTER_DECISIONS.labels("concurrency", self.on_redis_down).inc()
