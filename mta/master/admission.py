"""Admission control in the master: session caps, the too-busy refusal, the accept back-off.

- Caps: `[limits] max_sessions` (every inbound worker together) and
  `max_sessions_per_worker`; 0 (the default) derives them from the fd limit, which
  mta/serve.py lifts to the hard limit before anything forks (children inherit it):
  per worker (RLIMIT_NOFILE - FD_RESERVE) // FDS_PER_SESSION, in all inbound_workers
  times that. FD_RESERVE is what a worker holds besides its sessions (about 30 measured:
  spool and cache LMDB files, metrics files, channel, event loop, logs, scheduler
  socket) with room for more; FDS_PER_SESSION = 2 leaves a second descriptor per session
  for its DNS (DNSBL) queries. The master holds a connection only from accept until the
  worker's acknowledgement (milliseconds), so it needs no share of its own.
- Refusal: the master enforces both caps, because it alone sees every worker's load
  (reported sessions + handoffs not yet acknowledged) and the orphan queue. Beyond a cap
  it writes `421 4.3.2` itself and closes: one send into the empty buffer of a fresh
  socket, which never blocks, and no descriptor travels to a worker that is short of
  them. On an smtps listener it closes without a reply (the client expects TLS first).
- Back-off: when accept fails for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM)
  the listeners are unregistered for 0.1 s, doubling to 1 s while it keeps failing;
  a descriptor the master frees ends the pause at once. Without it a readable listener
  whose accept fails spins the select loop.
- Node drain (`mta node drain`, through the control process): every new connection
  gets the same 421 4.3.2, open sessions go on; delivery is not touched.
- Tally: refusals and accept failures are logged at most once per second each, with a
  count, never once per event.

`Admission` holds the master's state for all this; no clock reads (pass `now`).
"""

from __future__ import annotations

import collections
import errno
import resource
import socket
from dataclasses import dataclass

from mta import logs, metrics
from mta.config import Config, LimitsConfig
from mta.smtp import replies

FD_RESERVE = 64
FDS_PER_SESSION = 2
FIRST_PAUSE_SECONDS = 0.1
MAX_PAUSE_SECONDS = 1.0
DRAIN_BYTES = 64 * 1024  # what a refused client may already have sent (a PROXY header)


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class SessionCaps:
    total: int  # sessions in every inbound worker + handoffs in flight + orphans
    per_worker: int


def session_caps(limits: LimitsConfig, inbound_workers: int, fds: int) -> SessionCaps:
    per_worker = limits.max_sessions_per_worker or max(1, (fds - FD_RESERVE) // FDS_PER_SESSION)
    return SessionCaps(limits.max_sessions or inbound_workers * per_worker, per_worker)


def refuse(fd: int, reply: bytes | None) -> None:
    """Answer (unless reply is None) and close a connection the master keeps for itself."""
    with socket.socket(fileno=fd) as conn:
        try:
            if reply is not None:
                conn.send(reply, socket.MSG_DONTWAIT)
            # Closing with unread input sends RST, which can destroy the reply before the
            # client reads it: take what is already there (at most a PROXY header) first.
            conn.recv(DRAIN_BYTES, socket.MSG_DONTWAIT)
        except OSError:
            pass  # nothing to read (EAGAIN), or the client reset or left: nobody to tell


class AcceptBackoff:
    """When accepting pauses and for how long; `until` is 0 while accepting."""

    def __init__(self) -> None:
        self.until = 0.0
        self.pause_seconds = 0.0

    def failed(self, now: float) -> None:
        self.pause_seconds = min(MAX_PAUSE_SECONDS, 2 * self.pause_seconds) if self.pause_seconds \
            else FIRST_PAUSE_SECONDS
        self.until = now + self.pause_seconds

    def accepted(self) -> None:
        """An accept worked: the next failure pauses for the shortest time again."""
        self.pause_seconds = 0.0

    def fd_freed(self) -> bool:
        """The master closed a descriptor: accept again now. True if it was paused."""
        paused, self.until = self.until > 0.0, 0.0
        return paused

    def paused(self, now: float) -> bool:
        return now < self.until


class Tally:
    """Occurrences of one event, logged at most once per `interval_seconds` with their count."""

    def __init__(self, event: str, count_field: str, interval_seconds: float = 1.0) -> None:
        self._event = event
        self._count_field = count_field
        self._interval = interval_seconds
        self._counts: collections.Counter[tuple[tuple[str, str], ...]] = collections.Counter()
        self._logged = float("-inf")

    def add(self, **fields: str) -> None:
        self._counts[tuple(fields.items())] += 1

    def flush(self, now: float, **extra: object) -> None:
        if not self._counts or now - self._logged < self._interval:
            return
        for key, count in self._counts.items():
            logs.event(self._event, **dict(key), **{self._count_field: count}, **extra)
        self._counts.clear()
        self._logged = now


class Admission:
    """The master's admission state: caps, the 421 it writes, the accept back-off, the tallies."""

    def __init__(self) -> None:
        self.caps = SessionCaps(0, 0)
        self.backoff = AcceptBackoff()
        self._too_busy = b""
        self._smtps: frozenset[str] = frozenset()
        self._accept_failures = Tally("accept_failed", "failures")
        self._refusals = Tally("too_busy", "refused")
        self.expired = Tally("handoff_expired", "connections")
        self.drained = False  # `mta node drain`: refuse every new connection

    def configure(self, config: Config) -> None:
        """At start and after each reload (workers, limits, hostname or listeners changed)."""
        fds = fd_limit()
        caps = session_caps(config.limits, config.server.inbound_workers, fds)
        if caps != self.caps:
            logs.event("admission", fd_limit=fds, max_sessions=caps.total, max_sessions_per_worker=caps.per_worker)
        self.caps = caps
        self._too_busy = replies.too_busy(config.server.hostname).wire
        self._smtps = frozenset(lst.address for lst in config.listener if lst.mode == "smtps")

    def refuse(self, listener: str, fd: int, reason: str) -> None:
        """421 4.3.2 and close (smtps: close); reason is the metric's (max_sessions...)."""
        refuse(fd, None if listener in self._smtps else self._too_busy)
        metrics.INBOUND_REJECTED.labels(reason, "4xx").inc()
        self._refusals.add(reason=reason)

    def accept_failed(self, listener: str, exc: OSError, now: float) -> None:
        error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        metrics.MASTER_ACCEPT_ERRORS.labels(error).inc()
        self._accept_failures.add(listener=listener, error=error)
        self.backoff.failed(now)

    def flush(self, now: float) -> None:
        self._accept_failures.flush(now, pause_seconds=self.backoff.pause_seconds)
        self._refusals.flush(now, max_sessions=self.caps.total, max_sessions_per_worker=self.caps.per_worker)
        self.expired.flush(now)
