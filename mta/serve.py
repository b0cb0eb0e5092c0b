"""`mta serve`: take the spool lock, bind every listener, run the inbound process.

This is the code path the prefork master takes: listeners are bound once here, and
the inbound worker body (`workers.inbound.main.run`) receives them. Until the master
exists the worker runs in this process; with the master it runs in forked children.

Only one server may run on one spool: an exclusive flock on <queue path>/mta.lock,
held for the life of the process, released by the kernel even on kill -9.
"""

from __future__ import annotations

import fcntl
import os
import socket

from mta import logs
from mta.config import Config, ListenerConfig


class ServeError(RuntimeError):
    """The server cannot start; the message tells the operator what to do."""


def lock_spool(path: str) -> int:
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, "mta.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServeError(f"another mta is already serving the queue at {path} "
                         "(stop it first, or give this one its own [queue] path)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def bind(listener: ListenerConfig) -> socket.socket:
    host, port = listener.host, listener.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=False)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listener.address}: {exc.strerror} "
                         "(is another server using that port?)") from None
    sock.setblocking(False)
    return sock


def serve(config: Config) -> int:
    logs.setup("master")
    lock_fd = lock_spool(config.queue.path)
    sockets = [(listener, bind(listener)) for listener in config.listener]
    logs.event("starting", config=config.source, listeners=",".join(l.address for l in config.listener))
    from workers.inbound.main import run  # imported here: nothing event-loop related before fork
    try:
        return run(config, sockets)
    finally:
        os.close(lock_fd)
