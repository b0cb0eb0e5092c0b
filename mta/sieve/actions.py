"""What a Sieve script decided, as data for delivery (workers/delivery) to carry out.

`evaluate` returns them in script order with duplicates removed (RFC 5228 2.10.3) and the
implicit keep added last when nothing cancelled it (2.10.2). Discard is listed when the
script ran it; it does nothing by itself (an explicit keep still keeps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keep:
    """Store in INBOX (also what `fileinto "INBOX"` becomes)."""


@dataclass(frozen=True, slots=True)
class FileInto:
    """Store in the folder (Maildir++ `.folder`); create: the script used :create (RFC 5490)."""
    folder: str
    create: bool


@dataclass(frozen=True, slots=True)
class Discard:
    """Cancel the implicit keep; nothing else."""


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the message on to address (an addr-spec, `user@domain`), with its original
    envelope sender (RFC 5228 4.2)."""
    address: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the message with reason (RFC 5429): at SMTP time if possible (extended: ereject
    asks for that), else by a bounce (an MDN for reject)."""
    reason: str
    extended: bool


@dataclass(frozen=True, slots=True)
class Vacation:
    """An auto-reply (RFC 5230); mta/sieve/vacation.py decides whether and what to send."""
    reason: str
    days: int
    subject: str | None
    from_: str | None
    addresses: tuple[str, ...]
    mime: bool
    handle: str | None


Action = Keep | FileInto | Discard | Redirect | Reject | Vacation
