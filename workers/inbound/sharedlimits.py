"""Cluster-wide inbound limits in Redis ([cluster] redis): the rate windows and AUTH failures.

With [cluster] redis set, the per-IP connection window, the per-IP and per-user message
and recipient windows ([rate]) and the AUTH failure count of an address ([auth]
max_failures within lockout_seconds) are kept in Redis, so they hold for every node
sharing it. Keys:
  mta:rate:<conn|msg|rcpt>/<ip|user>/<who>   INCR'd count; PEXPIRE window_seconds from its first count
  mta:auth:<ip>                              failures; PEXPIRE lockout_seconds from the first failure
The windows are fixed, as the local ones (ratelimit.py): a window starts at its first
count and ends window_seconds later (the key's expiry). One Lua script checks every
window of a command and counts them all or none, atomically: a refused attempt costs
nothing. Round trips: one per connection, MAIL and RCPT that a shared window applies to
(none when no window applies: limit 0, or a mynetworks client exempt), none while a
refusal is remembered (a full window stays full until its key expires: the refusal is
cached here until then); the lockout: one read at connect on submission and smtps
listeners and before each AUTH check, one count per failure. The concurrency limit
([limits] max_connections_per_ip) and the AUTH checks in progress stay the node's own
(ratelimit.py); AUTH failures are counted in both, the node's count is its fallback.

Redis down (a command fails or times out, REDIS_TIMEOUT_SECONDS): logged once per
outage per worker, mta_cluster_redis_up 0, and no command is sent until the prober
(`watch`, once a PROBE_SECONDS) gets an answer again; meanwhile [cluster] on_redis_down
"local" decides with the node's own limits (ratelimit.py, the LMDB cache), "tempfail"
answers 421 4.3.0 (connect), 451 4.3.0 (MAIL, RCPT) and 454 4.7.0 (AUTH). Every decision
is counted in mta_cluster_shared_decisions_total{limit,result}.

Invariant: Redis is only ever awaited (redis-py's asyncio client; the window scripts on
redisclient.Scripts' own connections): the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from redis.exceptions import RedisError

from mta import logs, metrics, redisclient
from mta.config import Config
from mta.smtp.replies import Reply
from workers.inbound.decision import Decision
from workers.inbound.ratelimit import (
    CONNECTION_RATE,
    LOCKED_OUT,
    Limit,
    RateLimiter,
    too_many_recipients,
    too_much_mail,
    windows,
)

REDIS_TIMEOUT_SECONDS: Final = 0.5
PROBE_SECONDS: Final = 1.0
MAX_REMEMBERED: Final = 10_000  # cached refusals; past that the cache starts over

CONNECT_TEMPFAIL = Reply(421, "4.3.0", "Error: the cluster's shared limits are unavailable, try again later")
CLUSTER_TEMPFAIL = Reply(451, "4.3.0", "Error: the cluster's shared limits are unavailable, try again later")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure: the cluster's shared limits are "
                                    "unavailable, try again later")

# KEYS: the windows; ARGV[1]: window in ms, ARGV[1 + i]: the limit of KEYS[i].
# Returns 0 when every window had room (each counted one), else i of the first full one.
_CHARGE: Final = """
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i + 1]) then
    return {i, redis.call('PTTL', key)}
  end
