"""The inbound worker process: a uvloop event loop serving SMTP sessions the master hands over.

`run(config, channel, generation, index)` is the body of a forked child. It opens the
LMDB spool (after fork, never before), starts the process's one queue writer thread
(GroupCommitter), then takes connections from its SEQPACKET channel to the master
(mta/messages.py):

  master -> worker  Conn((id, listener)...) + the sockets (SCM_RIGHTS), one per entry
  worker -> master  Took(ids, active)     as soon as it owns them, one frame per Conn
  worker -> master  Refused(ids, active)  entries that came without their socket (the
                    kernel drops the last ones of a frame at our fd limit); the master
                    answers 421
  worker -> master  Status(state "ready"|"retiring", active) every second

The Status is the heartbeat: it is sent from the event loop, so a blocked loop goes
silent and the master replaces the worker.

The process itself (signals, heartbeats, faulthandler, test hooks) is workers/process.py;
`Worker` is the inbound body. Its drain: on shutdown (SIGTERM/SIGINT) idle sessions get
421 4.3.2 now and transactions finish, up to [server] drain_timeout_seconds; on
retirement (SIGUSR1, a reload) sessions end on their own, up to the same timeout.

Worker #1 of each generation also runs the pickup (pickup.py): mail local programs left
in the maildrop, committed through the same group committer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import time

from mta import logs, messages, metrics, procinfo
from mta.config import Config, ListenerConfig
from mta.messages import Message
from mta.smtp.server import ServerOptions
from mta.spool import open_spool
from mtaqueue.cache_lmdb import LmdbCache
from mtaqueue.committer import GroupCommitter
from mta.tls import server_context
from mta.resolver import MxResolver
from workers.inbound.access import Access
from workers.inbound.auth import Authenticator
from workers.inbound.budget import MemoryBudget
from workers.inbound.conncount import ConnectionCounts
from workers.inbound.content import Pipeline
from workers.inbound.context import WorkerContext
from workers.inbound.ratelimit import RateLimiter
from workers.inbound.notify import SchedulerNotifier
from workers.inbound.output import TurnWriter
from workers.inbound.pickup import Pickup
from workers.inbound.policy import LocalRecipients
from workers.inbound.sharedlimits import SharedLimits
from workers.inbound.protocol import InboundProtocol
from workers.inbound.stages import STAGES
from workers.link import MasterLink
from workers.process import WorkerBody, WorkerProcess, run_worker


AUTH_MECHANISMS = ("PLAIN", "LOGIN")
GC_YOUNG_OBJECTS = 10_000  # gc threshold 0: the collector ran every ~40 sessions at the default 700


def server_options(config: Config, listener: ListenerConfig) -> ServerOptions:
    limits = config.limits
    auth = listener.offers_auth and bool(config.auth.users_file)
    return ServerOptions(
        hostname=config.server.hostname,
        max_message_bytes=limits.max_message_bytes,
        max_recipients=limits.max_recipients,
        max_errors=limits.max_errors,
        max_received_headers=limits.max_received_headers,
        bare_newline=limits.bare_newline,
        max_junk_commands=limits.max_junk_commands,
        starttls=bool(config.tls.cert_file) and listener.mode != "smtps",
        auth_mechanisms=AUTH_MECHANISMS if auth else (),
        auth_plaintext=listener.auth_plaintext,
        auth_required=listener.mode == "submission",
        vrfy=config.policy.vrfy,
        expn=config.policy.expn,
    )


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    return run_worker(Worker(config, generation, index), config, channel, f"inbound#{index}")


def _observe_commit(messages: int, seconds: float) -> None:
    metrics.QUEUE_COMMIT_SECONDS.observe(seconds)
    metrics.QUEUE_COMMIT_MESSAGES.observe(messages)


class Worker(WorkerBody):
    kind = "inbound"
    reloads = False  # a reload replaces the inbound workers by generation
    report_drops = True

    def __init__(self, config: Config, generation: int, index: int) -> None:
        self.config = config
        self.generation = generation
        self.index = index  # #1 also runs the pickup of the maildrop (pickup.py)
        self.pickup: Pickup | None = None
        self.listeners: dict[str, ListenerConfig] = {lst.address: lst for lst in config.listener}
        self.process: WorkerProcess | None = None
        self.link: MasterLink | None = None
        self.ctx: WorkerContext | None = None
        self.adopting = 0  # sockets taken whose session has not started (e.g. in a TLS handshake)
        self._loop: asyncio.AbstractEventLoop | None = None  # kept: asyncio.get_running_loop() costs a getpid
        self._watch: asyncio.Task[None] | None = None  # [cluster] redis: its prober (sharedlimits.py)

    async def start(self, process: WorkerProcess) -> None:
        self._loop = loop = asyncio.get_running_loop()
        config = self.config
        self.process, self.link = process, process.link
        self._backend = backend = open_spool(config.queue)
        committer = GroupCommitter(backend, loop, on_commit=_observe_commit)
        self._cache = cache = LmdbCache(config.cache.path, config.cache.max_size_bytes, config.cache.max_entries)
        connections = ConnectionCounts(config.cache.path, procinfo.pid())  # its slot claimed now, not at a connect
        resolver = (MxResolver(list(config.dns.nameservers), cache, config.dns.timeout_seconds)
                    if config.policy.dnsbl else None)
        turns = TurnWriter(loop)
        self.ctx = WorkerContext(
            config, {lst.address: server_options(config, lst) for lst in config.listener}, committer,
            LocalRecipients(config), SchedulerNotifier(config.queue.scheduler_socket, turns),
            ssl_context=server_context(config.tls),
            authenticator=Authenticator(config.auth, cache, config.cache.path),
            limiter=(limiter := RateLimiter(config, cache, connections=connections)),
            access=Access(config, resolver),
            budget=MemoryBudget(config.limits.max_worker_buffered_bytes),
            content=Pipeline(config, STAGES),
            cache=cache,
            shared=SharedLimits(config, limiter) if config.cluster.redis else None,
            writer=turns,
        )
        if self.ctx.shared is not None:
            self._watch = loop.create_task(self.ctx.shared.watch())
        metrics.INBOUND_BUFFERED_LIMIT.set(config.limits.max_worker_buffered_bytes)
        if self.index == 1:
            self.pickup = Pickup(self.ctx, backend, on_crash=lambda: process.stop(shutdown=True))
            self.pickup.start()
        logs.write_each_turn(loop, self.ctx.writer.schedule)  # one write() per turn, before the replies (output.py)
        # What start-up built lives as long as the process: keep it out of the collector's
        # full passes, which otherwise rescan it all every few hundred sessions. Sessions
        # make few reference cycles: collect the young after GC_YOUNG_OBJECTS, not 700.
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
        return None

    async def drain(self, deadline: float) -> None:
        """Retiring: sessions end on their own; shutting down (also once a SIGTERM comes
        during a retirement): idle sessions get 421 4.3.2 now. All of them at the deadline."""
        assert self.ctx is not None and self.process is not None
        if self.pickup is not None:  # its round in progress finishes; cut short, its files stay claimed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pickup.stop(), max(0.0, deadline - time.monotonic()))
        sessions = self.ctx.sessions
        logs.event("draining", sessions=len(sessions), mode="shutdown" if self.process.shutdown else "retire")
        while sessions and time.monotonic() < deadline:
            if self.process.shutdown:
                for session in [s for s in sessions if s.idle]:
                    session.shut_down()
            await asyncio.sleep(0.05)
        for session in list(sessions):
            session.shut_down()
        await asyncio.sleep(0)  # let the transports flush their 421s

    async def close(self) -> dict[str, object]:
        assert self.ctx is not None
        self.ctx.committer.close()
        self.ctx.notifier.close()
        self.ctx.authenticator.close()
        if self._watch is not None:
            self._watch.cancel()
        if self.ctx.shared is not None:
            await self.ctx.shared.close()
        self._backend.close()
        self.ctx.limiter.close()
        self._cache.close()
        self.ctx.writer.before_replies()  # the turn's counts, before the process's files are merged
        logs.write_each_turn(None)  # the last lines out now; "stopped" goes at once
        return {"sessions": len(self.ctx.sessions)}

    def on_frame(self, message: Message, fds: list[int]) -> None:
        assert self.ctx is not None and self.link is not None and self._loop is not None
        if not isinstance(message, messages.Conn):
            raise messages.unexpected(message, "from the master")
        conns = message.conns
        if len(fds) > len(conns):  # the master of this build never sends that: a bug
            raise messages.MessageError(f"a Conn of {len(conns)} entries came with {len(fds)} descriptors")
        # At our fd limit (MSG_CTRUNC) the kernel installs the descriptors in order and
        # drops the rest: the entries without one are refused.
        took = conns[:len(fds)]
        for (_conn_id, address), fd in zip(took, fds):
            listener = self.listeners.get(address)
            if listener is None:  # a listener this generation does not know: cannot serve it
                os.close(fd)
                continue
            # No setblocking: uvloop's uv_tcp_open makes it non-blocking anyway.
            sock = (_Handed(fd, listener.family) if listener.mode != "smtps"
                    else socket.socket(listener.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd))
            self.adopting += 1  # load from now until the session exists (a TLS handshake takes a while)
            self._loop.create_task(self._adopt(sock, listener))
        active = len(self.ctx.sessions) + self.adopting
        if took:
            self.link.send(messages.Took(tuple(conn_id for conn_id, _ in took), active))
        if len(took) < len(conns):
            self.link.send(messages.Refused(tuple(conn_id for conn_id, _ in conns[len(took):]), active))

    async def _adopt(self, sock: socket.socket | _Handed, listener: ListenerConfig) -> None:
        ctx, loop = self.ctx, self._loop
        assert ctx is not None and loop is not None
        implicit_tls = ctx.ssl_context if listener.mode == "smtps" else None
        try:
            if implicit_tls is None:
                await loop.connect_accepted_socket(lambda: InboundProtocol(ctx, listener), sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: InboundProtocol(ctx, listener), sock, ssl=implicit_tls,
                    ssl_handshake_timeout=self.config.tls.handshake_timeout_seconds)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # The client went away between accept and now, or its TLS handshake failed.
            if implicit_tls is not None:
                metrics.INBOUND_TLS.labels("smtps", "failed").inc()
            logs.event("adopt_failed", listener=listener.address, error=str(exc) or type(exc).__name__)
            _close_unadopted(sock)
        except asyncio.CancelledError:  # stopping: a descriptor uvloop never opened is closed
            if isinstance(sock, _Handed):
                sock.discard()
            raise
        finally:
            self.adopting -= 1

    def status(self) -> int:
        if self.ctx is not None:
            metrics.INBOUND_BUFFERED.set(self.ctx.budget.held)  # sampled with the heartbeat, once a second
        return self.adopting + (len(self.ctx.sessions) if self.ctx is not None else 0)


class _Handed:
    """A connection's descriptor from the master, as loop.connect_accepted_socket takes it
    (family, type, fileno(), close()). A socket.socket(fileno=) would first check the
    descriptor with a getsockname: a system call per connection, and uvloop's transport
    asks for the names itself. Once uvloop's handle has opened the descriptor, libuv owns
    and closes it, and uvloop then calls close() (at once, where it would detach a
    socket.socket): close() only records that. `discard` is ours, for an adoption that
    failed or was cancelled before that: it closes a descriptor uvloop did not close.
    Plain listeners only: smtps keeps a socket.socket, since a failed handshake may close
    its transport after connect_accepted_socket has returned."""

    __slots__ = ("_fd", "family", "type")

    def __init__(self, fd: int, family: int) -> None:
        self.family = family
        self.type = socket.SOCK_STREAM
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._fd = -1  # libuv has closed it

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _close_unadopted(sock: socket.socket | _Handed) -> None:
    """After a failed adoption: the descriptor closed unless uvloop did (a socket.socket
    it detached closes nothing)."""
    if isinstance(sock, _Handed):
        sock.discard()
    else:
        sock.close()
