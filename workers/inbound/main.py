"""The inbound worker process: a uvloop event loop serving SMTP on listening sockets.

`run(config, sockets)` is the process body the master forks into: it opens the LMDB
spool (after fork, never before), starts one GroupCommitter (the process's single
queue writer thread) and serves every listener until SIGTERM/SIGINT. On a stop
signal it closes the listeners, sends 421 4.3.2 to idle sessions, lets sessions
inside a transaction finish (up to `drain_seconds`), then flushes the committer.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from dataclasses import dataclass, field

import uvloop

from mta import logs
from mta.config import Config, ListenerConfig
from mta.smtp.server import ServerOptions
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.committer import GroupCommitter
from workers.inbound.protocol import InboundProtocol

DRAIN_SECONDS = 30.0


@dataclass
class WorkerContext:
    config: Config
    server_options: ServerOptions
    committer: GroupCommitter
    sessions: set[InboundProtocol] = field(default_factory=set)
    connections_per_ip: dict[str, int] = field(default_factory=dict)


def server_options(config: Config) -> ServerOptions:
    limits = config.limits
    return ServerOptions(
        hostname=config.server.hostname,
        max_message_bytes=limits.max_message_bytes,
        max_recipients=limits.max_recipients,
        max_errors=limits.max_errors,
        max_received_headers=limits.max_received_headers,
        bare_newline=limits.bare_newline,
    )


def run(config: Config, sockets: list[tuple[ListenerConfig, socket.socket]]) -> int:
    logs.setup("inbound")
    return uvloop.run(_serve(config, sockets))


async def _serve(config: Config, sockets: list[tuple[ListenerConfig, socket.socket]]) -> int:
    loop = asyncio.get_running_loop()
    backend = LmdbBackend(config.queue.path, config.queue.max_size_bytes)
    committer = GroupCommitter(backend, loop)
    ctx = WorkerContext(config, server_options(config), committer)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = []
    for listener, sock in sockets:
        server = await loop.create_server(lambda lst=listener: InboundProtocol(ctx, lst), sock=sock)
        servers.append(server)
        logs.event("listening", address=listener.address, mode=listener.mode)
    logs.event("ready", spool=config.queue.path)
    await stop.wait()
    logs.event("draining", sessions=len(ctx.sessions))
    for server in servers:
        server.close()
    deadline = time.monotonic() + DRAIN_SECONDS
    while ctx.sessions and time.monotonic() < deadline:
        for session in [s for s in ctx.sessions if s.idle]:
            session.shut_down()
        await asyncio.sleep(0.05)
    for session in list(ctx.sessions):
        session.shut_down()
    await asyncio.sleep(0)
    committer.close()
    backend.close()
    logs.event("stopped")
    return 0
