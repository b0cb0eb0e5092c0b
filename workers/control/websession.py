"""The web UI's sessions, CSRF tokens and failed-login lockout (the control process's memory).

A login makes a Session: a random id (the mta_session cookie, HttpOnly, SameSite=Strict,
Secure over TLS) and a random CSRF token the page sends back as X-CSRF-Token on every
request that changes something. A session ends at logout, after `idle_seconds` without a
request, LIFETIME_SECONDS after its login whatever its use (an open overview asks every
10 s: idle alone would never end it), when the token it logged in with changes (SIGHUP),
when the admin it logged in as is deleted or gets a new password (webui.py), or with the
process (a restart logs everyone out).

Failed logins count per client address like SMTP AUTH ([auth] max_failures within
lockout_seconds of the first): at the limit, every login from that address is refused,
even a right one, until the window ends. An IPv6 client counts per /64 (one host holds a
whole /64: per address it would have endless guesses). Loopback is not exempt: over the
documented SSH tunnel every remote user is loopback.

Invariants: at most MAX_SESSIONS sessions and MAX_ADDRESSES counted addresses (the oldest
go first); ids and CSRF tokens compare in constant time. Pure: no I/O, no clock reads
(pass `now`).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Final

COOKIE: Final = "mta_session"
MAX_SESSIONS: Final = 1000
MAX_ADDRESSES: Final = 10000
SECRET_BYTES: Final = 32
LIFETIME_SECONDS: Final = 12 * 3600  # a working day; at least [control] session_seconds
IPV6_PREFIX: Final = 64  # the lockout counts an IPv6 client per /64


@dataclass
class Session:
    user: str  # an admin user's name, or "token"
    csrf: str
    last_seen: float
    id: str = field(repr=False, default="")
    created: float = 0.0
    credential: str = field(repr=False, default="")  # an admin's scrypt hash at login; "" for the token
    admins_stamp: tuple[int, int, int] | None = None  # the admin users file then (inode, mtime_ns, size)

    def check_csrf(self, given: bytes | None) -> bool:
        return given is not None and hmac.compare_digest(given.strip(), self.csrf.encode())


class Sessions:
    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._by_id: dict[str, Session] = {}  # insertion order: the oldest login first

    def create(self, user: str, now: float) -> Session:
        self._expire(now)
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        session = Session(user, secrets.token_urlsafe(SECRET_BYTES), now, secrets.token_urlsafe(SECRET_BYTES), now)
        self._by_id[session.id] = session
        return session

    def find(self, cookie_header: bytes | None, now: float) -> Session | None:
        """The live session the Cookie header names (its idle clock restarts), else None."""
        wanted = session_id(cookie_header)
        if wanted is None:
            return None
        session = self._by_id.get(wanted)
        if session is None or not hmac.compare_digest(session.id, wanted):
            return None
        if self._over(session, now):
            del self._by_id[session.id]
            return None
        session.last_seen = now
        return session

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)

    def end_all(self, user: str) -> None:
        """Every session of `user` ends (the token's, when [control] token changes)."""
        for sid in [sid for sid, s in self._by_id.items() if s.user == user]:
            del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self._by_id.items() if self._over(s, now)]:
            del self._by_id[sid]

    def _over(self, session: Session, now: float) -> bool:
        return (now - session.last_seen >= self.idle_seconds
                or now - session.created >= max(LIFETIME_SECONDS, self.idle_seconds))


def session_id(cookie_header: bytes | None) -> str | None:
    """The mta_session value of a Cookie header, else None."""
    for part in (cookie_header or b"").split(b";"):
        name, eq, value = part.strip().partition(b"=")
        if eq and name == COOKIE.encode() and value:
            return value.decode("ascii", "replace")
    return None


def set_cookie(session: Session, secure: bool) -> bytes:
    return _cookie(session.id, secure, "")


def clear_cookie(secure: bool) -> bytes:
    return _cookie("", secure, "; Max-Age=0")


def _cookie(value: str, secure: bool, extra: str) -> bytes:
    flags = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "") + extra
    return f"Set-Cookie: {COOKIE}={value}{flags}\r\n".encode()


class Lockout:
    """Failed logins per client address: [auth] max_failures within lockout_seconds."""

    def __init__(self, max_failures: int, lockout_seconds: float) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (first failure, failures)
        self._checking: dict[str, int] = {}  # address -> logins being checked now (they may fail)

    def check(self, address: str, now: float) -> float:
        """0 when `address` may try a login now, else the seconds until it may."""
        address = counted_as(address)
        start, failures = self._window(address, now)
        if failures + self._checking.get(address, 0) < self.max_failures:
            return 0.0
        return max(start + self.lockout_seconds - now, 1.0)

    def begin(self, address: str) -> None:
        """A login from `address` is being checked: parallel guesses count before they fail."""
        address = counted_as(address)
        self._checking[address] = self._checking.get(address, 0) + 1

    def end(self, address: str) -> None:
        address = counted_as(address)
        left = self._checking.pop(address) - 1
        if left:
            self._checking[address] = left

    def fail(self, address: str, now: float) -> None:
        address = counted_as(address)
        start, failures = self._window(address, now)
        self._windows.pop(address, None)  # re-inserted last: the oldest windows go first
        while len(self._windows) >= MAX_ADDRESSES:
            del self._windows[next(iter(self._windows))]
        self._windows[address] = (start if failures else now, failures + 1)

    def _window(self, address: str, now: float) -> tuple[float, int]:
        start, failures = self._windows.get(address, (now, 0))
        if now - start >= self.lockout_seconds:
            del self._windows[address]
            return now, 0
        return start, failures


def counted_as(address: str) -> str:
    """The key `address` counts under: an IPv4 address itself, an IPv6 address its /64."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if not isinstance(ip, ipaddress.IPv6Address):
        return address
    if ip.ipv4_mapped is not None:  # ::ffff:192.0.2.1 is 192.0.2.1
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
