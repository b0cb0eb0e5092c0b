"""Operator operations on the running scheduler: hold, release, retry, delete; active jobs, gauges.

Which messages a QueueCommand names and how their recipients change are mta/queueops.py's
rules, the same ones `mta queue <op>` applies to the spool when no scheduler runs; this
module does the scheduler's part around them: the plan's queued jobs (a held or deleted
message's jobs leave it, a released or retried one is queued again), the running counts,
and the pending write, on disk before the CommandResult is sent. A job already given to
a session runs on: its worker skips held recipients, and the outcome of a deleted
message is dropped.

Named ids are read from the spool when not tracked. `--all` and `--domain` go through
the spool in batches of BULK_BATCH ids (mtaqueue's ids()), one transaction each, the
event loop free between them, with a CommandProgress at most every PROGRESS_SECONDS:
a million messages never sit in memory at once. A message changed but not tracked is
written and left in the spool; one made due (release, retry) enters the active set
through the scan, in due order, as room allows.

A mixin of Scheduler (main.py) over the sessions (dispatch.py) and the queue view
(tracking.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mta import logs, messages, queueops
from mta.messages import Message
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope
from workers.scheduler.dispatch import Dispatch
from workers.scheduler.flush import snapshot

BULK_BATCH = 1000
PROGRESS_SECONDS = 1.0

Progress = Callable[[messages.CommandProgress], None]


class Operations(Dispatch):
    def _query(self, query: messages.ActiveQuery | messages.GaugeQuery) -> Message:
        if isinstance(query, messages.ActiveQuery):
            # Given to sessions (running or sent ahead); queued jobs are still "ready".
            active: dict[str, list[int]] = {}
            for session in self.sessions.values():
                for job in session.jobs:
                    active.setdefault(job.msgid, []).extend(job.rcpts)
            return messages.ActiveJobs({msgid: tuple(rcpts) for msgid, rcpts in active.items()})
        gauges = self.destination_gauges  # the control process renders them at each scrape
        return messages.DestinationGauges(tuple(map(tuple, gauges["top"])), tuple(gauges["other"]))

    async def _command(self, command: messages.QueueCommand, progress: Progress | None = None) -> Message:
        """Apply an operator's command; its changes are on disk when this returns."""
        if command.all or command.domain:
            count = await self._bulk(command, progress)
        else:
            targets = queueops.select(command, self.messages, self._track_unnotified)
            self._apply_op(command.op, targets, time.time())
            count = len(targets)
            await self.writes.flush_now()
        self._schedule_dispatch()
        return messages.CommandResult(count)

    async def _bulk(self, command: messages.QueueCommand, progress: Progress | None) -> int:
        """--all or --domain, in batches from the spool."""
        domain = queueops.destination_of(command.domain) if command.domain else None
        total = self.backend.totals().get("messages", 0) if command.all else 0
        done, after, last_report = 0, None, time.monotonic()
        while True:
            ids = self.backend.ids(after, BULK_BATCH, domain)
            if not ids:
                break
            after = ids[-1]
            now = time.time()
            batch = [e for e in (self.messages.get(msgid) or self._read_untracked(msgid) for msgid in ids)
                     if e is not None and not queueops.finished(e)]
            self._apply_op(command.op, batch, now)
            done += len(batch)
            await self.writes.flush_now()  # this batch's transaction, before the next is read
            if command.op in queueops.REQUEUE:
                self._lower_mark(self.backend.due_floor(now))  # made due: the scan takes them in
                self._arm_scan()
            if progress is not None and time.monotonic() - last_report >= PROGRESS_SECONDS:
                progress(messages.CommandProgress(done, total))
                last_report = time.monotonic()
        return done

    def _read_untracked(self, msgid: MessageId) -> Envelope | None:
        """A message not in the active set, as the spool has it (None if it is being written:
        its pending change comes first; the operator's command does not see it)."""
        if self._write_pending(msgid):
            return None
        return self.backend.envelope(msgid)

    def _track_unnotified(self, msgid: MessageId) -> Envelope | None:
        """A message named by id and not tracked (deferred, held, or its New not here yet):
        tracked for the command; it leaves the active set again after its write if it has
        nothing to send."""
        envelope = self._read_untracked(msgid)
        if envelope is None:
            return None
        self._track(envelope, time.time())
        return self.messages.get(msgid)  # None if it was finished: its delete is pending

    def _apply_op(self, op: messages.QueueOp, targets: list[Envelope], now: float) -> None:
        unplan: set[MessageId] = set()  # tracked messages whose queued jobs leave the plan
        for envelope in targets:
            tracked = self.messages.get(envelope.id) is envelope
            if op == "delete":
                if tracked:
                    self._forget(envelope.id)
                    self.busy.pop(envelope.id, None)
                    unplan.add(envelope.id)
                self.writes.update.pop(envelope.id, None)
                self.writes.delete.add(envelope.id)
                logs.event("deleted", msgid=envelope.id, by="operator")
            elif tracked:
                if op == "hold":
                    unplan.add(envelope.id)
                self._change(op, envelope, now)
            elif queueops.change(op, envelope, now):
                self.writes.update[envelope.id] = envelope  # written, left in the spool
                logs.event(op, msgid=envelope.id, by="operator")
        if unplan:  # one pass over each destination's jobs for the whole batch
            for dest in self.plan.destinations.values():
                for job in dest.remove(lambda job: job.msgid in unplan):
                    busy = self.busy.get(job.msgid)
                    if busy is not None:
                        busy.difference_update(job.rcpts)
                        if not busy:
                            del self.busy[job.msgid]
        for envelope in targets:
            if op != "delete":
                self._evict(envelope.id)  # nothing to send now (held, unchanged): back to the spool only
        self.writes.schedule()

    def _change(self, op: messages.QueueOp, envelope: Envelope, now: float) -> None:
        with self._recounting(envelope):
            changed = queueops.change(op, envelope, now)
        if changed:
            if op in queueops.REQUEUE:
                self._enqueue(envelope)
            self.writes.update[envelope.id] = snapshot(envelope)
            logs.event(op, msgid=envelope.id, by="operator")
