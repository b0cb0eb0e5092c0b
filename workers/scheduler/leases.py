"""Cluster leases: per-destination concurrency and max_connections as cluster totals, in Redis ([cluster]).

A node holds, per destination, a lease of k session slots in Redis: the hash
`mta:conc:{<dest>}:held` (node -> k) with each node's expiry in the sorted set
`mta:conc:{<dest>}:exp`. One Lua script (LEASE_LUA) drops expired leases, then grants
this node min(want, concurrency - the other nodes' slots, its fair share: concurrency /
the nodes holding or waiting, rounded up), records max(grant, its open sessions) and
renews its expiry, all atomically; so the slots of a node that died come back
LEASE_SECONDS after its last renewal. A node waiting records 0: it counts in the fair
share, and a node above its share gets a smaller grant at its next renewal and closes
sessions down to it as their jobs end (never one in the middle of a message). The scheduler opens sessions within its lease without asking Redis
(plan.Destination.shared); this task asks for more when a destination has ready jobs
and no room, renews every RENEW_SECONDS, and gives slots back when sessions close
(want = open sessions + ready jobs, capped by the window). A destination Redis refused
asks again every POLL_SECONDS, not at each dispatch that finds it still short.

[delivery] max_connections (outbound sessions in total) is a cluster total the same way:
one more lease, on the cluster-wide keys TOTAL_KEYS, with want = the node's open sessions
plus the sessions its destinations could open now (each within its window and its
lease), capped by max_connections; `total` holds the node's grant. The dispatcher opens
sessions within it without asking Redis (dispatch.py max_sessions), asks for more when it
is full and mail waits, and it is renewed and given back with the others (the same round trip).

Message rate (max_messages_per_second): one token bucket per destination for the
cluster, `mta:rate:{<dest>}` (RATE_LUA, refilled by Redis's clock). A node out of
local tokens takes a batch of up to TOKEN_BATCH_SECONDS' worth (at most its ready
jobs), so a message costs a fraction of a round trip, not one.

Redis down ([cluster] on_redis_down): "local": each destination's `shared` is None,
the node's own full limits (the cluster total is not divided by the node count: nodes
do not know how many are alive without Redis), and `total` is None (the node's own
max_connections); "tempfail": no session beyond those already open. Either is logged
once per outage and counted. Redis calls run on this task with short timeouts: the
scheduler's loop never waits for them. With nothing to ask, the task PINGs every
RENEW_SECONDS, so mta_cluster_redis_up{side="delivery"} says whether Redis answers on an
idle node too (and an outage ends without waiting for mail).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable, Iterable

from redis.exceptions import NoScriptError, RedisError

from mta import logs, metrics, redisclient
from mta.sections import ClusterConfig
from workers.scheduler.plan import Destination

LEASE_SECONDS = 10.0  # a dead node's slots come back this long after its last renewal
RENEW_SECONDS = LEASE_SECONDS / 4
POLL_SECONDS = 0.1  # a destination waiting for slots asks again this often
REDIS_TIMEOUT_SECONDS = 0.5
DOWN_RETRY_SECONDS = 1.0  # Redis down: asked again at most this often

LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held, exp = KEYS[1], KEYS[2]
local node, want, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local open = tonumber(ARGV[5])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now)) do
  redis.call('HDEL', held, gone)
  redis.call('ZREM', exp, gone)
end
local others, nodes = 0, 1
local all = redis.call('HGETALL', held)
for i = 1, #all, 2 do
  if all[i] ~= node then
    others = others + tonumber(all[i + 1])
    nodes = nodes + 1
  end
end
local grant = math.max(0, math.min(want, limit - others, math.ceil(limit / nodes)))
if want > 0 or open > 0 then
  redis.call('HSET', held, node, math.max(grant, open))
  redis.call('ZADD', exp, now + ttl, node)
  redis.call('PEXPIRE', held, ttl * 2)
  redis.call('PEXPIRE', exp, ttl * 2)
else
  redis.call('HDEL', held, node)
  redis.call('ZREM', exp, node)
end
return grant
"""


# The destination's message rate as one token bucket for the cluster (max_messages_per_second,
# a burst of max(1, rate) as the local bucket's). A node takes up to ARGV[3] tokens at once.
RATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, want = tonumber(ARGV[1]), tonumber(ARGV[2])
local burst = math.max(1, rate)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local grant = math.min(want, math.floor(tokens))
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - grant), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return grant
"""
TOKEN_BATCH_SECONDS = 0.2  # a batch of rate tokens is at most this long's worth


TOTAL_KEYS = ["mta:sessions:{total}:held", "mta:sessions:{total}:exp"]  # max_connections for the cluster


def rate_key(dest: str) -> str:
    return f"mta:rate:{{{dest}}}"


def lease_keys(dest: str) -> list[str]:
    """The destination's keys; {dest} is a hash tag, so both sit on one Redis Cluster slot."""
    return [f"mta:conc:{{{dest}}}:held", f"mta:conc:{{{dest}}}:exp"]


