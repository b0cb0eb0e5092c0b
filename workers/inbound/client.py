"""Who is connected to a session: the TCP peer, or the source a trusted proxy's PROXY header named.

Immutable: `UNKNOWN_CLIENT` stands for every session's client until its connect is decided.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from mta.config import Network
from workers.inbound.policy import IPAddress


@dataclass(frozen=True, slots=True)
class Client:
    """Who is connected: the peer, or the source a trusted proxy's PROXY header named."""

    ip: str = "unknown"
    port: int = 0
    address: IPAddress | None = None  # None: never in mynetworks (no IP peer, or PROXY LOCAL)

    @classmethod
    def at(cls, ip: str, port: int) -> Client:
        return cls(ip, port, _parsed(ip))

    def within(self, networks: tuple[Network, ...]) -> bool:
        return self.address is not None and any(self.address in net for net in networks)


UNKNOWN_CLIENT = Client()  # before the connect is decided (immutable: one for every session)


@functools.lru_cache(maxsize=4096)
def _parsed(ip: str) -> IPAddress:
    """An address parsed once while its client keeps coming back (ipaddress parses slowly)."""
    return ipaddress.ip_address(ip)