end
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, ARGV[1]) end
end
return {0, 0}
"""
# KEYS[1]: mta:auth:<ip>; ARGV[1]: lockout in ms. Returns the failures in the window.
_FAIL: Final = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class Down(Exception):
    """Redis did not answer (or is known to be down): decide by [cluster] on_redis_down."""


class SharedLimits:
    def __init__(self, config: Config, local: RateLimiter) -> None:
        self._rate, self._auth = config.rate, config.auth
        self._tempfail = config.cluster.on_redis_down == "tempfail"
        self._local = local
        self._cluster = config.cluster
        self._redis = redisclient.client(config.cluster, REDIS_TIMEOUT_SECONDS, no_retry=True)
        self._scripts = redisclient.Scripts(self._redis, REDIS_TIMEOUT_SECONDS)  # the per-command path
        self._charge_script = self._scripts.script(_CHARGE)
        self._fail_script = self._scripts.script(_FAIL)
        self._up: bool | None = None  # None: not asked yet
        self._full: dict[str, float] = {}  # key -> monotonic time its window ends (a cached refusal)
        self._up_gauge = metrics.CLUSTER_REDIS_UP.labels("inbound")

    # --- MAIL and RCPT -------------------------------------------------------------------

    def applies(self, ip_limit: int, user_limit: int, user: str | None, trusted: bool) -> bool:
        """Would a window apply (so the decision needs Redis)? False: the synchronous path."""
        return bool(windows("", "", user, self._exempt(trusted), ip_limit, user_limit))

    def applies_to_connect(self, trusted: bool) -> bool:
        return self.applies(self._rate.connections_per_window, 0, None, trusted)

    def applies_to_mail(self, user: str | None, trusted: bool) -> bool:
        return self.applies(self._rate.messages_per_window, self._rate.user_messages_per_window, user, trusted)

    def applies_to_rcpt(self, user: str | None, trusted: bool) -> bool:
        return self.applies(self._rate.recipients_per_window, self._rate.user_recipients_per_window, user, trusted)

    async def connection(self, ip: str, trusted: bool) -> Decision | None:
        """AWAITABLE: count one connection in the cluster's window of `ip`; None when allowed."""
        limits = windows("conn", ip, None, self._exempt(trusted), self._rate.connections_per_window, 0)
        return await self._count("connection_rate", limits, lambda _who: CONNECTION_RATE,
                                 lambda: self._local.connection_rate(ip, trusted), CONNECT_TEMPFAIL)

    async def message(self, ip: str, user: str | None, trusted: bool) -> Decision | None:
        """AWAITABLE: count one MAIL in the cluster's windows; None when allowed, else the refusal."""
        limits = windows("msg", ip, user, self._exempt(trusted), self._rate.messages_per_window,
                         self._rate.user_messages_per_window)
        return await self._count("message_rate", limits, too_much_mail,
                                 lambda: self._local.message(ip, user, trusted))

    async def recipient(self, ip: str, user: str | None, trusted: bool) -> Decision | None:
        """AWAITABLE: count one RCPT in the cluster's windows; None when allowed, else the refusal."""
        limits = windows("rcpt", ip, user, self._exempt(trusted), self._rate.recipients_per_window,
                         self._rate.user_recipients_per_window)
        return await self._count("recipient_rate", limits, too_many_recipients,
                                 lambda: self._local.recipient(ip, user, trusted))

    def _exempt(self, trusted: bool) -> bool:
        return trusted and self._rate.exempt_mynetworks

    async def _count(self, limit: str, limits: list[Limit], refusal: Callable[[str], Reply],
                     local: Callable[[], Reply | None], tempfail: Reply = CLUSTER_TEMPFAIL) -> Decision | None:
        if not limits:
            return None
        keys = [f"mta:rate:{key}" for key, _limit, _who in limits]
        now = time.monotonic()
        for key, (_key, _limit, who) in zip(keys, limits, strict=True):
            if self._full.get(key, 0.0) > now:
                return self._decided(limit, "refused", refusal(who))
        window_ms = int(self._rate.window_seconds * 1000)
        try:
            full, ttl_ms = await self._ask(lambda: self._charge_script(keys, [window_ms, *(n for _k, n, _w in limits)]))
        except Down:
            if self._tempfail:
                return self._decided(limit, "tempfail", tempfail, "cluster_unavailable")
            return self._decided(limit, "local", local())
        if not full:
            return self._decided(limit, "allowed", None)
        if len(self._full) >= MAX_REMEMBERED:
            self._full.clear()
        self._full[keys[full - 1]] = now + max(int(ttl_ms), 0) / 1000
        return self._decided(limit, "refused", refusal(limits[full - 1][2]))

    def _decided(self, limit: str, result: str, reply: Reply | None, reason: str = "") -> Decision | None:
        metrics.CLUSTER_SHARED_DECISIONS.labels(limit, result).inc()
        return Decision(reply, reason or limit) if reply is not None else None

    # --- AUTH ------------------------------------------------------------------------------

    async def auth_admit(self, ip: str) -> Decision | None:
        """AWAITABLE, before an AUTH check: the lockout when the cluster counted max_failures
        failures from `ip` in its window; None to go on (the node's own checks follow)."""
        key = f"mta:auth:{ip}"
        if self._full.get(key, 0.0) > time.monotonic():
            return self._decided("auth_lockout", "refused", LOCKED_OUT, "locked_out")
        try:
            failures, ttl_ms = await self._ask(lambda: self._read_failures(key))
        except Down:
            if self._tempfail:
                return self._decided("auth_lockout", "tempfail", AUTH_TEMPFAIL, "cluster_unavailable")
            return self._decided("auth_lockout", "local", None)
        if failures < self._auth.max_failures:
            return self._decided("auth_lockout", "allowed", None)
        self._full[key] = time.monotonic() + max(ttl_ms, 0) / 1000
        return self._decided("auth_lockout", "refused", LOCKED_OUT, "locked_out")

    async def locked_out(self, ip: str) -> bool:
        """AWAITABLE, at connect: has the cluster locked `ip` out? (False while Redis is down:
        its AUTH answers then.)"""
        refusal = await self.auth_admit(ip)
        return refusal is not None and refusal.reply is LOCKED_OUT

    async def _read_failures(self, key: str) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            count, ttl_ms = await pipe.get(key).pttl(key).execute()
        return int(count or 0), int(ttl_ms)

    async def auth_failed(self, ip: str) -> int:
        """AWAITABLE: count one failed AUTH from `ip` in the cluster; the failures in its window
        (0 when Redis is down: the node's own count decides)."""
        try:
            lockout_ms = int(self._auth.lockout_seconds * 1000)
            return int(await self._ask(lambda: self._fail_script([f"mta:auth:{ip}"], [lockout_ms])))
        except Down:
            return 0

    # --- Redis up and down ------------------------------------------------------------------

    async def _ask(self, command: Callable[[], Awaitable[Any]]) -> Any:
        if self._up is False:  # known down: no command until the prober gets an answer
            raise Down
        try:
            answer = await command()
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)
            raise Down from exc
        self._came_up()
        return answer

    async def watch(self) -> None:
        """Run for the worker's life: probe Redis once a PROBE_SECONDS (PING), so mta_cluster_redis_up
        is current and the shared limits come back as soon as Redis answers again."""
        while True:
            try:
                await self._redis.ping()
            except (RedisError, OSError, TimeoutError) as exc:
                self._went_down(exc)
            else:
                self._came_up()
            await asyncio.sleep(PROBE_SECONDS)

    def _went_down(self, exc: BaseException) -> None:
        self._up_gauge.set(0)
        if self._up is not False:
            self._up = False
            metrics.CLUSTER_REDIS_OUTAGES.labels("inbound").inc()
            logs.event("cluster_redis_down", error=f"{type(exc).__name__}: {exc}",
                       fallback="tempfail" if self._tempfail else "local", action=redisclient.action(self._cluster, exc))

    def _came_up(self) -> None:
        if self._up:  # every answer comes here: the gauge is 1 already
            return
        self._up_gauge.set(1)
        if self._up is False:
            logs.event("cluster_redis_up")
        self._up = True

    async def close(self) -> None:
        await self._scripts.close()
        await self._redis.aclose()
