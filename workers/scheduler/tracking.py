"""The scheduler's view of the queue: the bounded active set, how messages enter and leave it, the counts.

Owns: `messages` (the active set: every message with a ready recipient or a job in the
plan or a session, and those whose write is pending; at most [queue] active_limit, plus
active_reserve for messages above the default priority), `on_disk` (each tracked
message's recipient states as the spool has them: as loaded, then as last written),
`busy` (per message, the recipient indices in a queued job or a session's: never
queued twice), the scan `mark`, the retry timers of tracked messages and the one
wake-up they arm, the running counts (tally.py: `tally` the live states, `spooled`
the on-disk states of the same messages), and the jobs' numbering.

Everything else stays in the spool: deferred messages (indexed by next attempt: the
due index), held ones, and due ones for which there is no room yet. They enter the
active set by New (inbound, after each commit: loaded at once when there is room) or
by the scan, which reads the due index from `mark` up to now and loads while there is
room. `mark` only moves forward past keys it has handled; whatever could put an
untracked due entry below it lowers it (a New with no room, a retried or released
message, a bounce, a restart: 0). A pass from the start every RESCAN_SECONDS (main.py)
is the safety net; it reads due entries only (at most the active set plus what it
loads), never the deferred future. A message whose recipients are all deferred or held
leaves the active set once its write is on disk (`_evict`, called by flush.py). A
message the scan loads may be due its delay notice (`_check_delay`: flush.py).

Counts: the gauges are the spool's counts (kept in each write transaction: mtaqueue)
minus `spooled` plus `tally`: exact for every message, tracked or not, whenever no
write is in flight. Recipients in flight when a process died are simply `ready` again
(in-flight state is never persisted); deferred ones of a tracked message get a timer.

Invariants: every change of a tracked recipient's state, or of whether a session
carries it, goes through `_recounting` or `_count` (per job, `_carry`, `_uncarry` and
flush.py's `_settle` count the same way inline); `on_disk` and `spooled` change
together (`_set_on_disk`). The base of Scheduler's mixins (main.py): the hooks below
are theirs (`_schedule_dispatch`: dispatch.py; `_delete_later`, `_write_pending`,
`_check_delay`: flush.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mta import logs, metrics
from mta.config import Config
from mta.queueops import FINAL_STATES, destination_of
from mtaqueue.backend import QueueBackend
from mtaqueue.ids import MessageId, is_id
from mtaqueue.records import Envelope
from workers.scheduler.plan import Destination, Job, Limits, Plan
from workers.scheduler.tally import TOP_DESTINATIONS, Tally

SCAN_BATCH = 500  # due entries read per read transaction by the scan
RULES_KEPT = 4096  # destinations whose Limits and priority are kept (_rules); more: made again


class Tracking:
    config: Config
    backend: QueueBackend

    _loop: asyncio.AbstractEventLoop | None = None  # the first one running (_event_loop)

    def _init_tracking(self) -> None:
        self.plan = Plan()
        self.messages: dict[MessageId, Envelope] = {}
        self.on_disk: dict[MessageId, tuple[tuple[str, str], ...]] = {}
        self.busy: dict[MessageId, set[int]] = {}
        self.timers: list[tuple[float, MessageId]] = []
        self.tally = Tally()
        self.spooled = Tally()
        self.carried: dict[MessageId, dict[int, int]] = {}  # per message: recipient index -> sessions' jobs carrying it
        self.destination_gauges: dict[str, Any] = {"top": [], "other": [0, 0, 0]}
        self.mark = b""  # due entries below it are tracked or handled (the scan starts here)
        self.backlog = False  # the last scan stopped for want of room: due mail waits in the spool
        self._jobs = itertools.count(1)
        self._wake: asyncio.Handle | None = None
        self._wake_at = 0.0
        self._scan_soon: asyncio.Handle | None = None
        self._rules_config: Config | None = None  # the configuration _rules_of was made from
        self._rules_of: dict[str, tuple[Limits, int]] = {}

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the scheduler runs on, asked for once: each asyncio.get_running_loop()
        costs a getpid() system call on Python 3.11. RuntimeError when none runs yet."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _schedule_dispatch(self) -> None:
        """Run a dispatch round soon (dispatch.py)."""
        raise NotImplementedError

    def _delete_later(self, msgid: MessageId) -> None:
        """Delete it from the spool in the next write (flush.py)."""
        raise NotImplementedError

    def _write_pending(self, msgid: MessageId) -> bool:
        """A write of it (update or delete) is pending or being written (flush.py)."""
        raise NotImplementedError

    def _check_delay(self, envelope: Envelope, now: float) -> None:
        """A message the scan loaded: its delay notice if one is due, and its write (flush.py)."""
        raise NotImplementedError

    # --- room -----------------------------------------------------------------------------

    def _room_for(self, priority: int) -> bool:
        """Room in the active set for a message of `priority` (above 0: the reserve too)."""
        limit = self.config.queue.active_limit
        if priority > 0:
            limit += self.config.queue.active_reserve
        return len(self.messages) < limit

    def _lower_mark(self, key: bytes) -> None:
        """An untracked due entry at `key`: the next scan starts there at the latest."""
        if key < self.mark:
            self.mark = key
        self.backlog = True

    # --- entering the active set ------------------------------------------------------------

    def _on_new(self, ids: Iterable[str]) -> None:
        """Committed by an inbound worker: tracked at once when there is room."""
        now = time.time()
        # A finished message stays in the spool until its delete is committed: a scan
        # that finds it then must not deliver it again.
        wanted = [msgid for msgid in map(MessageId, ids)
                  if is_id(msgid) and msgid not in self.messages and not self._write_pending(msgid)]
        for msgid, envelope in zip(wanted, self.backend.envelopes_of(wanted)):  # one read for the New
            if envelope is None or msgid in self.messages:  # (an id twice in one New: tracked once)
                continue
            if self._room_for(envelope.priority):
                self._track(envelope, now)
            elif self._due(envelope, now):
                self._lower_mark(self.backend.due_key(envelope))
        self._schedule_dispatch()

    def _scan(self, start: bytes | None = None) -> int:
        """Load due messages from the due index, from `start` (default: the mark) up to now,
        while there is room; returns how many were loaded. Sleeps until the next entry."""
        now = time.time()
        key = self.mark if start is None else min(start, self.mark)
        loaded, self.backlog = 0, False
        full = False
        while not full:
            entries = self.backend.due_from(key, now, SCAN_BATCH)
            for key, msgid in entries:
                if msgid in self.messages or self._write_pending(msgid):
                    continue
                if not self._room_for(0):  # (the reserve is for New: the scan goes in due order)
                    full = True
                    break
                envelope = self.backend.envelope(msgid)
                if envelope is not None and self._due(envelope, now):
                    self._track(envelope, now)
                    loaded += 1
                    if not envelope.warned and envelope.sender and envelope.id in self.messages:
                        self._check_delay(envelope, now)  # queued long enough for its delay notice?
            else:
                if len(entries) < SCAN_BATCH:
                    break
                key = entries[-1][0] + b"\x00"  # just past the last one read
        if full:
            self.mark, self.backlog = key, True  # the scan goes on from here when room is made
        else:
            self.mark = self.backend.due_floor(now)  # every due entry up to now is tracked or handled
            next_due = self.backend.next_due(self.mark)
            if next_due is not None:
                self._arm_wake(next_due)
        if loaded:
            self._schedule_dispatch()
        return loaded

    @staticmethod
    def _due(envelope: Envelope, now: float) -> bool:
        return envelope.next_attempt <= now and any(r.state in ("ready", "deferred") for r in envelope.recipients)

    def _track(self, envelope: Envelope, now: float) -> None:
        """Start tracking a message read from the spool. One tracked already keeps its copy:
        a scan may find a bounce in the spool before the flush that wrote it tracks it."""
        if envelope.id in self.messages:
            return
        states = [r.state for r in envelope.recipients]  # (one walk, then C: once per message)
        if FINAL_STATES.issuperset(states):
            self._delete_later(envelope.id)  # finished but not deleted before a crash
            return
        self._set_on_disk(envelope.id, self._disk_states(envelope))
        if envelope.next_attempt > now and "deferred" in states:
            self._add_timer(envelope.next_attempt, envelope.id)
        else:
            for r in envelope.recipients:
                if r.state == "deferred":
                    r.state = "ready"
        self.messages[envelope.id] = envelope
        self._count(envelope, range(len(envelope.recipients)), +1)
        self._enqueue(envelope)

    # --- leaving it -----------------------------------------------------------------------

    def _forget(self, msgid: MessageId) -> None:
        """Stop tracking a message (finished, deleted by an operator, or evicted)."""
        envelope = self.messages.pop(msgid)
        self._count(envelope, range(len(envelope.recipients)), -1)
        self._arm_scan()

    def _evict(self, msgid: MessageId) -> None:
        """After its write: a tracked message with nothing to send now (every recipient
        deferred, held or final, no job) goes back to the spool only; the scan brings it
        back when it is due."""
        envelope = self.messages.get(msgid)
        if (envelope is None or self.busy.get(msgid) or self._write_pending(msgid)
                or any(r.state == "ready" for r in envelope.recipients)):
            return
        self._forget(msgid)
        self._set_on_disk(msgid, None)
        if any(r.state == "deferred" for r in envelope.recipients):
            key = self.backend.due_key(envelope)
            if key < self.mark or envelope.next_attempt <= time.time():
                self._lower_mark(key)  # due already (a short back-off): the next scan takes it
                self._arm_scan()
            else:
                self._arm_wake(envelope.next_attempt)

    def _set_on_disk(self, msgid: MessageId, states: Sequence[tuple[str, str]] | None) -> None:
        """What the spool holds for a tracked message now: (destination, state) per
        recipient; None once the spool no longer counts it for us (untracked, or deleted)."""
        old = self.on_disk.pop(msgid, None)
        for dest, state in old or ():
            self.spooled.add(dest, state, -1)
        for dest, state in states or ():
            self.spooled.add(dest, state, +1)
        if states is not None:
            self.on_disk[msgid] = tuple(states)

    @staticmethod
    def _disk_states(envelope: Envelope) -> list[tuple[str, str]]:
        return [(destination_of(r.address), r.state) for r in envelope.recipients]

    def _arm_scan(self) -> None:
        """Room was made: if due mail waits in the spool, scan for it on the loop's next turn
        (one scan for all the departures of this turn)."""
        if self.backlog and self._scan_soon is None:
            with contextlib.suppress(RuntimeError):  # no loop: a test driving the scheduler by hand
                self._scan_soon = self._event_loop().call_soon(self._scan_now)

    def _scan_now(self) -> None:
        self._scan_soon = None
        self._scan()

    # --- counting -------------------------------------------------------------------------

    # Every change of a tracked recipient's state, or of whether a session carries it,
    # goes through _recounting or _count: the gauges read the running counts only. The
    # per-job paths (_carry, _uncarry, Outcomes._settle) do the same without a context
    # manager: a contextmanager and Counter arithmetic per job were a tenth of the CPU.

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
        """A session carries `job` now: its ready recipients count as active. (Per job
        given: the counts move directly, a recipient at a time, without _recounting.)"""
        carried = self.carried.get(job.msgid)
        if carried is None:
            carried = self.carried[job.msgid] = {}  # (a dict: a Counter() is two Python calls to make)
        envelope = self.messages.get(job.msgid)
        for i in job.rcpts:
            n = carried.get(i, 0)
            carried[i] = n + 1
            if not n and envelope is not None and envelope.recipients[i].state == "ready":
                self.tally.move(job.dest, "ready", "active")  # a job's recipients are all of job.dest

    def _uncarry(self, job: Job) -> None:
        """A session's job is over (answered, or it will not run)."""
        carried = self.carried[job.msgid]
        envelope = self.messages.get(job.msgid)
        for i in job.rcpts:
            n = carried.pop(i, 0) - 1
            if n > 0:
                carried[i] = n
            elif not n and envelope is not None and envelope.recipients[i].state == "ready":
                self.tally.move(job.dest, "active", "ready")
        if not carried:
            del self.carried[job.msgid]

    def queue_counts(self) -> Tally:
        """Recipients per destination and state, and in total, of the whole queue: the
        spool's counts, with the tracked messages as the scheduler sees them (ready
        instead of deferred once due, active in a session's job)."""
        by_dest = self.backend.destination_counts()
        for tally, sign in ((self.spooled, -1), (self.tally, +1)):
            for dest, counts in tally.by_dest.items():
                row = by_dest.setdefault(dest, {})
                for state, n in counts.items():
                    row[state] = row.get(state, 0) + sign * n
        return Tally.of(by_dest)

    # --- jobs and timers -------------------------------------------------------------------

    def _enqueue(self, envelope: Envelope) -> None:
        busy = self.busy.get(envelope.id, ())
        by_dest: dict[str, list[int]] = {}
        for i, r in enumerate(envelope.recipients):
            if r.state == "ready" and i not in busy:
                by_dest.setdefault(destination_of(r.address), []).append(i)
        if not by_dest:
            return
        busy = self.busy.setdefault(envelope.id, set())
        for dest, rcpts in by_dest.items():
            limits, dest_priority = self._rules(dest)
            priority = max(envelope.priority, dest_priority)
            job = Job(next(self._jobs), envelope.id, dest, tuple(rcpts), priority, envelope.arrival)
            busy.update(rcpts)
            self.plan.add(job, limits)

    def _rules(self, dest: str) -> tuple[Limits, int]:
        """The destination's Limits and [domain] priority, made once per configuration
        (a reload replaces self.config) rather than per job."""
        if self._rules_config is not self.config or len(self._rules_of) >= RULES_KEPT:
            self._rules_config, self._rules_of = self.config, {}
        rules = self._rules_of.get(dest)
        if rules is None:
            rules = self._rules_of[dest] = (self._limits(dest), self.config.domain(dest).priority)
        return rules

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
        self._wake = self._event_loop().call_later(max(0.0, when - time.time()), self._on_wake)

    def _on_wake(self) -> None:
        """Timers of tracked messages, and the scan for entries of the due index that came due."""
        self._wake = None
        now = time.time()
        while self.timers and self.timers[0][0] <= now:
            _when, msgid = heapq.heappop(self.timers)
            envelope = self.messages.get(msgid)
            if envelope is None or envelope.next_attempt > now:
                continue  # gone (it comes back through the scan), or rescheduled to later
            with self._recounting(envelope):
                for r in envelope.recipients:
                    if r.state == "deferred":
                        r.state = "ready"
            self._enqueue(envelope)
        if self.timers:
            self._arm_wake(self.timers[0][0])
        self._scan()
        self._schedule_dispatch()

    # --- gauges ---------------------------------------------------------------------------

    def _update_gauges(self, now: float) -> None:
        """From the spool's counts and the running ones: O(destinations), never a walk."""
        counts = self.queue_counts()
        for state, count in counts.totals.items():
            metrics.QUEUE_RECIPIENTS.labels(state).set(count)
        metrics.QUEUE_MESSAGES.set(self.backend.totals().get("messages", 0))
        metrics.QUEUE_ACTIVE_MESSAGES.set(len(self.messages))
        oldest = self.backend.oldest_arrival()
        metrics.QUEUE_OLDEST_SECONDS.set(0.0 if oldest is None else max(0.0, now - oldest))
        stats = self.backend.stats()
        metrics.QUEUE_BYTES.set(stats.used_bytes)
        metrics.QUEUE_LIMIT_BYTES.set(stats.max_bytes)
        metrics.QUEUE_MAP_BYTES.set(stats.map_bytes)
        metrics.QUEUE_MAP_USED_BYTES.set(stats.map_used_bytes)
        self.destination_gauges = self._destination_snapshot(counts)

    def _destination_snapshot(self, counts: Tally) -> dict[str, Any]:
        """The top destinations by queued recipients, for the control process to render at
        each scrape (metrics.render_destinations): rows [name, ready, active, deferred,
        open sessions, window], and the ready/active/deferred sums of the others."""
        top, other = counts.top(TOP_DESTINATIONS)
        rows = []
        for name, counts in top:
            dest = self.plan.destinations.get(name)
            if dest is None:  # nothing ready yet: the window it would start with
                dest = Destination(name, self._limits(name))
            rows.append([name, counts["ready"], counts["active"], counts["deferred"], dest.in_flight, dest.limit])
        return {"top": rows, "other": [other["ready"], other["active"], other["deferred"]]}
