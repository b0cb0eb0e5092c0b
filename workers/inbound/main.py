"""The inbound worker process: a uvloop event loop serving SMTP sessions the master hands over.

`run(config, channel, generation, index)` is the body of a forked child. It opens the
LMDB spool (after fork, never before), starts the process's one queue writer thread
(GroupCommitter), then takes connections from its SEQPACKET channel to the master
(mta/messages.py):

  master -> worker  Conn(id, listener) + the socket (SCM_RIGHTS)
  worker -> master  Took(id, active)      as soon as it owns it
  worker -> master  Refused(id, active)   the Conn came without its socket (the kernel
                    drops it at our fd limit); the master answers 421
  worker -> master  Status(state "ready"|"retiring", active) every second

The Status is the heartbeat: it is sent from the event loop, so a blocked loop goes
silent and the master replaces the worker.

Signals: SIGTERM/SIGINT = shutdown (idle sessions get 421 4.3.2 now, transactions
finish, up to [server] drain_timeout_seconds); SIGUSR1 = retire (a reload: sessions end
on their own, up to the same timeout). Test hooks, only with MTA_TEST_HOOKS=1 in the environment:
SIGUSR2 blocks the event loop (heartbeat supervision); a file named `crash-workers`
in the spool makes workers exit at start (spawn back-off).
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field

from mta import logs, messages, metrics
from mta.config import Config, ListenerConfig
from mta.messages import Message
from mta.smtp.server import ServerOptions
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.cache_lmdb import LmdbCache
from mtaqueue.committer import GroupCommitter
from mta.tls import server_context
from workers.delivery.mx import MxResolver
from workers.inbound.access import Access
from workers.inbound.auth import Authenticator
from workers.inbound.budget import MemoryBudget
from workers.inbound.ratelimit import RateLimiter
from workers.inbound.notify import SchedulerNotifier
from workers.inbound.policy import LocalRecipients
from workers.inbound.protocol import InboundProtocol
from workers.link import MasterLink


@dataclass
class WorkerContext:
    config: Config
    server_options: dict[str, ServerOptions]  # by listener address
    committer: GroupCommitter
    local: LocalRecipients
    notifier: SchedulerNotifier
    ssl_context: ssl.SSLContext | None
    authenticator: Authenticator
    limiter: RateLimiter
    access: Access
    budget: MemoryBudget
    sessions: set[InboundProtocol] = field(default_factory=set)


AUTH_MECHANISMS = ("PLAIN", "LOGIN")


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
    import uvloop  # imported in the child: the master never has an event loop

    logs.setup(f"inbound#{index}")
    if os.environ.get("MTA_TEST_HOOKS") == "1" and os.path.exists(os.path.join(config.queue.path, "crash-workers")):
        logs.event("test_hook", hook="crash-workers")  # lets tests exercise the spawn back-off
        return 3
    faulthandler.enable()  # SIGABRT from the master prints where the loop was stuck
    return uvloop.run(Worker(config, channel, generation).serve())


def _observe_commit(messages: int, seconds: float) -> None:
    metrics.QUEUE_COMMIT_SECONDS.observe(seconds)
    metrics.QUEUE_COMMIT_MESSAGES.observe(messages)


class Worker:
    def __init__(self, config: Config, channel: socket.socket, generation: int) -> None:
        self.config = config
        self.channel = channel
        self.generation = generation
        self.listeners: dict[str, ListenerConfig] = {lst.address: lst for lst in config.listener}
        self.state = "ready"
        self._stop = asyncio.Event()
        self._shutdown = False
        self.link: MasterLink | None = None
        self.ctx: WorkerContext | None = None
        self.adopting = 0  # sockets taken whose session has not started (e.g. in a TLS handshake)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        config = self.config
        backend = LmdbBackend(config.queue.path, config.queue.max_size_bytes)
        committer = GroupCommitter(backend, loop, on_commit=_observe_commit)
        cache = LmdbCache(config.cache.path, config.cache.max_size_bytes, config.cache.max_entries)
        resolver = (MxResolver(list(config.dns.nameservers), cache, config.dns.timeout_seconds)
                    if config.policy.dnsbl else None)
        self.ctx = WorkerContext(
            config, {lst.address: server_options(config, lst) for lst in config.listener}, committer,
            LocalRecipients(config), SchedulerNotifier(config.queue.scheduler_socket),
            ssl_context=server_context(config.tls),
            authenticator=Authenticator(config.auth, cache, config.cache.path),
            limiter=RateLimiter(config, cache),
            access=Access(config, resolver),
            budget=MemoryBudget(config.limits.max_worker_buffered_bytes),
        )
        metrics.INBOUND_BUFFERED_LIMIT.set(config.limits.max_worker_buffered_bytes)
        loop.add_signal_handler(signal.SIGTERM, self._stop_now, True)
        loop.add_signal_handler(signal.SIGINT, self._stop_now, True)
        loop.add_signal_handler(signal.SIGUSR1, self._stop_now, False)
        if os.environ.get("MTA_TEST_HOOKS") == "1":
            loop.add_signal_handler(signal.SIGUSR2, time.sleep, 3600)
        self.link = MasterLink(self.channel, self._status, lambda: self._stop_now(True), self._on_frame,
                               report_drops=True)
        self.link.start()
        await self._stop.wait()
        self.link.stop_reading()
        await self._drain()
        committer.close()
        self.ctx.notifier.close()
        self.ctx.authenticator.close()
        backend.close()
        cache.close()
        logs.event("stopped", sessions=len(self.ctx.sessions))
        return 0

    def _stop_now(self, shutdown: bool) -> None:
        self._shutdown = self._shutdown or shutdown
        self.state = "retiring"
        self._stop.set()
        if self.link is not None:
            self.link.send_status()

    async def _drain(self) -> None:
        assert self.ctx is not None
        sessions = self.ctx.sessions
        logs.event("draining", sessions=len(sessions), mode="shutdown" if self._shutdown else "retire")
        deadline = time.monotonic() + self.config.server.drain_timeout_seconds
        while sessions and time.monotonic() < deadline:
            if self._shutdown:
                for session in [s for s in sessions if s.idle]:
                    session.shut_down()
            await asyncio.sleep(0.05)
        for session in list(sessions):
            session.shut_down()
        await asyncio.sleep(0)  # let the transports flush their 421s

    def _on_frame(self, message: Message, fds: list[int]) -> None:
        assert self.ctx is not None and self.link is not None
        if not isinstance(message, messages.Conn):
            raise messages.unexpected(message, "from the master")
        if len(fds) != 1:  # no room for the descriptor here (MSG_CTRUNC)
            for fd in fds:
                os.close(fd)
            self.link.send(messages.Refused(message.id, len(self.ctx.sessions) + self.adopting))
            return
        sock = socket.socket(fileno=fds[0])
        listener = self.listeners.get(message.listener)
        if listener is not None:
            self.adopting += 1  # load from now until the session exists (a TLS handshake takes a while)
        self.link.send(messages.Took(message.id, len(self.ctx.sessions) + self.adopting))
        if listener is None:  # a listener this generation does not know: cannot serve it
            sock.close()
            return
        sock.setblocking(False)
        asyncio.get_running_loop().create_task(self._adopt(sock, listener))

    async def _adopt(self, sock: socket.socket, listener: ListenerConfig) -> None:
        ctx = self.ctx
        assert ctx is not None
        loop = asyncio.get_running_loop()
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
            sock.close()
        finally:
            self.adopting -= 1

    def _status(self) -> messages.Status:
        if self.ctx is not None:
            metrics.INBOUND_BUFFERED.set(self.ctx.budget.held)  # sampled with the heartbeat, once a second
        return messages.Status(self.state, self.adopting + (len(self.ctx.sessions) if self.ctx is not None else 0))
