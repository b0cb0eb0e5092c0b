"""What every session of one inbound worker shares: the configuration and the worker's services.

Built once per worker process (main.py) after the fork; read by the sessions
(session.py decides with it, protocol.py adapts sockets to it). `sessions` holds the
live connections so a drain can close the idle ones; `writer` writes their replies and the
log lines once per turn of the loop (output.py). `loop` is the worker's event loop,
looked up once: per-connection paths use it, never asyncio.get_running_loop() and the
conveniences built on it (CPython 3.11 asks the kernel for the pid on each of those calls).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Protocol

from mta.config import Config
from mta.smtp.server import ServerOptions
from mtaqueue import MessageId, NewMessage
from mtaqueue.cache_lmdb import LmdbCache
from workers.inbound.access import Access
from workers.inbound.auth import Authenticator
from workers.inbound.budget import MemoryBudget
from workers.inbound.content import Pipeline
from workers.inbound.output import TurnWriter
from workers.inbound.policy import LocalRecipients
from workers.inbound.ratelimit import RateLimiter
from workers.inbound.sharedlimits import SharedLimits


class Committer(Protocol):
    """The durable store (mtaqueue.committer.GroupCommitter): returns once `message` (or every
    one of `messages`, in one transaction) is fsynced; raises QueueFull or QueueError."""

    async def commit(self, message: NewMessage) -> None: ...

    async def commit_all(self, messages: tuple[NewMessage, ...]) -> None: ...


class Notifier(Protocol):
    """Tells the scheduler about a committed message (notify.SchedulerNotifier); best effort."""

    def new(self, msgid: MessageId) -> None: ...


class Connection(Protocol):
    """A live client connection, as a drain sees it (protocol.InboundProtocol)."""

    @property
    def idle(self) -> bool: ...

    def shut_down(self) -> None: ...


@dataclass
class WorkerContext:
    config: Config
    server_options: dict[str, ServerOptions]  # by listener address
    committer: Committer
    local: LocalRecipients
    notifier: Notifier
    ssl_context: ssl.SSLContext | None
    authenticator: Authenticator
    limiter: RateLimiter
    access: Access
    budget: MemoryBudget
    content: Pipeline
    cache: LmdbCache | None = None  # the shared cache (transferin.py's ids); None in unit tests
    shared: SharedLimits | None = None  # [cluster] redis: the cluster-wide rate windows and AUTH failures
    sessions: set[Connection] = field(default_factory=set)
    writer: TurnWriter = field(default_factory=TurnWriter)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop, looked up on first use (inside it) and kept."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop
