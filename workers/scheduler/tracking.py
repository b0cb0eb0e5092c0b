"""The scheduler's view of the queue: the messages it tracks, their timers and running counts.

Owns: `messages` (every envelope not finished, loaded from the spool at start, added by
New and by the rescan), `busy` (per message, the recipient indices in a queued job or
a session's: never queued twice), the retry timers and the one wake-up they arm, the
gauges' running counts (tally.py: `tally`, `arrivals`, and `carried`: the recipient
indices in the jobs the sessions carry now, a multiset), and the jobs' numbering.
Recipients in flight when a process died are simply `ready` again (in-flight state is
never persisted); deferred ones get a timer.

Invariants: every change of a tracked recipient's state, or of whether a session
carries it, goes through `_recounting` or `_count`, so the gauges read the running
counts only. The base of Scheduler's mixins (main.py): the hooks below are theirs
(`_schedule_dispatch`: dispatch.py; `_delete_later`, `_being_deleted`: flush.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mta import logs, metrics
from mta.config import Config
from mta.queueops import FINAL_STATES, destination_of
from mtaqueue.backend import QueueBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope
from workers.scheduler.plan import Destination, Job, Limits, Plan
from workers.scheduler.tally import TOP_DESTINATIONS, Arrivals, Tally


class Tracking:
    config: Config
    backend: QueueBackend

    def _init_tracking(self) -> None:
        self.plan = Plan()
        self.messages: dict[MessageId, Envelope] = {}
        self.busy: dict[MessageId, set[int]] = {}
        self.timers: list[tuple[float, MessageId]] = []
        self.tally = Tally()
        self.arrivals = Arrivals()
        self.carried: dict[MessageId, Counter[int]] = {}
        self.destination_gauges: dict[str, Any] = {"top": [], "other": [0, 0, 0]}
        self._jobs = itertools.count(1)
        self._wake: asyncio.Handle | None = None
        self._wake_at = 0.0

    def _schedule_dispatch(self) -> None:
        """Run a dispatch round soon (dispatch.py)."""
        raise NotImplementedError

    def _delete_later(self, msgid: MessageId) -> None:
        """Delete it from the spool in the next write (flush.py)."""
        raise NotImplementedError

    def _being_deleted(self, msgid: MessageId) -> bool:
        """Its delete is pending or being written (flush.py)."""
        raise NotImplementedError

    def _rescan(self, now: float) -> None:
        """Messages in the due index but not tracked: their New was lost (e.g. sent while
        this process was restarting)."""
        found = [m for m in self.backend.due(now, 1_000_000) if m not in self.messages]
        if found:
            logs.event("rescan_found", messages=len(found))
            self._on_new(found)

    def _load(self, now: float) -> int:
        count = 0
        for envelope in self.backend.envelopes():
            if envelope.id not in self.messages:
                self._track(envelope, now)
                count += 1
        return count

    def _on_new(self, ids: Iterable[str]) -> None:
        now = time.time()
        for raw in ids:
            msgid = MessageId(raw)
            # A finished message stays in the spool until its delete is committed: a rescan
            # that finds it then must not deliver it again.
            if msgid in self.messages or self._being_deleted(msgid):
                continue
            envelope = self.backend.envelope(msgid)
            if envelope is not None:
                self._track(envelope, now)
        self._schedule_dispatch()

    def _track(self, envelope: Envelope, now: float) -> None:
        """Start tracking a message. One tracked already keeps its copy: a rescan may find
        a bounce in the spool before the flush that wrote it resumes to track it."""
        if envelope.id in self.messages:
            return
        if all(r.state in FINAL_STATES for r in envelope.recipients):
            self._delete_later(envelope.id)  # finished but not deleted before a crash
            return
        if envelope.next_attempt > now and any(r.state == "deferred" for r in envelope.recipients):
            self._add_timer(envelope.next_attempt, envelope.id)
        else:
            for r in envelope.recipients:
                if r.state == "deferred":
                    r.state = "ready"
        self.messages[envelope.id] = envelope
        self.arrivals.push(envelope.arrival, envelope.id)
        self._count(envelope, range(len(envelope.recipients)), +1)
        self._enqueue(envelope)

    def _forget(self, msgid: MessageId) -> None:
        """Stop tracking a message (finished, or deleted by an operator)."""
        envelope = self.messages.pop(msgid)
        self._count(envelope, range(len(envelope.recipients)), -1)

    # Every change of a tracked recipient's state, or of whether a session carries it,
    # goes through _recounting or _count: the gauges read the running counts only.

    def _count(self, envelope: Envelope, indices: Iterable[int], sign: int) -> None:
        self.tally.add_recipients(envelope, indices, self.carried.get(envelope.id, ()), sign)

    @contextlib.contextmanager
    def _recounting(self, envelope: Envelope | None, indices: Sequence[int] | None = None) -> Iterator[None]:
        """Recipient states of `envelope` (these `indices`, default all) change inside the block."""
        if envelope is None or self.messages.get(envelope.id) is not envelope:
            yield  # not tracked: not counted
            return
        which = range(len(envelope.recipients)) if indices is None else indices
        before = self.tally.states(envelope, which, self.carried.get(envelope.id, ()))
        yield
        self.tally.changed(envelope, which, before, self.carried.get(envelope.id, ()))

    def _carry(self, job: Job) -> None:
        """A session carries `job` now: its ready recipients count as active."""
        with self._recounting(self.messages.get(job.msgid), job.rcpts):
            self.carried.setdefault(job.msgid, Counter()).update(job.rcpts)

    def _uncarry(self, job: Job) -> None:
        """A session's job is over (answered, or it will not run)."""
        with self._recounting(self.messages.get(job.msgid), job.rcpts):
            left = self.carried[job.msgid]
            left.subtract(job.rcpts)
            left += Counter()  # drop the zeros
            if not left:
                del self.carried[job.msgid]

    def _enqueue(self, envelope: Envelope) -> None:
        busy = self.busy.get(envelope.id, set())
        by_dest: dict[str, list[int]] = {}
        for i, r in enumerate(envelope.recipients):
            if r.state == "ready" and i not in busy:
                by_dest.setdefault(destination_of(r.address), []).append(i)
        for dest, rcpts in by_dest.items():
            priority = max(envelope.priority, self.config.domain(dest).priority)
            job = Job(next(self._jobs), envelope.id, dest, tuple(rcpts), priority, envelope.arrival)
            self.busy.setdefault(envelope.id, set()).update(rcpts)
            self.plan.add(job, self._limits(dest))

    def _limits(self, dest: str) -> Limits:
        d, o = self.config.delivery, self.config.domain(dest)
        return Limits(
            concurrency=o.concurrency or d.concurrency,
            initial_concurrency=d.initial_concurrency,
            max_messages_per_connection=o.max_messages_per_connection or d.max_messages_per_connection,
            max_messages_per_second=o.max_messages_per_second if o.max_messages_per_second is not None
            else d.max_messages_per_second,
        )

    def _add_timer(self, when: float, msgid: MessageId) -> None:
        heapq.heappush(self.timers, (when, msgid))
        self._arm_wake(when)

    def _arm_wake(self, when: float) -> None:
        # The deadline is kept here: uvloop's call_later returns a Handle without
        # .when() for delays under a millisecond.
        if self._wake is not None and self._wake_at <= when:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = when
        self._wake = asyncio.get_running_loop().call_later(max(0.0, when - time.time()), self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        now = time.time()
        while self.timers and self.timers[0][0] <= now:
            _when, msgid = heapq.heappop(self.timers)
            envelope = self.messages.get(msgid)
            if envelope is None or envelope.next_attempt > now:
                continue  # deleted, or rescheduled to later (a later timer exists)
            with self._recounting(envelope):
                for r in envelope.recipients:
                    if r.state == "deferred":
                        r.state = "ready"
            self._enqueue(envelope)
        if self.timers:
            self._arm_wake(self.timers[0][0])
        self._schedule_dispatch()

    def _update_gauges(self, now: float) -> None:
        """O(destinations): the counts are kept at every state change (tally.py), never walked."""
        for state, count in self.tally.totals.items():
            metrics.QUEUE_RECIPIENTS.labels(state).set(count)
        metrics.QUEUE_MESSAGES.set(len(self.messages))
        oldest = self.arrivals.oldest(self.messages)
        metrics.QUEUE_OLDEST_SECONDS.set(0.0 if oldest is None else now - oldest)
        stats = self.backend.stats()
        metrics.QUEUE_BYTES.set(stats.used_bytes)
        metrics.QUEUE_LIMIT_BYTES.set(stats.max_bytes)
        metrics.QUEUE_MAP_BYTES.set(stats.map_bytes)
        metrics.QUEUE_MAP_USED_BYTES.set(stats.map_used_bytes)
        self.destination_gauges = self._destination_snapshot()

    def _destination_snapshot(self) -> dict[str, Any]:
        """The top destinations by queued recipients, for the control process to render at
        each scrape (metrics.render_destinations): rows [name, ready, active, deferred,
        open sessions, window], and the ready/active/deferred sums of the others."""
        top, other = self.tally.top(TOP_DESTINATIONS)
        rows = []
        for name, counts in top:
            dest = self.plan.destinations.get(name)
            if dest is None:  # nothing ready yet: the window it would start with
                dest = Destination(name, self._limits(name))
            rows.append([name, counts["ready"], counts["active"], counts["deferred"], dest.in_flight, dest.limit])
        return {"top": rows, "other": [other["ready"], other["active"], other["deferred"]]}
