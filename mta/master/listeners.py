"""The listening sockets: bind every configured address, keep unchanged ones on reload.

`bind_all` reuses a socket already bound to an address that is still configured, so a
reload never closes a listener (no refused connections); a bind that fails closes what
this call opened and raises ServeError naming the address.
"""

from __future__ import annotations

import socket

from mta.config import Config, ListenerConfig


class ServeError(RuntimeError):
    """The server cannot start (or a reload cannot apply); the message tells the operator what to do."""


def bind_listener(listener: ListenerConfig) -> socket.socket:
    try:
        sock = socket.create_server((listener.host, listener.port), family=listener.family, backlog=1024, reuse_port=False)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listener.address}: {exc.strerror} "
                         "(is another server using that port?)") from None
    sock.setblocking(False)
    return sock


def bind_all(config: Config, existing: dict[str, socket.socket]) -> dict[str, socket.socket]:
    """A socket per configured listener address, reusing the ones already bound."""
    bound: dict[str, socket.socket] = {}
    try:
        for listener in config.listener:
            bound[listener.address] = existing.get(listener.address) or bind_listener(listener)
    except ServeError:
        for address, sock in bound.items():
            if address not in existing:
                sock.close()
        raise
    return bound
