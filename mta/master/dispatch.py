"""Connections from accept to an inbound worker: the choice, the handoff, its answer.

- Choice: the READY inbound worker of the serving generation with the lowest load
  (reported sessions + handoffs not yet acknowledged) whose channel works.
- Handoff: a `messages.Conn` + the socket over the worker's SEQPACKET channel
  (SCM_RIGHTS). The master keeps its copy until the worker answers `Took` (it
  owns the socket: the copy is closed) or `Refused` (the kernel dropped the descriptor
  at the worker's fd limit: the master answers 421 4.3.2 and closes). A full channel
  means "try the next worker". A send that fails otherwise (EPIPE, ECONNRESET,
  ENOTCONN...) means the worker is dead or dying: its channel is marked lost, it is
  never chosen again (the arbiter reaps it, or SIGKILLs it), and its pending
  connections and this one go to another worker.
- Orphans: connections no worker could take yet (none READY, every channel full, or
  rehanded from a lost worker); handed again at each housekeeping tick.
- Expiry: a handoff unacknowledged for HANDOFF_TIMEOUT_SECONDS is closed and logged
  (the worker may own it already: handing it elsewhere could serve it twice).
- Admission (admission.py): beyond [limits] max_sessions (all loads + orphans) or when
  the least-loaded worker is at max_sessions_per_worker, the master answers 421 4.3.2.

Invariant: every accepted socket is in exactly one place: a Child's pending map, the
orphan queue, a worker (after `Took`), or refused/expired (counted and logged).
"""

from __future__ import annotations

import collections
import socket
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
        self.orphans: collections.deque[tuple[str, socket.socket]] = collections.deque()
        self.admission = Admission()
        self._next_conn_id = 0

    def hand(self, address: str, conn: socket.socket) -> None:
        caps = self.admission.caps
        if self.admission.drained:  # `mta node drain`: open sessions go on, new ones go elsewhere
            self._refuse(address, conn, "node_drained")
            return
        if self._total_load() >= caps.total:
            self._refuse(address, conn, "max_sessions")
            return
        tried: set[int] = set()
        while True:
            child = self.least_loaded(exclude=tried)
            if child is None:
                self.orphans.append((address, conn))
                self._wake()
                return
            if child.load >= caps.per_worker:  # the least loaded is full: all are
                self._refuse(address, conn, "max_sessions_per_worker")
                return
            conn_id = self._next_conn_id
            self._next_conn_id += 1
            try:
                sent = frames.send_frame(child.channel, messages.Conn(conn_id, address), [conn.fileno()])
            except OSError as exc:  # the channel is broken: the worker is dead or dying
                self.channel_lost(child, exc.strerror or type(exc).__name__)
                sent = False
            if sent:
                child.pending[conn_id] = Handoff(address, conn, time.monotonic())
                return
            tried.add(child.pid)  # its channel is full (it is not keeping up) or broken

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
            address, conn = self.orphans.popleft()
            self.hand(address, conn)

    def on_answer(self, child: Child, answer: messages.Took | messages.Refused) -> None:
        """The worker's answer to one of its pending handoffs."""
        handoff = child.pending.pop(answer.id, None)
        child.active = answer.active
        if handoff is None:  # expired meanwhile, or rehanded after a channel error
            return
        if isinstance(answer, messages.Took):
            handoff.conn.close()
            self._fd_freed()
        else:
            self._refuse(handoff.listener, handoff.conn, "fd_limit")

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

    def _refuse(self, listener: str, conn: socket.socket, reason: str) -> None:
        self.admission.refuse(listener, conn, reason)
        self._fd_freed()

    def _fd_freed(self) -> None:
        if self.admission.backoff.fd_freed():
            self._wake()  # accept again now
