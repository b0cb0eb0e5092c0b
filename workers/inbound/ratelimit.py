"""Inbound rate limits and AUTH failure accounting, shared by every inbound worker process.

Open connections per IP ([limits] max_connections_per_ip, always on, so on every
connection's path) are counted in shared memory beside the cache (conncount.py: no
system call, no lock per connection). All other state lives in the shared LmdbCache
(namespace "rate"), so a limit holds across the worker processes and survives a worker
restart; each count is one `LmdbCache.update` (one LMDB write transaction, serialised
across processes). Keys:
  conn-window/<ip>              [window_start, count]: [rate] connections_per_window
  msg/ip/<ip>, msg/user/<u>     [window_start, count]: messages_per_window, user_messages_per_window
  rcpt/ip/<ip>, rcpt/user/<u>   [window_start, count]: recipients_per_window, user_recipients_per_window
  auth/<ip>                     [window_start, failures, {pid: checking}]: [auth] max_failures
                                within lockout_seconds; checks in progress per worker (those of
                                a dead worker are dropped when they would make the address busy)

Windows are fixed: a new one starts at the first count at or after window_start +
window_seconds. A refused attempt consumes no budget (a count taken for one limit is
given back when the next refuses). Entries expire a window after their last use.
A limit of 0 costs nothing: no LMDB transaction (the concurrency limit is always on).
AUTH: an attempt is admitted only while failures + attempts being checked < max_failures
(`auth_begin`), so concurrent guesses from one address can never exceed the budget, and
concurrent good logins (a webmail or app server behind one address) wait for a slot
instead of being locked out; `auth_end` frees the slot and counts a failure.
Rate windows skip clients in [relay] mynetworks ("trusted") unless [rate]
exempt_mynetworks = false; the concurrency limit and AUTH failures count everyone.

Invariant: the open connections of an address counted against its limit are those of
live workers only: a worker killed before closing them (kill -9) stops counting when
the limit is reached, and its slot is freed at the next worker start (conncount.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from mta import procinfo
from mta.config import Config
from mta.smtp import replies
from mta.smtp.replies import Reply
from mtaqueue.cache_lmdb import LmdbCache
from workers.inbound.conncount import ConnectionCounts, alive
from workers.inbound.decision import Decision

CACHE_NAMESPACE: Final = "rate"
MAX_AUTH_DELAY_SECONDS: Final = 5.0

CONNECTION_RATE = Reply(421, "4.7.0", "Error: too many connections from your address, try again later")
LOCKED_OUT = Reply(421, "4.7.0", "Error: too many failed authentications from your address, try again later")
# RFC 4954's temporary failure: the address's AUTH checks in progress used its failure budget
# for AUTH_BUSY_SECONDS (concurrent guessing, or more concurrent logins than max_failures).
AUTH_BUSY = Reply(454, "4.7.0", "Temporary authentication failure: too many authentications in progress "
                                "from your address, try again")
AUTH_BUSY_SECONDS: Final = 10.0
AUTH_BUSY_POLL_SECONDS: Final = 0.02  # a read of the shared cache per poll
# The two refusals of open_connection, and why.
TOO_MANY_CONNECTIONS: Final = Decision(replies.CONNECTION_LIMIT, "max_connections_per_ip")
CONNECTIONS_TOO_FAST: Final = Decision(CONNECTION_RATE, "connection_rate")

Window = list[float]  # [window_start, count], as stored
Limit = tuple[str, int, str]  # (key, limit, who for the reply)


def too_much_mail(who: str) -> Reply:
    return Reply(450, "4.7.1", f"Error: too much mail from {replies.sanitize(who)}, try again later")


def too_many_recipients(who: str) -> Reply:
    return Reply(450, "4.7.1", f"Error: too many recipients from {replies.sanitize(who)}, try again later")


class RateLimiter:
    def __init__(self, config: Config, cache: LmdbCache, *, clock: Callable[[], float] = time.time,
                 pid: int | None = None, connections: ConnectionCounts | None = None) -> None:
        """pid: the process whose connections and AUTH checks this instance counts (default:
        this one); connections: the node's open connections (default: mapped at first use
        from the cache's folder)."""
        self._cache = cache
        self._clock = clock
        self._pid = str(pid if pid is not None else procinfo.pid())  # msgpack map keys: strings
        self._connections = connections
        self._max_connections = config.limits.max_connections_per_ip
        self._rate = config.rate
        self._auth = config.auth

    # --- connections ------------------------------------------------------------------

    def open_connection(self, ip: str, trusted: bool, rate: bool = True) -> Decision | None:
        """Take a concurrency slot and count the connection (unless not `rate`: the cluster
        counts it, sharedlimits.py); None when allowed, else the refusal (421,
        max_connections_per_ip or connection_rate)."""
        if not self._connections_table().take(ip, self._max_connections):
            return TOO_MANY_CONNECTIONS
        if rate and self.connection_rate(ip, trusted) is not None:
            self.close_connection(ip)
            return CONNECTIONS_TOO_FAST
        return None

    def connection_rate(self, ip: str, trusted: bool) -> Reply | None:
        """Count one connection in the window of `ip`; None when allowed, else 421."""
        if self._rate.connections_per_window and not self._exempt(trusted):
            limit = [(f"conn-window/{ip}", self._rate.connections_per_window, ip)]
            if self._charge(limit, self._clock()) is not None:
                return CONNECTION_RATE
        return None

    def close_connection(self, ip: str) -> None:
        """Give back the slot of an open_connection that returned None."""
        self._connections_table().give_back(ip)

    def connections(self, ip: str) -> dict[int, int]:
        """The open connections of `ip` by inbound worker pid, as counted now."""
        return self._connections_table().counts(ip)

    def close(self) -> None:
        """This worker's connections stop counting (at its exit); later counts admit uncounted."""
        if self._connections is not None:
            self._connections.close()

    def _connections_table(self) -> ConnectionCounts:
        if self._connections is None:  # mapped at first use, unless given (the worker maps it at start)
            self._connections = ConnectionCounts(self._cache.path, int(self._pid))
        return self._connections

    # --- messages and recipients -----------------------------------------------------------

    def message(self, ip: str, user: str | None, trusted: bool) -> Reply | None:
        """Count one MAIL from `ip` (and `user`, when authenticated); None when allowed, else 450."""
        return self._count("msg", ip, user, trusted, self._rate.messages_per_window,
                           self._rate.user_messages_per_window, too_much_mail)

    def recipient(self, ip: str, user: str | None, trusted: bool) -> Reply | None:
        """Count one RCPT from `ip` (and `user`, when authenticated); None when allowed, else 450."""
        return self._count("rcpt", ip, user, trusted, self._rate.recipients_per_window,
                           self._rate.user_recipients_per_window, too_many_recipients)

    def _count(self, kind: str, ip: str, user: str | None, trusted: bool, ip_limit: int, user_limit: int,
               refusal: Callable[[str], Reply]) -> Reply | None:
        limits = windows(kind, ip, user, self._exempt(trusted), ip_limit, user_limit)
        if not limits:
            return None  # the fast path: no LMDB transaction
        refused = self._charge(limits, self._clock())
        return refusal(refused) if refused is not None else None

    def _exempt(self, trusted: bool) -> bool:
        return trusted and self._rate.exempt_mynetworks

    def _charge(self, limits: list[Limit], now: float) -> str | None:
        """Count one in the window of each (key, limit, who); None when all allow, else who was refused.

        A refusal gives back the counts already taken, so a refused attempt costs nothing.
        """
        window = self._rate.window_seconds
        taken: list[tuple[str, float]] = []
        for key, limit, who in limits:
            count = _Count(now, window, limit)
            start = self._cache.update(CACHE_NAMESPACE, key, count, window, now)[0]
            if count.refused:
                for done, done_start in taken:
                    self._cache.update(CACHE_NAMESPACE, done, _Uncount(done_start), window, now)
                return who
            taken.append((key, start))
        return None

    # --- AUTH failures -------------------------------------------------------------------

    def auth_begin(self, ip: str) -> str:
        """Admit one AUTH check from `ip`: "ok" (a slot is taken: call auth_end), "busy"
        (failures + checks in progress reach max_failures: try again shortly) or "locked"."""
        lockout, limit = self._auth.lockout_seconds, self._auth.max_failures
        now = self._clock()
        state = "ok"

        def begin(value: Any) -> list[float]:
            nonlocal state
            start, failures, checking = _auth_window(value, now, lockout)
            if failures < limit <= failures + sum(checking.values()):
                checking = _without_dead_pids(checking) or {}  # a worker killed mid-check
            busy = failures + sum(checking.values()) >= limit
            state = "locked" if failures >= limit else "busy" if busy else "ok"
            if state == "ok":
                checking[self._pid] = checking.get(self._pid, 0) + 1
            return [start, failures, checking]

        self._cache.update(CACHE_NAMESPACE, f"auth/{ip}", begin, lockout, now)
        return state

    def auth_busy(self, ip: str) -> bool:
        """A read: would auth_begin say "busy" now (failures + checks in progress at the
        limit, short of a lockout)? Waiters poll this, not auth_begin's write."""
        now = self._clock()
        value = self._cache.get(CACHE_NAMESPACE, f"auth/{ip}", now)
        _start, failures, checking = _auth_window(value, now, self._auth.lockout_seconds)
        return failures < self._auth.max_failures <= failures + sum(checking.values())

    def auth_end(self, ip: str, failed: bool) -> int:
        """The check auth_begin admitted is over; returns the failures in the window."""
        return self._auth_count(ip, failed, ended=True)

    def auth_failed(self, ip: str) -> int:
        """Record one failed AUTH from `ip` (no auth_begin); returns the failures in its window."""
        return self._auth_count(ip, True, ended=False)

    def _auth_count(self, ip: str, failed: bool, ended: bool) -> int:
        lockout = self._auth.lockout_seconds
        now = self._clock()

        def end(value: Any) -> list[float]:
            start, failures, checking = _auth_window(value, now, lockout)
            mine = checking.pop(self._pid, 0) - ended
            if mine > 0:
                checking[self._pid] = mine
            return [start, failures + failed, checking]

        return int(self._cache.update(CACHE_NAMESPACE, f"auth/{ip}", end, lockout, now)[1])

    def auth_delay(self, ip: str) -> float:
        """Seconds to wait before answering an AUTH from `ip`: grows past slow_after_failures, at most 5."""
        beyond = self._auth_failures(ip) - self._auth.slow_after_failures
        if beyond <= 0:
            return 0.0
        return min(self._auth.failure_delay_seconds * beyond, MAX_AUTH_DELAY_SECONDS)

    def locked_out(self, ip: str) -> bool:
        """True while `ip` has max_failures failures in the lockout window of its first failure."""
        return self._auth_failures(ip) >= self._auth.max_failures

    def _auth_failures(self, ip: str) -> int:
        now = self._clock()
        value = self._cache.get(CACHE_NAMESPACE, f"auth/{ip}", now)
        return int(_auth_window(value, now, self._auth.lockout_seconds)[1])


