"""The delivery worker process: runs the sessions the scheduler opens, many at once.

It connects to the scheduler's socket, says Hello with its capacity (mta/messages.py;
the scheduler's Hello back must be of this build too), and for every Open runs one
DeliverySession (below): route the destination ([delivery] smarthost, then
[routes], then MX through the shared DNS cache), connect to the first target that
greets (421/5xx greeting or connect failure -> next target) while holding one of the
host's `max_connections_per_host` slots (per process; a full host is skipped for the
next MX, or waited for when all are full), deliver the job, report
Done with per-recipient replies and what a 2xx meant for a success notice (`handoff`:
Maildir and LMTP without DSN deliver, SMTP without DSN relays, a next hop with DSN got
the parameters and reports success itself), and wait for the next Job or Close. A session
whose connection cannot be made reports the job failed and ends (Closed). On a busy
destination the scheduler sends a session its next job ahead: when that job is
already here as a message's content goes out, its MAIL/RCPT/DATA ride the same write
(session.py's `follow`); recipients an operator held after their job was sent
ahead are skipped (`skipped` in Done: no attempt). Local
destinations ("maildir" routes, and local domains without a route) are written to
Maildir instead, through each mailbox's Sieve script (localjob.py). Envelopes and bodies
are read from the spool (short read transactions); outcomes go to the scheduler. The
only writes are new messages a Sieve script makes (redirects, vacation replies), through
this worker's GroupCommitter, announced with New before the job's Done.

The process (signals, heartbeats, reload) is workers/process.py. On SIGTERM (drain())
a session in a transaction finishes it and reports it, up to [server]
drain_timeout_seconds; the others end at once, and nothing new starts; the scheduler
waits for those outcomes before it writes its last batch and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any
from collections.abc import Sequence
from dataclasses import dataclass

from mta import frames, logs, messages, metrics
from mta.config import Config, split_hostport
from mta.messages import Message, RcptReply
from mta.spool import open_spool
from mtaqueue.cache_lmdb import LmdbCache
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope
from mtaqueue.committer import GroupCommitter
from workers.delivery.inbox import Inbox
from workers.delivery.localbox import LocalDelivery
from workers.delivery.localjob import LocalJobs
from mta.resolver import MxResolver
from mta.smtp.transaction import Outbound, OutboundRecipient, SessionError
from workers.delivery.session import OutboundSession
from workers.delivery.slots import Hop, HostSlots
from workers.process import WorkerBody, WorkerProcess, run_worker

CAPACITY = 500  # concurrent sessions per delivery worker
RECONNECT_SECONDS = 0.5
SLOT_RECHECK_SECONDS = 0.25  # a session waiting for a host slot looks for waiting sessions again
SCHEDULER_CLOSE_SECONDS = 1.0  # at the end of a drain, for the last frames to reach the scheduler


# What a session's queue holds: the scheduler's messages for it.
SessionMessage = messages.Open | messages.Job | messages.Close


def _not_held(envelope: Envelope, rcpts: Sequence[int]) -> list[int]:
    """The job's recipients still to attempt: an operator may have held some since the
    scheduler sent the job ahead (the hold is on disk before `mta queue hold` returns)."""
    return [i for i in rcpts if envelope.recipients[i].state != "held"]


@dataclass
class Current:
    """A job's message as read from the spool just before it goes out: `message` is None
    when there is nothing to send (deleted, every recipient held, body missing), and
    `replies` then says what to report for `rcpts` (the indices the message carries)."""
    message: Outbound | None
    rcpts: list[int]
    skipped: list[int]  # held by an operator since the job was made: not attempted
    replies: list[RcptReply]


# A message whose envelope is in the spool but whose body is not: a damaged spool, never
# empty content. Deferred (the operator sees it in the log and in mta queue list).
BODY_MISSING = (451, "4.3.0", "message content missing from the queue; not sent")


@dataclass(frozen=True)
class Route:
    kind: str  # "smtp" | "lmtp" | "maildir"
    targets: tuple[Hop, ...] = ()
    error: str | None = None  # resolution failed: reply text
    permanent: bool = False
    status: str | None = None


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    return run_worker(DeliveryWorker(config), config, channel, f"delivery#{index}")


class DeliveryWorker(WorkerBody):
    kind = "delivery"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.local = LocalDelivery(config)
        self._inbox: dict[int, Inbox[SessionMessage]] = {}
        self._out: frames.StreamFrames | None = None  # frames to the scheduler, one write per burst
        self._slots = HostSlots(config.delivery.max_connections_per_host)
        self._session_slot: dict[int, str] = {}
        # Sessions waiting between jobs with their connection open (the scheduler parked
        # them): one is closed when another session waits for its host's slot.
        self._waiting: dict[int, OutboundSession] = {}
        # Connections to the scheduler so far: a session runs no job the scheduler that
        # gave it is no longer there to hear about (a new one has them all ready again).
        self._epoch = 0
        self._tasks: set[asyncio.Task[None]] = set()  # one per session
        self._sending: set[asyncio.Task[None]] = set()  # sessions in a transaction (a message going out)
        self._draining = False

    async def start(self, process: WorkerProcess) -> None:
        self.spool = open_spool(self.config.queue)
        self.cache = LmdbCache(self.config.cache.path, self.config.cache.max_size_bytes,
                               self.config.cache.max_entries)
        self.resolver = MxResolver(list(self.config.dns.nameservers) or None, self.cache,
                                   self.config.dns.timeout_seconds)
        self._loop = asyncio.get_running_loop()  # kept: asking for it costs a getpid() on 3.11
        self.committer = GroupCommitter(self.spool, self._loop)
        self.local_jobs = LocalJobs(lambda: self.config, lambda: self.local, self.committer, self._announce)
        self._conversation = self._loop.create_task(self._converse_forever())

    def status(self) -> int:
        return len(self._inbox)

    def reload(self, config: Config) -> None:
        self.config = config
        self.local = LocalDelivery(config)

    async def drain(self, deadline: float) -> None:
        """No new session starts and no session starts another job; a session in a
        transaction finishes it (its outcome reported), up to the deadline. The others
        end now: nothing of their next message went out, so the scheduler has it ready
        again. Then the last frames reach the scheduler before its connection closes."""
        self._draining = True
        for task in self._tasks - self._sending:
            task.cancel()
        logs.event("draining", sessions=len(self._sending) or None)
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:  # cut at the deadline: outcome unknown, delivered again later
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the sessions' last frames go out (StreamFrames writes once per turn)
        self._conversation.cancel()
        await asyncio.gather(self._conversation, return_exceptions=True)
        out, self._out = self._out, None
        if out is not None:
            out.writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(out.writer.wait_closed(), SCHEDULER_CLOSE_SECONDS)

    async def close(self) -> dict[str, Any]:
        self.committer.close()
        self.spool.close()
        self.cache.close()
        return {}

    async def _converse_forever(self) -> None:
        path = self.config.queue.scheduler_socket
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError:
                await asyncio.sleep(RECONNECT_SECONDS)  # the scheduler is (re)starting
                continue
            self._out = frames.StreamFrames(writer)
            writer.write(frames.encode_stream_frame(messages.hello("delivery", CAPACITY)))
            try:
                if await frames.read_hello(reader) is not None:  # a scheduler of another build is refused here
                    incoming = frames.StreamFrameReader(reader)  # a burst of frames per await
                    while (burst := await incoming.read()) is not None:
                        for message in burst:
                            self._on_frame(message)
            except messages.MessageError as exc:  # a bug, or another build: drop the connection
                logs.event(exc.event, peer="scheduler", error=str(exc))
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                logs.event("scheduler_lost", error=str(exc))
            writer.close()
            self._out = None
            self._epoch += 1
            for sid, queue in self._inbox.items():  # the scheduler forgot them: abandon the sessions
                queue.put_nowait(messages.Close(sid))
            await asyncio.sleep(RECONNECT_SECONDS)

    def _on_frame(self, message: Message) -> None:
        match message:
            case messages.Open(sid=sid, dest=dest):
                if self._draining:
                    return  # never started: the scheduler has its job ready again once we disconnect
                queue: Inbox[SessionMessage] = Inbox(self._loop)
                self._inbox[sid] = queue
                queue.put_nowait(message)
                task = self._loop.create_task(DeliverySession(self, sid, dest, queue).run())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            case messages.Job() | messages.Close():
                if message.sid in self._inbox:
                    self._inbox[message.sid].put_nowait(message)
            case _:
                raise messages.unexpected(message, "from the scheduler")

    def _send(self, message: Message) -> None:
        if self._out is not None:
            self._out.send(message)

    def _transaction(self) -> _Sending:
        """For the session running in this task, `with sending.over(outbound)` around each
        message going out: a drain lets it finish (drain()). Cut at the drain's deadline,
        its connection is dropped: no QUIT in the middle of it."""
        task = asyncio.current_task(self._loop)  # with the loop given: no getpid()
        assert task is not None
        return _Sending(self._sending, task)

    async def _route(self, dest: str) -> Route:
        config = self.config
        route = config.routes.get(dest)
        if route == "maildir" or (route is None and dest in config.relay.local_domains):
            return Route("maildir")
        if route is None and config.delivery.smarthost:
            route = config.delivery.smarthost
        if route is not None:
            kind = "lmtp" if route.startswith("lmtp:") else "smtp"
            host, port = split_hostport(route.removeprefix("lmtp:"))
            return Route(kind, (Hop(host, host, port),))
        resolution = await self.resolver.resolve(dest)
        if resolution.error is not None:
            return Route("smtp", (), resolution.error, resolution.permanent, resolution.status)
        port = config.delivery.port
        return Route("smtp", tuple(Hop(t.host, t.address, port) for t in resolution.targets))

    async def _connect(self, route: Route, dest: str) -> tuple[OutboundSession | None, tuple[int, str, str] | None]:
        """A session to the first target that greets, within the per-host limit."""
        if route.error is not None:
            code = 550 if route.permanent else 451
            return None, (code, route.status or ("5.1.2" if route.permanent else "4.4.3"), route.error)
        last = (451, "4.4.1", f"no target for {dest}")
        busy: list[Hop] = []
        for target in route.targets:  # first pass: targets with a free slot, in MX order
            if not self._slots.try_take(target.key):
                busy.append(target)
                continue
            session, last = await self._open(target, route, dest, last)
            if session is not None:
                return session, None
        for target in busy:  # every free one failed or none was free: wait our turn
            # Sessions of other destinations that only wait for their next job give a
            # slot up; checked again while we wait (one may start waiting meanwhile).
            while not self._slots.try_take(target.key):
                if not await self._release_waiting(target.key):
                    await self._slots.wait(target.key, SLOT_RECHECK_SECONDS)
            session, last = await self._open(target, route, dest, last)
            if session is not None:
                return session, None
        # A 5xx greeting from every MX is still a temporary failure for the destination.
        return None, (451 if last[0] >= 500 else last[0], "4.4.1" if last[0] >= 500 else last[1], last[2])

    async def _open(self, target: Hop, route: Route, dest: str, last: tuple[int, str, str]
                    ) -> tuple[OutboundSession | None, tuple[int, str, str]]:
        """Open a session on a slot we hold; the slot goes with the session (or back on failure)."""
        d = self.config.delivery
        try:
            session = await OutboundSession.open(
                target.host, target.address, target.port, helo_name=self.config.server.hostname,
                tls=self.config.domain(dest).tls or d.tls, lmtp=route.kind == "lmtp",
                connect_timeout=d.connect_timeout_seconds, command_timeout=d.command_timeout_seconds,
                data_timeout=d.data_timeout_seconds)
        except SessionError as exc:
            self._slots.give(target.key)
            logs.event("connect_failed", dest=dest, relay=f"{target.host}[{target.address}]:{target.port}",
                       reply=f"{exc.code} {exc.status} {exc.text}")
            return None, (exc.code, exc.status, f"{target.host}: {exc.text}")
        self._session_slot[id(session)] = target.key
        return session, last

    async def _release_waiting(self, key: str) -> bool:
        """A connection to `key` that only waits for its next job gives its slot up."""
        for sid, session in self._waiting.items():
            if self._session_slot.get(id(session)) == key:
                del self._waiting[sid]
                await self._close(session)  # its next job finds it unusable and reconnects
                return True
        return False

    async def _close(self, session: OutboundSession) -> None:
        await session.close()
        key = self._session_slot.pop(id(session), None)
        if key is not None:
            self._slots.give(key)

    def _current(self, msgid: MessageId, job_rcpts: Sequence[int]) -> Current:
        """The job's message as the spool holds it now, envelope and body read together.

        Deleted since the job was made: nothing to send and nothing to report. Recipients
        an operator held since are skipped. A body that is missing while its envelope is
        there is never sent as empty content: it is logged and the recipients deferred.
        """
        envelope, body = self.spool.message(msgid)
        if envelope is None:
            return Current(None, [], [], [])
        rcpts = _not_held(envelope, job_rcpts)
        skipped = [i for i in job_rcpts if i not in rcpts] if len(rcpts) < len(job_rcpts) else []
        if not rcpts:
            return Current(None, rcpts, skipped, [])
        if body is None:
            logs.event("body_missing", msgid=msgid, action="deferred; nothing sent",
                       spool=self.config.queue.path)
            metrics.DELIVERY_BODY_MISSING.inc()
            return Current(None, rcpts, skipped, [(i, *BODY_MISSING) for i in rcpts])
        message = Outbound(
            msgid=envelope.id, sender=envelope.sender, body=body,
            smtputf8=envelope.smtputf8, body_type=envelope.body_type, ret=envelope.ret, envid=envelope.envid,
            recipients=[OutboundRecipient(r.address, r.notify, r.orcpt)
                        for r in map(envelope.recipients.__getitem__, rcpts)])
        return Current(message, rcpts, skipped, [])

    async def _deliver_local(self, current: Current) -> list[RcptReply]:
        assert current.message is not None
        return await self.local_jobs.deliver(current.message, current.rcpts)

    def _announce(self, ids: list[str]) -> None:
        """New messages this worker committed (Sieve redirects, vacation replies): on the
        scheduler connection, so they reach it before the Done that follows."""
        self._send(messages.New(tuple(ids)))


class DeliverySession:
    """One session the scheduler opened: its jobs, one after another, over one outbound
    connection at a time (a new one when it is no longer reusable).

    State: `outbound` the connection; `ahead` the next message from the scheduler, taken
    early to announce its job behind the content (OutboundSession.send's `follow`);
    `announced` that job's id and its message as read then. `epoch` is the scheduler
    connection the session belongs to: `live` is the one check that it is still there
    (nothing goes to a new scheduler, which may reuse this sid, and no job of the old one
    runs)."""

    def __init__(self, worker: DeliveryWorker, sid: int, dest: str, queue: Inbox[SessionMessage]) -> None:
        self.worker = worker
        self.sid = sid
        self.dest = dest
        self.queue = queue
        self.epoch = worker._epoch
        self.outbound: OutboundSession | None = None
        self.ahead: SessionMessage | None = None
        self.announced: tuple[int, Current] | None = None
        self.ok = True

    @property
    def live(self) -> bool:
        return self.worker._epoch == self.epoch

    def send(self, message: Message) -> None:
        if self.live:
            self.worker._send(message)

    def done(self, job: messages.Open | messages.Job, current: Current, *,
             replies: Sequence[RcptReply] | None = None, remote: str | None = None, failed: bool = False,
             handoff: messages.Handoff = "relayed") -> None:
        self.send(messages.Done(self.sid, job.job_id, tuple(current.replies if replies is None else replies), remote,
                                failed, tuple(current.skipped), handoff))

    def follow(self) -> Outbound | None:
        """The message this connection carries next, if its job is here already."""
        if self.worker._draining:
            return None  # no new transaction starts
        if self.ahead is None and not self.queue.empty():
            self.ahead = self.queue.get_nowait()
        job = self.ahead
        if not isinstance(job, messages.Job) or not self.live:
            return None
        if self.announced is None or self.announced[0] != job.job_id:
            try:
                self.announced = (job.job_id, self.worker._current(MessageId(job.msgid), job.rcpts))
            except Exception as exc:  # noqa: BLE001 - not announced; the job reads the spool again
                logs.event("announce_failed", dest=self.dest, error=f"{type(exc).__name__}: {exc}")
                return None
        return self.announced[1].message

    async def run(self) -> None:
        worker = self.worker
        self.sending = worker._transaction()
        try:
            route = await worker._route(self.dest)
            while (job := await self._next_job()) is not None:
                if not await self._run_job(route, job):
                    break
        finally:
            if self.outbound is not None:
                await worker._close(self.outbound)
            if worker._inbox.get(self.sid) is self.queue:  # a new scheduler may have given this sid to another
                del worker._inbox[self.sid]
            self.send(messages.Closed(self.sid, self.ok))

    async def _next_job(self) -> messages.Open | messages.Job | None:
        """The next job; None on Close, on a drain, or once the scheduler is gone
        (jobs sent ahead by a scheduler that is gone do not run)."""
        if not self.live or self.worker._draining:
            return None
        if self.ahead is not None:
            job, self.ahead = self.ahead, None
        else:
            if self.outbound is not None:
                self.worker._waiting[self.sid] = self.outbound
            job = await self.queue.get()
            self.worker._waiting.pop(self.sid, None)
        if isinstance(job, messages.Close) or not self.live:
            return None
        return job

    async def _run_job(self, route: Route, job: messages.Open | messages.Job) -> bool:
        """Deliver one job and report it; False when the session ends (no connection)."""
        worker, outbound, announced = self.worker, self.outbound, self.announced
        msgid = MessageId(job.msgid)
        if (announced is not None and announced[0] == job.job_id and outbound is not None
                and outbound.announced is announced[1].message and outbound.reusable):
            current = announced[1]  # its commands are out on this connection
        else:  # (not announced, or it goes on a new connection: read it as it is now)
            current = worker._current(msgid, job.rcpts)
        self.announced = None
        if current.message is None:  # deleted, held or without its body: nothing is sent
            self.done(job, current)
            return True
        if route.kind == "maildir":
            with self.sending.over(None):
                replies = await worker._deliver_local(current)
            self.done(job, current, replies=replies, handoff="delivered")
            return True
        failure: tuple[int, str, str] | None = None
        for _attempt in range(2):
            if outbound is None or not outbound.reusable:
                if outbound is not None:
                    await worker._close(outbound)
                outbound, failure = await worker._connect(route, self.dest)
                self.outbound = outbound
                if outbound is None:
                    break
                # Opening it (a slow greeting) may have taken minutes: an operator may
                # have deleted or held the message meanwhile. Checked again before MAIL.
                current = worker._current(msgid, job.rcpts)
                if current.message is None:
                    break
            assert current.message is not None
            with self.sending.over(outbound):
                results = await outbound.send(current.message, self.follow)
            if outbound.announced is not None:
                metrics.DELIVERY_PIPELINED.inc()
            current.replies = [(i, r.code, r.status, r.text) for i, r in zip(current.rcpts, results)]
            if not outbound.stale:
                break
            # Dropped while it waited for this message: once more on a new connection.
            logs.event("stale_connection", dest=self.dest, relay=outbound.remote)
        if outbound is None:
            assert failure is not None
            self.ok = False
            self.done(job, current, failed=True, replies=[(i, *failure) for i in current.rcpts])
            return False  # a job sent ahead goes back to the scheduler with Closed
        self.done(job, current, remote=outbound.remote if current.message is not None else None,
                  handoff=outbound.handoff)
        return True


class _Sending:
    """The `with` of DeliveryWorker._transaction, one per session (a class made once:
    @contextmanager's generator costs a few microseconds per message)."""

    __slots__ = ("outbound", "sending", "task")

    def __init__(self, sending: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        self.sending, self.task = sending, task
        self.outbound: OutboundSession | None = None

    def over(self, outbound: OutboundSession | None) -> _Sending:
        """This message goes out on `outbound` (None: to Maildir)."""
        self.outbound = outbound
        return self

    def __enter__(self) -> None:
        self.sending.add(self.task)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self.outbound is not None:
            self.outbound.abort()
        self.sending.discard(self.task)
