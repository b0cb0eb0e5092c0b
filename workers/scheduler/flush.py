"""Outcomes applied in memory at once, written to the spool in batches by one writer thread.

`Outcomes._settle` applies one job's replies to its envelope (outcome.py's rules), logs
and counts them, and leaves the change pending (the common outcome, every recipient 2xx
and no success notice asked for, inline: `_settle_delivered`, the same result; delivered
recipients reach their counter and latency histogram once per event-loop turn);
`PendingWrites` owns the pending changes (envelopes to update, each a `snapshot` taken
at its change; ids to delete; notices to add) and writes them in one transaction
(backend.apply(): states, retry times, deletions and notices together), gathering for
FLUSH_GATHER_SECONDS first so one transaction carries many outcomes.
Notices (DSNs): failure and success from `settle`; the one delay notice of a message
is decided here when an attempt leaves it queued, and for a message loaded when due
(`_check_delay`, called by tracking.py), and written with the envelope marked `warned`.
A notice about a mailing list's copy (sender <list>-bounces@) goes to the list's owner.

Invariants: one flush round runs at a time, on one writer thread; a notice is tracked
(may be delivered) only once its transaction is over; an id being written stays in
`update`/`delete` or `writing`/`deleting` until its transaction is over, so a scan does
not load (and deliver again) a message whose change is not on disk yet. After each
round, the tracked messages written learn their new on-disk states, and those with
nothing to send now leave the active set (tracking.py `_evict`). `Outcomes` is a mixin of Scheduler (main.py) over the queue view
(tracking.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

from mta import logs, metrics
from mta.lists import bounces_owner
from mta.messages import Handoff
from mta.queueops import FINAL_STATES, destination_of
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from workers.scheduler.outcome import RecipientReply, RetryPolicy, delay_notice, settle
from workers.scheduler.plan import Job
from workers.scheduler.tally import counted_state
from workers.scheduler.tracking import Tracking

FLUSH_GATHER_SECONDS = 0.01
_ENVELOPE_VALUES = operator.attrgetter(*(f.name for f in dataclasses.fields(Envelope)))
_RECIPIENT_VALUES = operator.attrgetter(*(f.name for f in dataclasses.fields(Recipient)))
_IMMUTABLE = (str, int, float, bool, type(None))

Apply = Callable[[Sequence[Envelope], Sequence[MessageId], Sequence[NewMessage]], object]
Written = Callable[[list[Envelope], list[MessageId], list[NewMessage]], None]


class PendingWrites:
    """The changes not yet in the spool, and the rounds that write them."""

    def __init__(self, apply: Apply, on_written: Written) -> None:
        self._apply = apply  # in the writer thread: one transaction
        self._on_written = on_written  # on the event loop, after each round: what it wrote
        self.update: dict[MessageId, Envelope] = {}
        self.delete: set[MessageId] = set()
        self.writing: set[MessageId] = set()  # updates being committed right now
        self.deleting: set[MessageId] = set()  # deletes being committed right now
        self.add: list[NewMessage] = []
        self.flushing = False
        self.snapshots = 0  # flush rounds that have taken the pending changes
        self.written = 0  # flush rounds whose transaction is over
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="queue-writer")
        # Asked for once (each asyncio.get_running_loop(), ensure_future() or sleep() costs
        # a getpid() system call on Python 3.11); the round's task, referenced while it runs.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._round: asyncio.Task[None] | None = None

    def schedule(self) -> None:
        if not self.flushing:
            self.flushing = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._round = self._loop.create_task(self._flush())

    async def _flush(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while self.update or self.delete or self.add:
                # Outcomes arrive a few per millisecond under load: gathering them for a
                # moment makes one transaction (two fsyncs) carry many, not a handful.
                gathered: asyncio.Future[None] = loop.create_future()
                loop.call_later(FLUSH_GATHER_SECONDS, _wake, gathered)
                await gathered
                update = list(self.update.values())
                delete = list(self.delete)
                add = self.add
                self.update, self.delete, self.add = {}, set(), []
                self.snapshots += 1
                self.deleting.update(delete)
                self.writing.update(e.id for e in update)
                try:
                    await loop.run_in_executor(self._writer, self._apply, update, delete, add)
                finally:
                    self.deleting.difference_update(delete)
                    self.writing.difference_update(e.id for e in update)
                    self.written += 1
                self._on_written(update, delete, add)
        finally:
            self.flushing = False
            self._round = None

    async def flush_now(self) -> None:
        """Until what is pending now is written: the next flush round takes it. Outcomes
        that keep arriving under load go to later rounds and are not waited for."""
        target = self.snapshots + 1
        while (self.update or self.delete or self.add or self.flushing) and self.written < target:
            if not self.flushing:
                self.schedule()
            await asyncio.sleep(0.005)

    async def flush_all(self) -> None:
        """Until nothing is pending (at shutdown: no outcome arrives any more)."""
        while self.flushing or self.update or self.delete or self.add:
            await self.flush_now()

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # cancelled meanwhile (the process is stopping)
        waiter.set_result(None)


def snapshot(envelope: Envelope) -> Envelope:
    """A copy of `envelope` for the writer thread, as copy.deepcopy would make it (the
    loop goes on changing the recipients while the round encodes it), at a fraction of
    its cost: built from every field; the recipients copied, their notify tuples shared
    (immutable); the client dict copied, deeply only when a value is not a scalar."""
    copied = Envelope(*_ENVELOPE_VALUES(envelope))
    copied.recipients = [Recipient(*_RECIPIENT_VALUES(r)) for r in envelope.recipients]
    client = envelope.client
    copied.client = (client.copy() if all(type(v) in _IMMUTABLE for v in client.values())
                     else copy.deepcopy(client))
    return copied


class Outcomes(Tracking):
    def _init_outcomes(self) -> None:
        self.writes = PendingWrites(lambda update, delete, add: self.backend.apply(update, delete, add),
                                    self._on_written)
        self._policy: RetryPolicy | None = None
        self._policy_key: tuple[float, float, float] | None = None
        self._outcome_counters: dict[tuple[str, int], Any] = {}
        self._delivered_delays: list[float] = []  # this turn's delivered recipients' arrival-to-delivery seconds

    def _retry_policy(self) -> RetryPolicy:
        """The [delivery] back-off rules, built again only when a reload changed them."""
        d = self.config.delivery
        key = (d.min_backoff_seconds, d.max_backoff_seconds, d.max_queue_lifetime_seconds)
        if self._policy is None or self._policy_key != key:
            self._policy, self._policy_key = RetryPolicy(*key), key
        return self._policy

    def _outcome_counter(self, state: str, code: int) -> Any:
        """mta_delivery_recipients_total's child for a recipient's new state and reply class,
        looked up once (a .labels() call per recipient was a visible share of the CPU)."""
        key = (state, code // 100 if code >= 200 else 0)
        child = self._outcome_counters.get(key)
        if child is None:
            child = self._outcome_counters[key] = metrics.DELIVERY_OUTCOMES.labels(
                state if state in FINAL_STATES or state == "deferred" else "retried",
                f"{code // 100}xx" if code >= 200 else "none")
        return child

    def _count_delivered(self, seconds: float) -> None:
        """A recipient delivered `seconds` after its message arrived: counted in
        mta_delivery_recipients_total and the latency histogram at the end of the turn,
        with the turn's others (each inc or observe writes the metrics mmap under a lock)."""
        if not self._delivered_delays:
            try:
                self._event_loop().call_soon(self._publish_delivered)
            except RuntimeError:  # no loop: a test driving the scheduler by hand
                self._delivered_delays.append(seconds)
                self._publish_delivered()
                return
        self._delivered_delays.append(seconds)

    def _publish_delivered(self) -> None:
        delays, self._delivered_delays = self._delivered_delays, []
        if delays:
            self._outcome_counter("delivered", 250).inc(len(delays))
            metrics.observe_all(metrics.DELIVERY_LATENCY_SECONDS, delays)

    def _on_written(self, update: list[Envelope], delete: list[MessageId], bounces: list[NewMessage]) -> None:
        now = time.time()
        for envelope in update:
            if envelope.id in self.on_disk:
                self._set_on_disk(envelope.id, self._disk_states(envelope))
                self._evict(envelope.id)
        for msgid in delete:
            self._set_on_disk(msgid, None)
        for bounce in bounces:  # committed: now it may be delivered
            if self._room_for(bounce.envelope.priority):
                self._track(snapshot(bounce.envelope), now)
            else:
                self._lower_mark(self.backend.due_key(bounce.envelope))
        self._schedule_dispatch()

    def _delete_later(self, msgid: MessageId) -> None:
        self.writes.delete.add(msgid)
        self.writes.schedule()

    def _write_pending(self, msgid: MessageId) -> bool:
        w = self.writes
        return msgid in w.update or msgid in w.writing or msgid in w.delete or msgid in w.deleting

    def _warn_if_delayed(self, envelope: Envelope, now: float) -> bool:
        """NOTIFY=DELAY: queue the message's one delay notice if it is due (outcome.py's
        rule); the caller writes the envelope (now `warned`) in the notice's transaction."""
        d = self.config.delivery
        notice = delay_notice(envelope, now=now, warn_after_seconds=d.delay_warning_seconds,
                              lifetime_seconds=d.max_queue_lifetime_seconds, hostname=self.config.server.hostname,
                              load_body=lambda: self.backend.body(envelope.id) or b"")
        if notice is None:
            return False
        self._queue_notice(notice, "delayed", envelope)
        return True

    def _check_delay(self, envelope: Envelope, now: float) -> None:
        """A message loaded when due (tracking.py): its delay notice, written with it."""
        if self._warn_if_delayed(envelope, now):
            self.writes.update[envelope.id] = snapshot(envelope)
            self.writes.schedule()

    def _queue_notice(self, notice: NewMessage, action: str, envelope: Envelope) -> None:
        """A DSN goes into the next write, with the change that caused it; one about a
        mailing list's copy (sent from <list>-bounces@) goes to the list's owner."""
        owner = bounces_owner(self.config.list, envelope.sender)
        if owner is not None:
            notice.envelope.recipients = [Recipient(owner, orcpt=f"rfc822;{envelope.sender}")]
        rcpt = notice.envelope.recipients[0].address
        self.writes.add.append(notice)
        if action == "failed":
            metrics.BOUNCES.inc()
            logs.event("bounce_queued", msgid=notice.envelope.id, origin=envelope.id, rcpt=rcpt)
        else:
            metrics.NOTICES.labels(action).inc()
            logs.event("notice_queued", msgid=notice.envelope.id, origin=envelope.id, rcpt=rcpt, action=action)

    def _settle(self, job: Job, replies: list[RecipientReply], remote: str | None, now: float,
                handoff: Handoff = "relayed") -> None:
        busy = self.busy.get(job.msgid)
        if busy is not None:
            busy.difference_update(job.rcpts)
            if not busy:
                del self.busy[job.msgid]
        envelope = self.messages.get(job.msgid)
        if envelope is None:
            return  # deleted by an operator while in flight
        if _delivered_only(envelope, job, replies, handoff):
            finished = self._settle_delivered(envelope, job, replies, remote, now)
            if not finished:
                self._warn_if_delayed(envelope, now)
            self._written_after(envelope, job.msgid, finished, deferred=False)
            return
        answered = {r.index for r in replies}
        missing = [RecipientReply(i, 451, "4.3.0", "no reply for this recipient") for i in job.rcpts
                   if i not in answered]
        remote_host = remote.split("[")[0] if remote else None  # "host[address]:port" -> DSN Remote-MTA
        # Recounted as _recounting does, without its context manager (once per job).
        which = job.rcpts if answered.issubset(job.rcpts) else sorted(answered.union(job.rcpts))
        before = self.tally.states(envelope, which, self.carried.get(job.msgid, ()))
        result = settle(envelope, replies + missing, remote=remote_host, now=now, policy=self._retry_policy(),
                        hostname=self.config.server.hostname,
                        load_body=lambda: self.backend.body(job.msgid) or b"", handoff=handoff)
        self.tally.changed(envelope, which, before, self.carried.get(job.msgid, ()))
        for r in replies + missing:
            rcpt = envelope.recipients[r.index]
            if rcpt.state == "delivered":
                self._count_delivered(now - envelope.arrival)
            else:
                self._outcome_counter(rcpt.state, r.code).inc()
            logs.event(rcpt.state, msgid=job.msgid, rcpt=rcpt.address, relay=remote, reply=str(r),
                       attempts=rcpt.attempts, delay=round(now - envelope.arrival, 3))
        if result.bounce is not None:
            self._queue_notice(result.bounce, "failed", envelope)
        if result.success is not None:
            self._queue_notice(result.success, handoff, envelope)
        if not result.finished:  # still queued: its delay notice may be due (written below with it)
            self._warn_if_delayed(envelope, now)
        if result.retry_now:  # refused for this transaction only (452 4.5.3): a new one at once
            self._enqueue(envelope)
        self._written_after(envelope, job.msgid, result.finished, deferred=bool(result.deferred))

    def _settle_delivered(self, envelope: Envelope, job: Job, replies: list[RecipientReply], remote: str | None,
                          now: float) -> bool:
        """The common outcome (`_delivered_only`): what settle() and the recount of _settle
        do for it, inline: each recipient delivered, counted out, logged. Whether the
        message is finished."""
        carried = self.carried.get(job.msgid, ())
        recipients, tally, age = envelope.recipients, self.tally, now - envelope.arrival
        for r in replies:
            rcpt = recipients[r.index]
            old = counted_state(rcpt.state, r.index in carried)
            rcpt.attempts += 1
            rcpt.last_reply = reply = str(r)
            rcpt.state = "delivered"
            tally.add(destination_of(rcpt.address), old, -1)  # (a state not counted: no-op)
            self._count_delivered(age)
            logs.event("delivered", msgid=job.msgid, rcpt=rcpt.address, relay=remote, reply=reply,
                       attempts=rcpt.attempts, delay=round(age, 3))
        envelope.attempts += 1
        for rcpt in recipients:  # (a loop, not all() over a generator: per message)
            if rcpt.state not in FINAL_STATES:
                return False
        return True

    def _written_after(self, envelope: Envelope, msgid: MessageId, finished: bool, deferred: bool) -> None:
        """A settled job's change goes into the next write: the message's delete once it is
        finished and no other job of it runs, else its new envelope (and its retry timer)."""
        if finished and not self.busy.get(msgid):
            self._forget(msgid)
            self.writes.update.pop(msgid, None)
            self.writes.delete.add(msgid)
        else:
            self.writes.update[msgid] = snapshot(envelope)
            if deferred:
                self._add_timer(envelope.next_attempt, msgid)
        self.writes.schedule()


def _delivered_only(envelope: Envelope, job: Job, replies: list[RecipientReply], handoff: Handoff) -> bool:
    """Every recipient of `job` answered once, each with a 2xx, and none of them asked for
    a success notice: settle() would only mark them delivered."""
    if len(replies) != len(job.rcpts):
        return False
    for r in replies:
        if not 200 <= r.code < 300:
            return False
        if handoff != "passed" and envelope.recipients[r.index].notify is not None:
            return False  # NOTIFY given: maybe SUCCESS (the general path asks should_notify)
    return len(job.rcpts) == 1 and replies[0].index == job.rcpts[0] or sorted(
        r.index for r in replies) == sorted(job.rcpts)