def windows(kind: str, ip: str, user: str | None, exempt: bool, ip_limit: int, user_limit: int) -> list[Limit]:
    """The windows one MAIL ("msg") or RCPT ("rcpt") counts in: its address's unless `exempt`,
    its user's when authenticated; a limit of 0 is no window."""
    limits: list[Limit] = []
    if ip_limit and not exempt:
        limits.append((f"{kind}/ip/{ip}", ip_limit, ip))
    if user_limit and user is not None:
        limits.append((f"{kind}/user/{user}", user_limit, user))
    return limits


def _without_dead_pids(counts: Any) -> dict[str, int] | None:
    if not isinstance(counts, dict):
        return None
    return {pid: n for pid, n in counts.items() if alive(int(pid))} or None


def _current(value: Any, now: float, window_seconds: float) -> tuple[float, int]:
    """(window_start, count) of the window running at `now`: a fresh one when none is."""
    if isinstance(value, list) and len(value) == 2 and now < value[0] + window_seconds:
        return float(value[0]), int(value[1])
    return now, 0


def _auth_window(value: Any, now: float, lockout_seconds: float) -> tuple[float, int, dict[str, int]]:
    """(window_start, failures, {worker pid: checks in progress}) of the AUTH window at `now`."""
    if (isinstance(value, list) and len(value) == 3 and isinstance(value[2], dict)
            and now < value[0] + lockout_seconds):
        return float(value[0]), int(value[1]), dict(value[2])
    return now, 0, {}


class _Count:
    """The update counting one in the window running at `now`; at the limit it refuses
    and leaves the window as it is."""

    def __init__(self, now: float, window_seconds: float, limit: int) -> None:
        self.now, self.window_seconds, self.limit = now, window_seconds, limit
        self.refused = False

    def __call__(self, value: Any) -> Window:
        start, count = _current(value, self.now, self.window_seconds)
        self.refused = count >= self.limit
        return [start, count if self.refused else count + 1]


class _Uncount:
    """The update giving back one count taken in the window that started at `start`."""

    def __init__(self, start: float) -> None:
        self.start = start

    def __call__(self, value: Any) -> Window | None:
        if not (isinstance(value, list) and len(value) == 2 and value[0] == self.start):
            return value  # that window is over (or gone): nothing to give back
        return [value[0], max(int(value[1]) - 1, 0)]
