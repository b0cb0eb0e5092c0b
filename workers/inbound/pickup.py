"""The pickup: mail that local programs left in the maildrop (mta/maildrop.py), committed
to the queue like mail received over SMTP.

It runs in inbound worker #1 (the role that accepts mail into the queue): at start, when
poked (any datagram on <maildrop>/pickup.sock: mta-sendmail sends one after each file),
and every SCAN_SECONDS. A round holds <maildrop>/pickup.lock (flock: while generations
overlap during a reload, the other pickup skips its round) and
  1. settles the files left in pickup/ (pickupfiles.py): committed ones are finished and
     announced; the others are committed in this round;
  2. claims up to BATCH files of new/ (renamed to the queue ids they will have);
  3. reads each as untrusted input: a bad one goes to corrupt/ with a log line;
  4. commits the good ones through the worker's group committer (one fsync per
     MAX_HELD_BYTES of content read, so memory stays bounded), built as SMTP mail is: aliases expanded with the original kept as ORCPT,
     our Received header "from local uid N" (the file's owner), the priority rules
     (listener "maildrop"), due SETTLE_SECONDS from now (see pickupfiles.py); a
     mailing list's copies (listpost.py) in the same transaction as their file's message,
     which keeps the file's id (so the exactly-once check below holds for them too);
  5. removes their files, then tells the scheduler (New), which delivers them at once.
Local submission is trusted for relay (any recipient domain, as Postfix's pickup) and
for posting to a list (posting = "members" is not checked; "moderated" holds the copy), and
keeps [limits] max_message_bytes. A full or failing queue leaves the files in pickup/
under fresh ids, for the next round. Blocking file I/O (renames, reads, fsyncs) runs on
the loop's default executor, never on the loop that serves this worker's SMTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mta import logs, metrics
from mta.maildrop import LOCK, SOCKET, Drop, DropError
from mtaqueue import Envelope, NewMessage, QueueError, Recipient
from mtaqueue.backend import QueueBackend
from mtaqueue.ids import MessageId
from workers.inbound import content, listpost, policy
from workers.inbound.content import LOCAL
from workers.inbound.context import WorkerContext
from workers.inbound.pickupfiles import SETTLE_SECONDS, Claimed, Files, claimed_at
from workers.inbound.received import local_received_header
from workers.process import test_hooks_on

SCAN_SECONDS = 5.0  # a look without a poke (a writer whose poke was lost, a server that was down)
BATCH = 100  # files claimed per round
MIN_ROUND_SECONDS = 0.02  # between rounds: any local user may poke, as often as they like
MAX_HELD_BYTES = 32 * 1024 * 1024  # content read before it is committed (one group commit per this much)
LISTENER = LOCAL  # the listener [[priority_rule]]s and content stages name for local mail
CRASH_HOOK = "crash-pickup"  # MTA_TEST_HOOKS=1: this file in the spool -> SIGKILL between commit and finish

T = TypeVar("T")


class Pickup:
    def __init__(self, ctx: WorkerContext, backend: QueueBackend, on_crash: Callable[[], None]) -> None:
        config = ctx.config
        self.ctx = ctx
        self.backend = backend
        self.maildrop = config.queue.maildrop_dir
        self.files = Files(self.maildrop, config.limits.max_message_bytes)
        self._on_crash = on_crash  # our bug: the worker stops (and is replaced), loudly
        self._poked = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._crash_hook = os.path.join(config.queue.path, CRASH_HOOK) if test_hooks_on() else None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._sock = self._bind()
            loop.add_reader(self._sock.fileno(), self._on_poke)
        except OSError as exc:  # still picks up, every SCAN_SECONDS
            logs.event("pickup_socket_failed", path=os.path.join(self.maildrop, SOCKET), error=str(exc))
        self._task = loop.create_task(self._run())
        self._task.add_done_callback(self._on_done)

    def _bind(self) -> socket.socket:
        path = os.path.join(self.maildrop, SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous pickup's (never unlinked at close: a newer generation may own it)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(path)
        os.chmod(path, 0o666)  # every local user may poke
        return sock

    def _on_poke(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:  # one round for any number of pokes
                self._sock.recv(64)
        self._poked.set()

    async def stop(self) -> None:
        """No new round; the one running finishes (its files stay claimed if it is cut short)."""
        self._stopping = True
        self._poked.set()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logs.event("pickup_crashed", error=f"{type(exc).__name__}: {exc}", action="stopping the worker")
            self._on_crash()

    async def _run(self) -> None:
        while not self._stopping:
            self._poked.clear()
            try:
                handled = await self.round()
            except OSError as exc:  # the maildrop is gone or unreadable: the operator fixes it, we keep looking
                logs.event("pickup_error", path=self.maildrop, error=f"{type(exc).__name__}: {exc}",
                           action=f"trying again in {SCAN_SECONDS:g} s")
                handled = 0
            if handled < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poked.wait(), SCAN_SECONDS)
                await asyncio.sleep(MIN_ROUND_SECONDS)  # pokes in a burst (or a flood) make one round

    async def round(self) -> int:
        """One look at the maildrop; how many files it claimed. 0 when another pickup holds the lock."""
        lock = await self._blocking(self._try_lock)
        if lock is None:
            return 0
        try:
            return await self._round()
        finally:
            os.close(lock)

    def _try_lock(self) -> int | None:
        fd = os.open(os.path.join(self.maildrop, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    async def _round(self) -> int:
        finished, left = await self._blocking(self.files.settle, self._committed)
        for msgid in finished:  # committed before a crash: their files are gone now
            self.ctx.notifier.new(msgid)
        now = time.time()
        for msgid in left:
            if now - claimed_at(msgid) >= SETTLE_SECONDS:
                logs.event("pickup_again", msgid=msgid, note="a file left in the pickup by a crash, committed now; "
                           "if its message was delivered meanwhile, this copy is a second one")
        claimed = await self._blocking(self.files.claim, BATCH, now)
        ready: list[Claimed] = []
        held = 0
        for msgid in [*left, *claimed]:
            try:
                one = await self._blocking(self.files.read, msgid)
            except DropError as exc:
                await self._blocking(self.files.corrupt, msgid, str(exc))
                metrics.PICKUP_FILES.labels("corrupt").inc()
                continue
            ready.append(one)
            held += len(one.message)
            if held >= MAX_HELD_BYTES:  # memory: a hundred files of 25 MiB are never read at once
                await self._commit(ready)
                ready, held = [], 0
        if ready:
            await self._commit(ready)
        return len(claimed)

    def _committed(self, msgid: MessageId) -> bool:
        return self.backend.envelope(msgid) is not None

    async def _commit(self, ready: list[Claimed]) -> None:
        now = time.time()
        stored = [await self._content(self.build(c, now)) for c in ready]
        groups = [listpost.split(m, self.ctx.local.lists, self.ctx.local.expand) for m in stored]
        results = await asyncio.gather(*(self.ctx.committer.commit_all(tuple(c.message for c in g)) for g in groups),
                                       return_exceptions=True)
        done: list[MessageId] = []
        announce: list[MessageId] = []
        for claimed, message, group, result in zip(ready, stored, groups, results):
            if isinstance(result, QueueError):  # full or failing: the file waits for the next round
                logs.event("pickup_deferred", msgid=claimed.msgid, error=str(result), action="kept for the next round")
                await self._blocking(self.files.reclaim, claimed.msgid, time.time())
            elif isinstance(result, BaseException):
                raise result  # our bug
            else:
                done.append(claimed.msgid)
                announce.extend(c.message.envelope.id for c in group if c.held_for is None)
                self._received(claimed, message)
                listpost.log_copies(group, claimed.msgid)
        logs.write_waiting()  # the received lines out before the files go (finish), as before a 250
        if self._crash_hook is not None and done and os.path.exists(self._crash_hook):
            logs.event("test_hook", hook=CRASH_HOOK)
            logs.write_waiting()
            os.kill(os.getpid(), signal.SIGKILL)  # committed, files not finished: what a crash leaves
        await self._blocking(self.files.finish, done)
        for msgid in announce:
            self.ctx.notifier.new(msgid)

    def build(self, claimed: Claimed, now: float) -> NewMessage:
        """The message as it will be stored: envelope and body (our Received header first)."""
        config, drop = self.ctx.config, claimed.drop
        rcpts = [r.address for r in drop.recipients]
        header = local_received_header(uid=claimed.uid, hostname=config.server.hostname, msgid=claimed.msgid,
                                       recipients=rcpts)
        body = header + claimed.message
        envelope = Envelope(
            id=claimed.msgid, sender=drop.sender, recipients=self.final_recipients(drop), size=len(body),
            arrival=now, next_attempt=now + SETTLE_SECONDS, ret=drop.ret,
            priority=policy.message_priority(config, sender=drop.sender, recipients=rcpts, listener=LISTENER),
            envid=drop.envid, body_type=None if claimed.message.isascii() else "8BITMIME", smtputf8=drop.smtputf8,
            client={"uid": claimed.uid, "listener": LISTENER, "protocol": "local"},
        )
        return NewMessage(envelope, body)

    async def _content(self, message: NewMessage) -> NewMessage:
        """Footers and DKIM signing, as for SMTP mail (the stages that never refuse a message:
        sendmail's caller is gone; Postfix's non_smtpd_milters are empty by default too)."""
        stages = self.ctx.content.for_listener(LOCAL)
        if not stages:
            return message
        work = content.Work(message.envelope, message.body, content.Facts(self.ctx.config.server.hostname, LOCAL))
        await content.run(stages, work)
        work.envelope.size = len(work.body)
        return NewMessage(work.envelope, work.body)

    def final_recipients(self, drop: Drop) -> list[Recipient]:
        """The recipients with aliases expanded (the original kept as ORCPT), deduplicated."""
        out: list[Recipient] = []
        seen: set[str] = set()
        for rcpt in drop.recipients:
            targets = self.ctx.local.expand(rcpt.address)
            orcpt = rcpt.orcpt or (f"rfc822;{rcpt.address}" if targets != [rcpt.address] else None)
            for target in targets:
                if target.lower() not in seen:
                    seen.add(target.lower())
                    out.append(Recipient(target, rcpt.notify, orcpt))
        return out

    @staticmethod
    def _received(claimed: Claimed, message: NewMessage) -> None:
        logs.event("received", msgid=claimed.msgid, client="local", uid=claimed.uid, sender=claimed.drop.sender,
                   nrcpt=len(claimed.drop.recipients), size=len(message.body), listener=LISTENER,
                   priority=message.envelope.priority or None)
        metrics.PICKUP_FILES.labels("committed").inc()

    @staticmethod
    async def _blocking(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