def token_batch(dest: Destination) -> int:
    """Rate tokens to ask for at once: TOKEN_BATCH_SECONDS' worth, no more than the ready jobs."""
    rate = dest.limits.max_messages_per_second
    return max(1, min(math.ceil(rate * TOKEN_BATCH_SECONDS), len(dest)))


def want_of(dest: Destination, now: float) -> int:
    """Slots the node could use now: its open sessions, plus ready jobs within the window."""
    if len(dest) and now >= dest.suspended_until:
        return min(dest.limit, dest.in_flight + len(dest))
    return dest.in_flight


def want_total(destinations: Iterable[Destination], open_sessions: int, max_connections: int, now: float) -> int:
    """Sessions in total the node could use now: those open, plus those its destinations
    could open within their windows and leases (a destination waiting for its own lease
    asks for total slots once it has it)."""
    more = 0
    for dest in destinations:
        want = want_of(dest, now)
        if dest.shared is not None:
            want = min(want, max(dest.shared, dest.in_flight))
        more += max(0, want - dest.in_flight)
    return min(max_connections, open_sessions + more)


class Leases:
    def __init__(self, config: ClusterConfig, destinations: Callable[[], Iterable[Destination]],
                 on_change: Callable[[], None], sessions: Callable[[], tuple[int, int]]) -> None:
        """`sessions`: the node's open sessions and its [delivery] max_connections (read at each sync)."""
        self.node = config.node or socket.gethostname()
        self.on_redis_down = config.on_redis_down
        self._destinations = destinations
        self._sessions = sessions
        self.total: int | None = 0  # slots of the cluster's max_connections held; None: the node's own
        self._on_change = on_change
        self._config = config
        self._client = redisclient.client(config, REDIS_TIMEOUT_SECONDS)
        self._shas: tuple[str, str] | None = None  # the scripts' SHA1s once loaded into this Redis
        self._wake = asyncio.Event()
        self._waiting: dict[str, float] = {}  # destination -> when it first wanted more than its lease
        self.up: bool | None = None

    def want_more(self) -> None:
        """A destination has ready jobs and no room in its lease: ask Redis soon."""
        self._wake.set()

    async def run_forever(self) -> None:
        metrics.CLUSTER_REDIS_UP.labels("delivery").set(0)
        while True:
            pending = await self._sync()
            self._on_change()
            self._wake.clear()
            until = time.monotonic() + (POLL_SECONDS if pending else RENEW_SECONDS)
            while await self._woken(until - time.monotonic()) and pending and not self._news():
                self._wake.clear()  # the dispatcher re-asking what Redis just refused: the poll's pace
            if pending:
                await asyncio.sleep(POLL_SECONDS / 4)  # a burst of wake-ups costs one round trip
            elif self.up is False:
                await asyncio.sleep(DOWN_RETRY_SECONDS)

    async def _woken(self, timeout: float) -> bool:
        """Wait for want_more up to `timeout` seconds; False when none came."""
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    def _news(self) -> bool:
        """Something to ask that Redis has not just refused: rate tokens, or more slots for a
        destination that was not waiting for them. (A waiting destination's every dispatch
        asks again; answered at once, that was a round trip per 25 ms per waiting node.)"""
        now = time.time()
        return any(d.wants_tokens or (d.name not in self._waiting and want_of(d, now) > (d.shared or 0))
                   for d in self._destinations())

    async def release_all(self) -> None:
        """At close: this node's leases go back now, not at their expiry."""
        held = [(dest, 0) for dest in self._destinations() if dest.shared]
        try:
            await self._call(held, [], (0, 0) if self.total else None, release=True)
        except (RedisError, OSError) as exc:
            logs.event("cluster_release_failed", node=self.node, destinations=len(held), error=str(exc),
                       action=f"nothing to do: the leases expire within {LEASE_SECONDS:g} s")
        await self._client.aclose()

    async def _sync(self) -> bool:
        """One round trip for every destination with a lease or a wish; True while one waits."""
        now = time.time()
        asks = [(dest, want_of(dest, now)) for dest in self._destinations()]
        asks = [(d, w) for d, w in asks if w or d.shared]
        tokens = [(d, token_batch(d)) for d in self._destinations() if d.wants_tokens]
        open_sessions, max_connections = self._sessions()
        total = (want_total(self._destinations(), open_sessions, max_connections, now), open_sessions)
        if not total[0] and not self.total:
            total = None
        try:
            if not asks and not tokens and total is None:  # idle: a PING keeps mta_cluster_redis_up true (and finds Redis back)
                await self._client.ping()
                self._mark_up()
                return False
            answers = await self._call(asks, tokens, total)
        except NoScriptError:  # Redis restarted (or SCRIPT FLUSH): load them again, ask again soon
            self._shas = None
            return True
        except (RedisError, OSError) as exc:
            self._down(asks, tokens, total, str(exc))
            return False
        if total is not None:
            pending = self._got_total(total[0], answers.pop())
        else:
            pending = False
            self.total = 0  # Redis answers (again): no lease held, none assumed
        grants = answers[:len(asks)]
        pending = self._got_tokens(tokens, answers[len(asks):]) or pending
        self._mark_up()
        for (dest, want), grant in zip(asks, grants):
            grant = int(grant)
            if want > (dest.shared or 0):
                metrics.CLUSTER_SHARED_DECISIONS.labels("concurrency", "allowed" if grant > (dest.shared or 0)
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

    def _mark_up(self) -> None:
        """Redis answered. After an outage on the node's own limits ("local"), every destination
        asks for a lease again before its next session, the way a new one does: one idle
        through the outage would otherwise open sessions on its own limits until asked."""
        if self.up is True:
            return
        for dest in self._destinations():
            if dest.shared is None:
                dest.shared = 0
                dest.tokens = 0.0  # the node's own bucket's tokens are no cluster tokens
        if self.total is None:  # likewise the max_connections lease
            self.total = 0
        self.up = True
        metrics.CLUSTER_REDIS_UP.labels("delivery").set(1)
        logs.event("cluster_redis_up", node=self.node)

    async def _call(self, asks: list[tuple[Destination, int]], tokens: list[tuple[Destination, int]],
                    total: tuple[int, int] | None, release: bool = False) -> list[int]:
        """Lease and rate scripts in one pipeline: one round trip (EVALSHA, no SCRIPT EXISTS each time).
        `total`: (want, open sessions) of the max_connections lease, its answer last."""
        if self._shas is None:
            self._shas = (await self._client.script_load(LEASE_LUA), await self._client.script_load(RATE_LUA))
        lease, rate = self._shas
        ttl = int(LEASE_SECONDS * 1000)
        async with self._client.pipeline(transaction=False) as pipe:
            for dest, want in asks:
                pipe.evalsha(lease, 2, *lease_keys(dest.name), self.node, want, dest.limits.concurrency, ttl,
                             0 if release else dest.in_flight)
            for dest, want in tokens:
                pipe.evalsha(rate, 1, rate_key(dest.name), dest.limits.max_messages_per_second, want)
            if total is not None:
                pipe.evalsha(lease, 2, *TOTAL_KEYS, self.node, total[0], self._sessions()[1], ttl, total[1])
            return [int(answer) for answer in await pipe.execute()]

    def _got_total(self, want: int, grant: int) -> bool:
        """The max_connections lease's answer; True while the node waits for more."""
        if want > (self.total or 0):
            metrics.CLUSTER_SHARED_DECISIONS.labels("max_connections", "allowed" if grant > (self.total or 0)
                                             else "waiting").inc()
        self.total = grant
        return want > grant

    def _got_tokens(self, tokens: list[tuple[Destination, int]], grants: list[int]) -> bool:
        """Rate tokens from the cluster's buckets; True while a destination got none."""
        pending = False
        for (dest, want), grant in zip(tokens, grants):
            dest.tokens += int(grant)
            dest.wants_tokens = False
            pending = pending or not grant
            metrics.CLUSTER_SHARED_DECISIONS.labels("rate", "allowed" if grant else "waiting").inc()
        return pending

    def _down(self, asks: list[tuple[Destination, int]], tokens: list[tuple[Destination, int]],
              total: tuple[int, int] | None, error: str) -> None:
        if self.up is not False:
            self.up = False
            metrics.CLUSTER_REDIS_UP.labels("delivery").set(0)
            logs.event("cluster_redis_down", node=self.node, fallback=self.on_redis_down, error=error,
                       action=redisclient.action(self._config, error) + "; limits are "
                       + ("this node's own" if self.on_redis_down == "local" else "held: no new sessions"))
        self._waiting.clear()
        for dest, want in asks:
            if self.on_redis_down == "local":
                dest.shared = None
            else:
                dest.shared = min(dest.shared or 0, dest.in_flight)
            if want > dest.in_flight:
                metrics.CLUSTER_SHARED_DECISIONS.labels("concurrency", self.on_redis_down).inc()
        if total is not None:
            self.total = None if self.on_redis_down == "local" else min(self.total or 0, total[1])
            if total[0] > total[1]:
                metrics.CLUSTER_SHARED_DECISIONS.labels("max_connections", self.on_redis_down).inc()
        for dest, _want in tokens:
            dest.wants_tokens = False
            if self.on_redis_down == "local":
                dest.shared = None  # the node's own bucket
            metrics.CLUSTER_SHARED_DECISIONS.labels("rate", self.on_redis_down).inc()
