"""Where a content peer listens (a milter, clamd): `<kind>:host:port` or `unix:/path`.

Each peer's address class names its TCP kinds (Postfix's `inet:` for milters, clamd.conf's
`tcp:`); an IPv6 host is written in brackets, `<kind>:[::1]:port`, and printed back so.
Invariant: exactly one of (host and port) or path is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self


@dataclass(frozen=True, slots=True)
class PeerAddress:
    KINDS: ClassVar[tuple[str, ...]] = ("tcp",)  # the TCP kinds accepted; the first is printed
    WHAT: ClassVar[str] = "peer"

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Self:
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest.startswith("/"):
            return cls(path=rest)
        if kind in cls.KINDS:
            host, _, port = rest.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if host and port.isdigit() and 0 < int(port) < 65536:
                return cls(host=host, port=int(port))
        raise ValueError(f"{cls.WHAT} address {text!r}: use {cls.usage()}")

    @classmethod
    def usage(cls) -> str:
        return f"{cls.KINDS[0]}:host:port or unix:/path ({cls.KINDS[0]}:[::1]:port for IPv6)"

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.KINDS[0]}:{host}:{self.port}"
