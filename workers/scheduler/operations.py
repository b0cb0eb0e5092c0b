"""Operator operations on the running scheduler: hold, release, retry, delete; active jobs, gauges.

Which messages a QueueCommand names and how their recipients change are mta/queueops.py's
rules, the same ones `mta queue <op>` applies to the spool when no scheduler runs; this
module does the scheduler's part around them: the plan's queued jobs (a held or deleted
message's jobs leave it, a released or retried one is queued again), the running counts,
and the pending write, on disk before the CommandResult is sent (main.py flushes first).
A job already given to a session runs on: its worker skips held recipients, and the
outcome of a deleted message is dropped.

A mixin of Scheduler (main.py) over the sessions (dispatch.py) and the queue view
(tracking.py).
"""

from __future__ import annotations

import copy
import time

from mta import logs, messages, queueops
from mta.messages import Message
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope
from workers.scheduler.dispatch import Dispatch


class Operations(Dispatch):
    def _command(self, command: messages.QueueCommand | messages.ActiveQuery | messages.GaugeQuery) -> Message:
        if isinstance(command, messages.ActiveQuery):
            # Given to sessions (running or sent ahead); queued jobs are still "ready".
            active: dict[str, list[int]] = {}
            for session in self.sessions.values():
                for job in session.jobs:
                    active.setdefault(job.msgid, []).extend(job.rcpts)
            return messages.ActiveJobs({msgid: tuple(rcpts) for msgid, rcpts in active.items()})
        if isinstance(command, messages.GaugeQuery):  # the control process renders them at each scrape
            gauges = self.destination_gauges
            return messages.DestinationGauges(tuple(map(tuple, gauges["top"])), tuple(gauges["other"]))
        targets = queueops.select(command, self.messages, self._track_unnotified)
        now = time.time()
        for envelope in targets:
            if command.op == "delete":
                self._delete(envelope.id)
            else:
                self._change(command.op, envelope, now)
        self.writes.schedule()
        self._schedule_dispatch()
        return messages.CommandResult(len(targets))

    def _track_unnotified(self, msgid: MessageId) -> Envelope | None:
        """A message named by id and not tracked (its New not here yet): the spool is the truth."""
        envelope = self.backend.envelope(msgid)
        if envelope is None:
            return None
        self._track(envelope, time.time())
        return self.messages.get(msgid)  # None if it was finished: its delete is pending

    def _delete(self, msgid: MessageId) -> None:
        self._forget(msgid)
        self.busy.pop(msgid, None)
        for dest in self.plan.destinations.values():
            dest.remove(lambda job: job.msgid == msgid)
        self.writes.update.pop(msgid, None)
        self.writes.delete.add(msgid)
        logs.event("deleted", msgid=msgid, by="operator")

    def _change(self, op: messages.QueueOp, envelope: Envelope, now: float) -> None:
        with self._recounting(envelope):
            changed = queueops.change(op, envelope, now)
        if op == "hold":
            for dest in self.plan.destinations.values():
                for job in dest.remove(lambda job: job.msgid == envelope.id):
                    self.busy.get(job.msgid, set()).difference_update(job.rcpts)
        if changed:
            if op in queueops.REQUEUE:
                self._enqueue(envelope)
            self.writes.update[envelope.id] = copy.deepcopy(envelope)
            logs.event(op, msgid=envelope.id, by="operator")
