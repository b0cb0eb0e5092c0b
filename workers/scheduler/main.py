"""The scheduler process: owns the delivery plan and is the only writer of delivery outcomes.

At start it loads every envelope from the spool: recipients that were in flight when a
process died are simply `ready` again (in-flight state is never persisted), deferred
ones get a timer. It listens on `<spool>/scheduler.sock` ([queue] scheduler_socket) for
messages (mta/messages.py, framed by mta/frames.py). Every connection starts with a
Hello each way (a peer of another build is refused), then:

  inbound workers   New(ids)                                after each durable commit
  delivery workers  (Hello with role "delivery" and its capacity), then per session:
                    scheduler: Open(sid, dest, job) / Job(sid, job) / Close(sid)
                    worker:    Done(sid, job_id, replies, remote, failed, skipped) / Closed(sid, ok)
  the CLI, control  QueueCommand(op: retry|hold|release|delete, ids|domain|all) -> CommandResult,
                    ActiveQuery -> ActiveJobs, GaugeQuery -> DestinationGauges

A job is one message's recipients for one destination domain; a session carries up to
max_messages_per_connection jobs, taking the destination's best job each time, so a
high-priority message overtakes queued ones even on a reused connection (behind the
jobs already sent ahead, two at most). When the destination's window is full and more
is ready, a session is sent its next jobs ahead
(LOOKAHEAD jobs per session at most), so the worker can pipeline the next message's
commands behind the current one's content instead of waiting a round trip for it;
while the window has room, ready jobs open sessions instead. Two go ahead, not one:
a job given when "done" arrives reaches the worker after the next message's content
is already out (its replies were waiting), in time only for the one after. A session with
nothing to do is parked for [delivery] connection_idle_seconds: new jobs ride parked
sessions first, and a parked one is closed when another destination needs its slot.
Outcomes are
applied in memory at once and written to LMDB by one writer thread in batches
(apply(): states, retry times, deletions and bounces in one transaction).
A full rescan of the due index every RESCAN_SECONDS catches messages whose "new"
notification was lost (e.g. sent while this process was restarting).

The queue gauges come from running counts (tally.py) kept at every recipient state
change, so publishing them every GAUGE_SECONDS costs O(destinations), not a walk; the
per-destination snapshot (top TOP_DESTINATIONS + "other") is answered to the control
process's `gauges` command. Invariant: `check_tally()` (tests only) holds after any event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import heapq
import itertools
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mta import frames, logs, messages, metrics
from mta.config import Config
from mta.messages import Message
from mta.spool import open_spool
from mtaqueue.ids import MessageId, is_id
from mtaqueue.records import Envelope, NewMessage
from workers.process import WorkerBody, WorkerProcess, run_worker
from workers.scheduler.outcome import FINAL_STATES, RecipientReply, RetryPolicy, settle
from workers.scheduler.plan import Destination, Job, Limits, Plan
from workers.scheduler.tally import TOP_DESTINATIONS, Arrivals, Tally, destination_of, recount

RESCAN_SECONDS = 30.0
GAUGE_SECONDS = 2.0
FLUSH_GATHER_SECONDS = 0.01
DRAIN_GRACE_SECONDS = 2.0  # past the drain deadline: the delivery workers' last outcomes
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


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    return run_worker(Scheduler(config), config, channel, "scheduler")


class Scheduler(WorkerBody):
    kind = "scheduler"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.plan = Plan()
        self.messages: dict[MessageId, Envelope] = {}
        self.in_flight: dict[MessageId, set[int]] = {}
        self.timers: list[tuple[float, MessageId]] = []
        # The gauges' running counts (tally.py). carried: recipient indices in the jobs the
        # sessions carry now, running or sent ahead (a multiset: a message deleted and
        # tracked again while its old job runs may have the same index in two jobs); those
        # recipients count as active.
        self.tally = Tally()
        self.arrivals = Arrivals()
        self.carried: dict[MessageId, Counter[int]] = {}
        self.destination_gauges: dict[str, Any] = {"top": [], "other": [0, 0, 0]}
        self.sessions: dict[int, Session] = {}
        # Parked sessions per destination, oldest first: an open connection waits up to
        # [delivery] connection_idle_seconds for the destination's next job.
        self.parked: dict[str, dict[int, Session]] = {}
        self._yielding = 0  # parked sessions closed to free a slot, not yet "closed"
        self.workers: list[WorkerLink] = []
        self._sids = itertools.count(1)
        self._jobs = itertools.count(1)
        self._dispatch_scheduled = False
        self._wake: asyncio.Handle | None = None
        self._wake_at = 0.0
        self._pending_update: dict[MessageId, Envelope] = {}
        self._pending_delete: set[MessageId] = set()
        self._deleting: set[MessageId] = set()  # deletes being committed right now
        self._pending_add: list[NewMessage] = []
        self._flushing = False
        self._snapshots = 0  # flush rounds that have taken the pending changes
        self._written = 0  # flush rounds whose transaction is over
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="queue-writer")
        self._peers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._draining = False  # nothing new is dispatched; outcomes still come (drain())
        self._stopping = False  # drained: peers are closed, the last flush runs

    # --- process -------------------------------------------------------------------

    async def start(self, process: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        self.backend = open_spool(self.config.queue)
        path = self.config.queue.scheduler_socket
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a dead scheduler
        self._server = await asyncio.start_unix_server(self._on_peer, path=path)
        os.chmod(path, 0o600)
        loaded = self._load(time.time())
        logs.event("ready", loaded=loaded, ready_jobs=self.plan.ready_jobs())
        self._tasks = [loop.create_task(self._rescan_forever()), loop.create_task(self._gauges_forever()),
                       loop.create_task(self._expire_parked_forever())]
        self._schedule_dispatch()

    def status(self) -> int:
        return len(self.sessions)

    def reload(self, config: Config) -> None:
        self.config = config
        self._schedule_dispatch()

    async def drain(self, deadline: float) -> None:
        """The delivery workers drain too (SIGTERM reaches all at once): nothing new goes
        out; their outcomes are applied until no session is open (each one's "closed" or
        its worker gone) or the deadline + DRAIN_GRACE_SECONDS; close() writes them."""
        self._draining = True
        for session in list(self.sessions.values()):
            if not session.jobs:
                self._close(session)
        logs.event("draining", sessions=len(self.sessions) or None)
        until = deadline + DRAIN_GRACE_SECONDS
        while self.sessions and time.monotonic() < until:
            await asyncio.sleep(0.05)

    async def close(self) -> dict[str, Any]:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        self._server.close()
        # Close the peers' connections rather than cancel their tasks (a cancelled
        # stream handler task makes Python 3.11's asyncio log a spurious traceback); no
        # frame is handled once the spool is closed.
        for writer in self._peers.values():
            writer.close()
        await asyncio.gather(*self._tasks, *self._peers, return_exceptions=True)
        await self._flush_all()
        self._writer.shutdown(wait=True)
        self.backend.close()
        return {"in_flight_sessions": len(self.sessions)}

    # --- the queue view ---------------------------------------------------------------

    def _load(self, now: float) -> int:
        count = 0
        for envelope in self.backend.envelopes():
            if envelope.id not in self.messages:
                self._track(envelope, now)
                count += 1
        return count

    async def _gauges_forever(self) -> None:
        while True:
            self._update_gauges(time.time())
            await asyncio.sleep(GAUGE_SECONDS)

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

    def check_tally(self) -> None:
        """Tests only (it walks everything): the running counts equal a recount, the carried
        recipients are exactly those of the sessions' jobs, the oldest arrival is right."""
        carried: dict[MessageId, Counter[int]] = {}
        for session in self.sessions.values():
            for job in session.jobs:
                carried.setdefault(job.msgid, Counter()).update(job.rcpts)
        assert carried == self.carried, (carried, self.carried)
        walked = recount(self.messages, self.carried)
        assert walked == self.tally, f"running {self.tally}\nwalked  {walked}"
        oldest = min((e.arrival for e in self.messages.values()), default=None)
        assert self.arrivals.oldest(self.messages) == oldest

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_SECONDS)
            now = time.time()
            found = [m for m in self.backend.due(now, 1_000_000) if m not in self.messages]
            if found:
                logs.event("rescan_found", messages=len(found))
                self._on_new(found)

    def _on_new(self, ids: Iterable[str]) -> None:
        now = time.time()
        for raw in ids:
            msgid = MessageId(raw)
            # A finished message stays in the spool until its delete is committed: a rescan
            # that finds it then must not deliver it again.
            if msgid in self.messages or msgid in self._pending_delete or msgid in self._deleting:
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
            self._pending_delete.add(envelope.id)  # finished but not deleted before a crash
            self._schedule_flush()
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

    def _carry(self, session: Session, job: Job) -> None:
        """`session` carries `job` now: its ready recipients count as active."""
        session.jobs.append(job)
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
        busy = self.in_flight.get(envelope.id, set())
        by_dest: dict[str, list[int]] = {}
        for i, r in enumerate(envelope.recipients):
            if r.state == "ready" and i not in busy:
                by_dest.setdefault(destination_of(r.address), []).append(i)
        for dest, rcpts in by_dest.items():
            priority = max(envelope.priority, self.config.domain(dest).priority)
            job = Job(next(self._jobs), envelope.id, dest, tuple(rcpts), priority, envelope.arrival)
            self.in_flight.setdefault(envelope.id, set()).update(rcpts)
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

    # --- dispatch ------------------------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled and not self._draining:  # draining: nothing new goes out
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        now = time.time()
        self._resume_parked(now)
        while True:
            dest = self.plan.next_destination(now)
            if dest is None:
                break
            worker = None
            if len(self.sessions) < self.config.delivery.max_connections:
                worker = min((w for w in self.workers if len(w.sessions) < w.capacity),
                             key=lambda w: len(w.sessions), default=None)
            if worker is None:
                # Every slot is taken: a parked session of another destination gives its
                # slot up (one at a time; its "closed" dispatches again).
                if not self._yielding and self.parked:
                    oldest = min((next(iter(p.values())) for p in self.parked.values()),
                                 key=lambda s: s.idle_since)
                    self._close(oldest, yielding=True)
                break
            if not dest.take_token(now):
                dest.suspended_until = now + dest.token_wait(now)  # a pause, not a failure
                self._arm_wake(dest.suspended_until)
                continue
            job = dest.pop()
            sid = next(self._sids)
            self.sessions[sid] = session = Session(sid, dest, worker)
            self._carry(session, job)
            worker.sessions.add(sid)
            dest.open_session(now)
            worker.send(messages.Open(sid, dest.name, job.id, job.msgid, job.rcpts))
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
        if session.jobs_sent < dest.limits.max_messages_per_connection and dest.in_flight <= dest.limit:
            while (len(session.jobs) < LOOKAHEAD and len(dest)
                   and session.jobs_sent < dest.limits.max_messages_per_connection
                   and (not session.jobs or self._window_full(dest)) and dest.take_token(now)):
                self._give(session, dest.pop(), now)
            if session.jobs:
                return
            if not len(dest) and self.config.delivery.connection_idle_seconds > 0 and not self._stopping:
                session.idle_since = time.monotonic()
                self.parked.setdefault(dest.name, {})[session.sid] = session
                return
        if not session.jobs:
            self._close(session)  # otherwise after the job sent ahead

    def _window_full(self, dest: Destination) -> bool:
        """No new session may open for `dest`: more of its jobs go ahead on open ones."""
        return dest.in_flight >= dest.limit or len(self.sessions) >= self.config.delivery.max_connections

    def _give(self, session: Session, job: Job, now: float) -> None:
        """The next job on an open session."""
        self._carry(session, job)
        session.jobs_sent += 1
        session.dest.served(now)
        session.worker.send(messages.Job(session.sid, job.id, job.msgid, job.rcpts))

    def _resume_parked(self, now: float) -> None:
        """Ready jobs ride parked sessions first (newest first: the oldest expire). A window
        that shrank (a failed session, a reload) below the open sessions closes parked ones."""
        for name in list(self.parked):
            parked, dest = self.parked[name], self.plan.destinations.get(name)
            if dest is not None and dest.in_flight > dest.limit:
                closing = sum(1 for s in self.sessions.values() if s.dest is dest and s.closing)
                for session in list(parked.values())[:dest.in_flight - closing - dest.limit]:
                    self._close(session)
            while (parked and dest is not None and len(dest) and now >= dest.suspended_until
                   and dest.in_flight <= dest.limit and dest.take_token(now)):
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

    # --- peers ---------------------------------------------------------------------------

    async def _on_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:
            writer.close()
            return
        self._peers[task] = writer
        link: WorkerLink | None = None
        hello: messages.Hello | None = None
        writer.write(frames.encode_stream_frame(messages.hello("scheduler")))  # the peer checks ours too
        try:
            hello = await frames.read_hello(reader)  # a peer of another build is refused here
            if hello is not None and hello.role == "delivery":
                link = WorkerLink(writer, hello.capacity, hello.pid)
                self.workers.append(link)
                logs.event("delivery_worker", worker_pid=link.pid, capacity=link.capacity)
                self._schedule_dispatch()
            while hello is not None and (message := await frames.read_stream_frame(reader)) is not None:
                match message:
                    case messages.New(ids=ids):
                        self._on_new(ids)
                    case messages.Done() if link is not None:
                        self._on_done(message)
                    case messages.Closed(sid=sid, ok=ok) if link is not None:
                        self._on_closed(link, sid, ok)
                    case messages.QueueCommand() | messages.ActiveQuery() | messages.GaugeQuery():
                        answer = self._command(message)
                        if isinstance(message, messages.QueueCommand):
                            await self._flush_now()  # the operator's change is on disk before we answer
                        writer.write(frames.encode_stream_frame(answer))
                    case _:
                        raise messages.unexpected(message, f"from a {hello.role} peer")
        except messages.MessageError as exc:  # a bug, or a peer of another build: drop it
            logs.event(exc.event, peer=hello and hello.role, peer_pid=hello and hello.pid, error=str(exc))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logs.event("peer_error", error=str(exc))
        finally:
            self._peers.pop(task, None)
            if link is not None and not self._stopping:
                self._lost_worker(link)
            writer.close()

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
        busy = self.in_flight.get(job.msgid)
        if busy is not None:
            busy.difference_update(job.rcpts)
        envelope = self.messages.get(job.msgid)
        if envelope is not None:
            self._enqueue(envelope)

    def _on_done(self, done: messages.Done) -> None:
        session = self.sessions.get(done.sid)
        if session is None or not session.jobs:
            return
        job = next((j for j in session.jobs if j.id == done.job_id), None)
        if job is None:
            return
        session.jobs.remove(job)
        self._uncarry(job)
        now = time.time()
        skipped = set(done.skipped)
        if skipped:  # held by an operator after the job was sent ahead: not attempted
            self._skip(job, skipped)
            job = dataclasses.replace(job, rcpts=tuple(i for i in job.rcpts if i not in skipped))
        replies = [RecipientReply(*reply) for reply in done.replies]
        if done.failed:
            session.dest.on_session_failed(now)
        elif any(200 <= r.code < 300 for r in replies):
            session.dest.on_session_ok()
        if job.rcpts:
            self._settle(job, replies, done.remote, now)
        if done.failed:
            self._close(session)
        else:
            self._next_for(session)
        self._schedule_dispatch()

    def _skip(self, job: Job, skipped: set[int]) -> None:
        """Recipients of `job` the worker did not attempt (held): as before the job, and
        ready again at once if an operator released them meanwhile."""
        busy = self.in_flight.get(job.msgid)
        if busy is not None:
            busy.difference_update(skipped)
            if not busy:
                del self.in_flight[job.msgid]
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

    # --- outcomes --------------------------------------------------------------------------

    def _settle(self, job: Job, replies: list[RecipientReply], remote: str | None, now: float) -> None:
        busy = self.in_flight.get(job.msgid)
        if busy is not None:
            busy.difference_update(job.rcpts)
            if not busy:
                del self.in_flight[job.msgid]
        envelope = self.messages.get(job.msgid)
        if envelope is None:
            return  # deleted by an operator while in flight
        d = self.config.delivery
        policy = RetryPolicy(d.min_backoff_seconds, d.max_backoff_seconds, d.max_queue_lifetime_seconds)
        answered = {r.index for r in replies}
        missing = [RecipientReply(i, 451, "4.3.0", "no reply for this recipient") for i in job.rcpts
                   if i not in answered]
        remote_host = remote.split("[")[0] if remote else None  # "host[address]:port" -> DSN Remote-MTA
        with self._recounting(envelope, sorted({r.index for r in replies} | set(job.rcpts))):
            result = settle(envelope, replies + missing, remote=remote_host, now=now, policy=policy,
                            hostname=self.config.server.hostname,
                            load_body=lambda: self.backend.body(job.msgid) or b"")
        for r in replies + missing:
            rcpt = envelope.recipients[r.index]
            metrics.DELIVERY_OUTCOMES.labels(rcpt.state if rcpt.state in FINAL_STATES or rcpt.state == "deferred"
                                             else "retried", f"{r.code // 100}xx" if r.code >= 200 else "none").inc()
            if rcpt.state == "delivered":
                metrics.DELIVERY_LATENCY_SECONDS.observe(now - envelope.arrival)
            logs.event(rcpt.state, msgid=job.msgid, rcpt=rcpt.address, relay=remote, reply=str(r),
                       attempts=rcpt.attempts, delay=round(now - envelope.arrival, 3))
        if result.bounce is not None:
            metrics.BOUNCES.inc()
            self._pending_add.append(result.bounce)
            logs.event("bounce_queued", msgid=result.bounce.envelope.id, origin=job.msgid,
                       rcpt=envelope.sender)
        if result.retry_now:  # refused for this transaction only (452 4.5.3): a new one at once
            self._enqueue(envelope)
        if result.finished and not self.in_flight.get(job.msgid):
            self._forget(job.msgid)
            self._pending_update.pop(job.msgid, None)
            self._pending_delete.add(job.msgid)
        else:
            self._pending_update[job.msgid] = copy.deepcopy(envelope)
            if result.deferred:
                self._add_timer(envelope.next_attempt, job.msgid)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))

    async def _flush(self) -> None:
        try:
            while self._pending_update or self._pending_delete or self._pending_add:
                # Outcomes arrive a few per millisecond under load: gathering them for a
                # moment makes one transaction (two fsyncs) carry many, not a handful.
                await asyncio.sleep(FLUSH_GATHER_SECONDS)
                update = list(self._pending_update.values())
                delete = list(self._pending_delete)
                add = self._pending_add
                self._pending_update, self._pending_delete, self._pending_add = {}, set(), []
                self._snapshots += 1
                self._deleting.update(delete)
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(self._writer, lambda: self.backend.apply(update, delete, add))
                finally:
                    self._deleting.difference_update(delete)
                    self._written += 1
                now = time.time()
                for bounce in add:  # committed: now it may be delivered
                    self._track(copy.deepcopy(bounce.envelope), now)
                self._schedule_dispatch()
        finally:
            self._flushing = False

    async def _flush_now(self) -> None:
        """Until what is pending now is written: the next flush round takes it. Outcomes
        that keep arriving under load go to later rounds and are not waited for."""
        target = self._snapshots + 1
        while (self._pending_update or self._pending_delete or self._pending_add
               or self._flushing) and self._written < target:
            if not self._flushing:
                self._schedule_flush()
            await asyncio.sleep(0.005)

    async def _flush_all(self) -> None:
        """Until nothing is pending (at shutdown: no outcome arrives any more)."""
        while self._flushing or self._pending_update or self._pending_delete or self._pending_add:
            await self._flush_now()

    # --- operator commands ------------------------------------------------------------------

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
        op = command.op
        targets = self._select(command)
        now = time.time()
        count = 0
        for envelope in targets:
            count += 1
            if op == "delete":
                self._forget(envelope.id)
                self.in_flight.pop(envelope.id, None)
                for dest in self.plan.destinations.values():
                    dest.remove(lambda job, mid=envelope.id: job.msgid == mid)
                self._pending_update.pop(envelope.id, None)
                self._pending_delete.add(envelope.id)
                logs.event("deleted", msgid=envelope.id, by="operator")
                continue
            changed = False
            with self._recounting(envelope):
                for r in envelope.recipients:
                    if op == "hold" and r.state in ("ready", "deferred"):
                        r.state, changed = "held", True
                    elif op == "release" and r.state == "held":
                        r.state, changed = "ready", True
                    elif op == "retry" and r.state == "deferred":
                        r.state, changed = "ready", True
            if op == "hold":
                for dest in self.plan.destinations.values():
                    for job in dest.remove(lambda job, mid=envelope.id: job.msgid == mid):
                        self.in_flight.get(job.msgid, set()).difference_update(job.rcpts)
            if changed:
                if op in ("release", "retry"):
                    envelope.next_attempt = now
                    self._enqueue(envelope)
                self._pending_update[envelope.id] = copy.deepcopy(envelope)
                logs.event(f"{op}", msgid=envelope.id, by="operator")
        self._schedule_flush()
        self._schedule_dispatch()
        return messages.CommandResult(count)

    def _select(self, command: messages.QueueCommand) -> list[Envelope]:
        if command.all:
            return list(self.messages.values())
        if command.domain:
            domain = command.domain.lower()
            return [e for e in self.messages.values()
                    if any(destination_of(r.address) == domain for r in e.recipients)]
        chosen = []
        for raw in command.ids:
            if not is_id(raw):
                continue  # never a key LMDB refuses (an empty or overlong id)
            msgid = MessageId(raw)
            if msgid not in self.messages:  # not notified yet: the spool is the truth
                envelope = self.backend.envelope(msgid)
                if envelope is None:
                    continue
                self._track(envelope, time.time())
            if msgid in self.messages:
                chosen.append(self.messages[msgid])
        return chosen
