"""Delivery sessions: which destination gets the next session, which job rides which session.

Owns: the open `sessions`, the delivery `workers` (a WorkerLink each, their sessions),
the `parked` sessions, and the Open/Job/Close messages to the workers and the Done/Closed
they answer (mta/messages.py).

A job is one message's recipients for one destination domain; a session carries up to
max_messages_per_connection jobs, taking the destination's best job each time, so a
high-priority message overtakes queued ones even on a reused connection (behind the
jobs already sent ahead, two at most). When the destination's window is full and more
is ready, a session is sent its next jobs ahead (LOOKAHEAD jobs per session at most), so
the worker can pipeline the next message's commands behind the current one's content
instead of waiting a round trip for it; while the window has room, ready jobs open
sessions instead. Two go ahead, not one: a job given when Done arrives reaches the
worker after the next message's content is already out (its replies were waiting), in
time only for the one after. A session with nothing to do is parked for [delivery]
connection_idle_seconds: new jobs ride parked sessions first, and a parked one is
closed when another destination needs its slot.

Invariants: a session is counted by its destination (plan.Destination.open_session /
close_session) from its Open to its Closed or its worker's loss; a job a session will
not complete is released (its recipients ready again). A mixin of Scheduler (main.py):
over the outcomes (flush.py) and the queue view (tracking.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from dataclasses import dataclass, field

from mta import frames, logs, messages
from mta.messages import Message
from workers.scheduler.flush import Outcomes
from workers.scheduler.leases import Leases
from workers.scheduler.outcome import reply_of
from workers.scheduler.plan import Destination, Job

LOOKAHEAD = 3  # jobs a session may hold: the one running and two sent ahead (see _next_for)


@dataclass
class Session:
    sid: int
    dest: Destination
    worker: WorkerLink
    jobs: list[Job] = field(default_factory=list)  # in the order sent: the first one is running
    jobs_sent: int = 1
    idle_since: float = 0.0  # > 0: parked (time.monotonic()), waiting for its destination's next job
    closing: bool = False  # "close" sent, "closed" not yet received
    yielding: bool = False  # closed (parked) to give its slot to another destination

    @property
    def job(self) -> Job | None:
        """The job running now."""
        return self.jobs[0] if self.jobs else None


@dataclass(eq=False)
class WorkerLink:
    writer: asyncio.StreamWriter
    capacity: int
    pid: int
    sessions: set[int] = field(default_factory=set)
    out: frames.StreamFrames | None = None

    def send(self, message: Message) -> None:
        if self.out is None:
            self.out = frames.StreamFrames(self.writer)
        self.out.send(message)


class Dispatch(Outcomes):
    _draining: bool
    _stopping: bool
    leases: Leases | None

    def _init_dispatch(self) -> None:
        self.sessions: dict[int, Session] = {}
        # Parked sessions per destination, oldest first: an open connection waits up to
        # [delivery] connection_idle_seconds for the destination's next job.
        self.parked: dict[str, dict[int, Session]] = {}
        self._yielding = 0  # parked sessions closed to free a slot, not yet "closed"
        self.workers: list[WorkerLink] = []
        self._sids = itertools.count(1)
        self._dispatch_scheduled = False

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled and not self._draining:  # draining: nothing new goes out
            self._dispatch_scheduled = True
            self._event_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        now = time.time()
        self._resume_parked(now)
        while True:
            dest = self.plan.next_destination(now)
            if dest is None:
                break
            worker = None
            if len(self.sessions) < self.max_sessions():
                worker = min((w for w in self.workers if len(w.sessions) < w.capacity),
                             key=lambda w: len(w.sessions), default=None)
            if worker is None:
                if (self.leases is not None
                        and self.max_sessions() <= len(self.sessions) < self.config.delivery.max_connections):
                    self.leases.want_more()  # the cluster's max_connections lease is full: ask for more
                # Every slot is taken: a parked session of another destination gives its
                # slot up (one at a time; its "closed" dispatches again).
                if not self._yielding and self.parked:
                    oldest = min((next(iter(p.values())) for p in self.parked.values()),
                                 key=lambda s: s.idle_since)
                    self._close(oldest, yielding=True)
                break
            if not dest.take_token(now):
                wake = dest.wait_for_token(now)
                if wake is not None:
                    self._arm_wake(wake)
                continue
            job = dest.pop()
            sid = next(self._sids)
            self.sessions[sid] = session = Session(sid, dest, worker)
            session.jobs.append(job)
            self._carry(job)
            worker.sessions.add(sid)
            dest.open_session(now)
            worker.send(messages.Open(sid, dest.name, job.id, job.msgid, job.rcpts))
        if self.plan.short_of_lease and self.leases is not None:
            self.plan.short_of_lease = False
            self.leases.want_more()
        suspended = [d.suspended_until for d in self.plan.destinations.values() if d.suspended_until > now and len(d)]
        if suspended:
            self._arm_wake(min(suspended))

    def _next_for(self, session: Session) -> None:
        """After a job: give the session the destination's best job (and, with the window
        full, more ahead, up to LOOKAHEAD), let it finish the jobs sent ahead, park it, or
        close it."""
        dest, now = session.dest, time.time()
        if session.closing or self._draining:  # failed (a job sent ahead comes back) or draining:
            self._close(session)  # nothing more goes to it
            return
        per_connection, cap, most, sessions = (dest.limits.max_messages_per_connection, dest.cap,
                                               self.max_sessions(), len(self.sessions))
        # (More sessions than max_sessions: the cluster share shrank, this one closes.)
        if session.jobs_sent < per_connection and dest.in_flight <= cap and sessions <= most:
            # The window is full when no new session may open for `dest`: more of its jobs
            # go ahead on open ones (giving jobs changes neither count).
            window_full = dest.in_flight >= cap or sessions >= most
            while (len(session.jobs) < LOOKAHEAD and len(dest) and session.jobs_sent < per_connection
                   and (not session.jobs or window_full) and dest.take_token(now)):
                self._give(session, dest.pop(), now)
            if session.jobs:
                return
            if not len(dest) and self.config.delivery.connection_idle_seconds > 0 and not self._stopping:
                session.idle_since = time.monotonic()
                self.parked.setdefault(dest.name, {})[session.sid] = session
                return
        if not session.jobs:
            self._close(session)  # otherwise after the job sent ahead

    def max_sessions(self) -> int:
        """Sessions the node may have open: [delivery] max_connections, within its share of
        the cluster's total when [cluster] redis is set (leases.py)."""
        limit = self.config.delivery.max_connections
        total = None if self.leases is None else self.leases.total
        return limit if total is None else min(limit, total)

    def _give(self, session: Session, job: Job, now: float) -> None:
        """The next job on an open session."""
        session.jobs.append(job)
        self._carry(job)
        session.jobs_sent += 1
        session.dest.served(now)
        session.worker.send(messages.Job(session.sid, job.id, job.msgid, job.rcpts))

    def _resume_parked(self, now: float) -> None:
        """Ready jobs ride parked sessions first (newest first: the oldest expire). A window
        that shrank (a failed session, a reload) below the open sessions closes parked ones."""
        for name in list(self.parked):
            parked, dest = self.parked[name], self.plan.destinations.get(name)
            if dest is not None:
                cap = dest.cap  # (closing sessions and giving jobs change neither it nor in_flight)
                if dest.in_flight > cap:
                    closing = sum(1 for s in self.sessions.values() if s.dest is dest and s.closing)
                    for session in list(parked.values())[:dest.in_flight - closing - cap]:
                        self._close(session)
                while (parked and len(dest) and now >= dest.suspended_until and dest.in_flight <= cap
                       and dest.take_token(now)):
                    _sid, session = parked.popitem()
                    session.idle_since = 0.0
                    self._give(session, dest.pop(), now)
            if not parked:
                self.parked.pop(name, None)

    def _unpark(self, session: Session) -> None:
        if not session.idle_since:
            return
        session.idle_since = 0.0
        parked = self.parked.get(session.dest.name)
        if parked is not None:
            parked.pop(session.sid, None)
            if not parked:
                del self.parked[session.dest.name]

    def _close(self, session: Session, yielding: bool = False) -> None:
        self._unpark(session)
        if not session.closing:
            session.closing = True
            session.yielding = yielding
            self._yielding += yielding
            session.worker.send(messages.Close(session.sid))

    def _forget_session(self, session: Session) -> None:
        """The session is gone (closed, or its worker lost)."""
        self._unpark(session)
        if session.yielding:
            session.yielding = False
            self._yielding -= 1

    async def _expire_parked_forever(self) -> None:
        while True:
            idle = self.config.delivery.connection_idle_seconds
            await asyncio.sleep(min(1.0, max(0.05, idle / 4)))
            now = time.monotonic()
            expired = [s for p in self.parked.values() for s in p.values() if now - s.idle_since >= idle]
            for session in expired:
                self._close(session)

    def _on_done(self, done: messages.Done) -> None:
        session = self.sessions.get(done.sid)
        if session is None or not session.jobs:
            return
        for job in session.jobs:  # the first one, but for a failed session's jobs sent ahead
            if job.id == done.job_id:
                break
        else:
            return
        session.jobs.remove(job)
        given, now = job, time.time()
        if done.skipped:  # held by an operator after the job was sent ahead: not attempted
            skipped = set(done.skipped)
            self._skip(job, skipped)
            job = dataclasses.replace(job, rcpts=tuple(i for i in job.rcpts if i not in skipped))
        replies = list(map(reply_of, done.replies))
        if done.failed:
            session.dest.on_session_failed(now)
        else:
            for _i, code, _s, _t in done.replies:  # (a loop, not any() over a generator: per Done)
                if 200 <= code < 300:
                    session.dest.on_session_ok()
                    break
        if job.rcpts:
            self._settle(job, replies, done.remote, now, done.handoff)
        # Uncarried once its outcome is counted: a recipient settled leaves "active" for
        # its new state at once (not back to "ready" first, then out: one count, not two).
        self._uncarry(given)
        self._evict(job.msgid)  # nothing more to send and nothing to write (e.g. held meanwhile)
        if done.failed:
            self._close(session)
        else:
            self._next_for(session)
        self._schedule_dispatch()

    def _skip(self, job: Job, skipped: set[int]) -> None:
        """Recipients of `job` the worker did not attempt (held): as before the job, and
        ready again at once if an operator released them meanwhile."""
        busy = self.busy.get(job.msgid)
        if busy is not None:
            busy.difference_update(skipped)
            if not busy:
                del self.busy[job.msgid]
        envelope = self.messages.get(job.msgid)
        if envelope is not None and any(envelope.recipients[i].state == "ready" for i in skipped):
            self._enqueue(envelope)

    def _on_closed(self, link: WorkerLink, sid: int, ok: bool) -> None:
        session = self.sessions.pop(sid, None)
        link.sessions.discard(sid)
        if session is None:
            return
        self._forget_session(session)
        session.dest.close_session()
        for job in session.jobs:  # closed with jobs assigned (or sent ahead): they did not run
            self._release(job)
        self._schedule_dispatch()

    def _lost_worker(self, link: WorkerLink) -> None:
        self.workers.remove(link)
        requeued = 0
        for sid in list(link.sessions):
            session = self.sessions.pop(sid)
            self._forget_session(session)
            session.dest.close_session()
            for job in session.jobs:
                self._release(job)
                requeued += 1
        logs.event("delivery_worker_lost", worker_pid=link.pid, requeued=requeued)
        self._schedule_dispatch()

    def _release(self, job: Job) -> None:
        """A session's job that will not complete: its recipients are ready again."""
        self._uncarry(job)
        busy = self.busy.get(job.msgid)
        if busy is not None:
            busy.difference_update(job.rcpts)
        envelope = self.messages.get(job.msgid)
        if envelope is not None:
            self._enqueue(envelope)
            self._evict(job.msgid)
