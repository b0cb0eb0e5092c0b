"""Connections from accept to an inbound worker: the choice, the handoff, its answer.

- Choice: the READY inbound worker of the serving generation with the lowest load
  (reported sessions + handoffs not yet acknowledged) whose channel works.
- Handoff: `hand` chooses the worker (the choice counts in its load at once); `flush`,
  at the end of the loop iteration that accepted them, sends each worker its new
  connections as one `messages.Conn` + their sockets over its SEQPACKET channel
  (SCM_RIGHTS; up to frames.MAX_FDS per frame): one sendmsg for a burst of accepts.
  The master keeps its copies until the worker answers `Took` (it owns those sockets:
  the copies are closed) or `Refused` (the kernel dropped those descriptors at the
  worker's fd limit: the master answers 421 4.3.2 and closes each). A full channel
  means "try the next worker" for the whole frame. A send that fails otherwise (EPIPE,
  ECONNRESET, ENOTCONN...) means the worker is dead or dying: its channel is marked
  lost, it is never chosen again (the arbiter reaps it, or SIGKILLs it), and its
  pending connections and these go to another worker.
- Sockets are bare descriptors here: the arbiter accepts with socket._accept(), since
  socket.socket(fileno=...) costs a getsockname per connection the master never needs.
- Orphans: connections no worker could take yet (none READY, every channel full, or
  rehanded from a lost worker); handed again at each housekeeping tick.
- Expiry: a handoff unacknowledged for HANDOFF_TIMEOUT_SECONDS is closed and logged
  (the worker may own it already: handing it elsewhere could serve it twice).
- Admission (admission.py): beyond [limits] max_sessions (all loads + orphans) or when
  the least-loaded worker is at max_sessions_per_worker, the master answers 421 4.3.2.

Invariant: every accepted socket is in exactly one place: a Child's pending map (sent,
or to be sent by the next flush), the orphan queue, a worker (after `Took`), or
refused/expired (counted and logged).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable

from mta import frames, logs, messages
from mta.master.admission import Admission
from mta.master.children import Child, ChildState, Handoff

INBOUND = "inbound"
HANDOFF_TIMEOUT_SECONDS = 5.0


class Dispatcher:
    def __init__(self, children: dict[int, Child], serving_generation: Callable[[], int],
                 wake: Callable[[], None]) -> None:
        self._children = children  # the arbiter's map, shared
        self._serving_generation = serving_generation
        self._wake = wake  # housekeeping wanted now (orphans to hand, a pause to end)
        self.orphans: collections.deque[tuple[str, int]] = collections.deque()  # (listener, fd)
        self.admission = Admission()
        self._next_conn_id = 0
        self._unsent: list[Child] = []  # children with connections for the next flush
        self._not_now: set[int] = set()  # pids whose channel took no frame in this flush

    def hand(self, address: str, fd: int) -> None:
        """Admit the connection and choose its worker; it leaves with the next flush()."""
        caps = self.admission.caps
        if self.admission.drained:  # `mta node drain`: open sessions go on, new ones go elsewhere
            self._refuse(address, fd, "node_drained")
            return
        if self._total_load() >= caps.total:
            self._refuse(address, fd, "max_sessions")
            return
        child = self.least_loaded(exclude=self._not_now)
        if child is None:
            self.orphans.append((address, fd))
            self._wake()
            return
        if child.load >= caps.per_worker:  # the least loaded is full: all are
            self._refuse(address, fd, "max_sessions_per_worker")
            return
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        child.pending[conn_id] = Handoff(address, fd, time.monotonic())
        if not child.unsent:
            self._unsent.append(child)
        child.unsent.append(conn_id)

    def flush(self) -> None:
        """Send every child its connections handed since the last flush: one frame per
        frames.MAX_FDS. Those a child's channel cannot take (full, or broken) are handed
        again, never to that child in this flush."""
        while self._unsent:
            child = self._unsent.pop()
            while child.unsent:
                ids = child.unsent[:frames.MAX_FDS]
                handoffs = [child.pending[conn_id] for conn_id in ids]
                conn = messages.Conn(tuple((conn_id, h.listener) for conn_id, h in zip(ids, handoffs)))
                try:
                    sent = frames.send_frame(child.channel, conn, [h.fd for h in handoffs])
                    error = None
                except OSError as exc:  # the channel is broken: the worker is dead or dying
                    sent, error = False, exc.strerror or type(exc).__name__
                if sent:
                    del child.unsent[:len(ids)]
                    continue
                self._not_now.add(child.pid)  # full (it is not keeping up), or lost
                unsent = [child.pending.pop(conn_id) for conn_id in child.unsent]
                child.unsent.clear()
                if error is not None:
                    self.channel_lost(child, error)  # (what it was sent before: to the orphans)
                for handoff in unsent:
                    self.hand(handoff.listener, handoff.fd)
        self._not_now.clear()

    def least_loaded(self, exclude: set[int] | frozenset[int] = frozenset()) -> Child | None:
        ready = [c for c in self._children.values()
                 if c.state is ChildState.READY and c.kind == INBOUND and not c.channel_lost_at
                 and c.pid not in exclude]
        if not ready:
            return None
        serving = [c for c in ready if c.generation == self._serving_generation()]
        return min(serving or ready, key=lambda c: c.load)

    def hand_orphans(self) -> None:
        # Each once per pass: one that every full channel refused goes back to the orphans
        # (looping until none is left would spin while the workers' channels stay full).
        for _ in range(len(self.orphans)):
            if self.least_loaded() is None:
                return
            address, fd = self.orphans.popleft()
            self.hand(address, fd)
        self.flush()

    def on_answer(self, child: Child, answer: messages.Took | messages.Refused) -> None:
        """The worker's answer to some of its pending handoffs."""
        child.active = answer.active
        took = isinstance(answer, messages.Took)
        for conn_id in answer.ids:
            handoff = child.pending.pop(conn_id, None)
            if handoff is None:  # expired meanwhile, or rehanded after a channel error
                continue
            if took:
                os.close(handoff.fd)
                self._fd_freed()
            else:
                self._refuse(handoff.listener, handoff.fd, "fd_limit")

    def channel_lost(self, child: Child, error: str | None = None) -> None:
        """The child's channel closed (error None: it is exiting) or a send to it failed:
        hand it nothing more; its pending connections go to the others."""
        if child.channel_lost_at:
            return
        child.channel_lost_at = time.monotonic()
        rehanded = len(child.pending)
        self.orphans.extend(child.take_pending())
        self._wake()
        if error is not None:
            logs.event("channel_lost", child=child.title, child_pid=child.pid, error=error,
                       rehanded=rehanded or None)

    def expire(self, now: float) -> None:
        for child in self._children.values():
            for _ in range(child.expire_pending(now, HANDOFF_TIMEOUT_SECONDS)):
                self.admission.expired.add(child=child.title)
                self._fd_freed()

    def accept_failed(self, listener: str, exc: OSError) -> None:
        self.admission.accept_failed(listener, exc, time.monotonic())
        self._wake()  # unregister the listeners now

    def _total_load(self) -> int:
        """Sessions of every inbound worker, handoffs in flight and orphans: what max_sessions caps."""
        return sum(c.load for c in self._children.values() if c.kind == INBOUND) + len(self.orphans)

    def _refuse(self, listener: str, fd: int, reason: str) -> None:
        self.admission.refuse(listener, fd, reason)
        self._fd_freed()

    def _fd_freed(self) -> None:
        if self.admission.backoff.fd_freed():
            self._wake()  # accept again now
