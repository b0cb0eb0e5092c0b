"""The SASL exchange of SMTP AUTH (RFC 4954): PLAIN and LOGIN, from AUTH to Credentials.

    refusal = check_start(command, ...)      # the reply that refuses this AUTH, or None
    exchange = SaslExchange(command.mechanism)
    exchange.start(command.initial)          # -> Reply (334 challenge, or the one ending it) | Credentials
    exchange.respond(line)                   # the same, for each response line of the client

An exchange is `done` once it produced Credentials or ended in an error ("*" aborts;
bad base64, bad UTF-8 or a PLAIN message without its three parts is malformed).
The decoded password leaves only inside Credentials (never in a repr or a Reply);
checking it is the application's.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Final

from mta.smtp import replies
from mta.smtp.commands import Auth
from mta.smtp.replies import Reply
from mta.smtp.states import State

LOGIN_USERNAME: Final = Reply(334, "", base64.b64encode(b"Username:").decode())
LOGIN_PASSWORD: Final = Reply(334, "", base64.b64encode(b"Password:").decode())
PLAIN_READY: Final = Reply(334, "", "")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A completed SASL exchange awaiting verification; the password never leaves the app."""

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""  # PLAIN's authorisation identity; anything but "" or username must fail


def check_start(command: Auth, *, mechanisms: tuple[str, ...], state: State, esmtp: bool,
                authenticated: bool, offered: bool) -> Reply | None:
    """Why this AUTH may not start now, as the reply (None: it may)."""
    if not mechanisms:
        return replies.AUTH_NOT_ENABLED
    if not esmtp or state in (State.CONNECTED, State.GREETED):
        return replies.AUTH_NEED_EHLO
    if state is not State.READY:
        return replies.AUTH_IN_TRANSACTION
    if authenticated:
        return replies.AUTH_ALREADY
    if not offered:
        return replies.AUTH_NEEDS_TLS
    if command.mechanism not in mechanisms:
        return replies.AUTH_UNKNOWN_MECHANISM
    return None


class SaslExchange:
    __slots__ = ("mechanism", "done", "_username")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.done = False
        self._username: str | None = None  # LOGIN: the first response

    def start(self, initial: str | None) -> Reply | Credentials:
        if initial is not None:
            return self.respond(initial)
        return PLAIN_READY if self.mechanism == "PLAIN" else LOGIN_USERNAME

    def respond(self, line: str) -> Reply | Credentials:
        if line.strip() == "*":
            self.done = True
            return replies.AUTH_ABORTED
        decoded = _decode(line)
        if decoded is None:
            self.done = True
            return replies.AUTH_MALFORMED
        if self.mechanism == "LOGIN" and self._username is None:
            self._username = decoded
            return LOGIN_PASSWORD
        self.done = True
        if self.mechanism == "LOGIN":
            assert self._username is not None
            return Credentials("LOGIN", self._username, decoded)
        parts = decoded.split("\0")
        if len(parts) != 3:
            return replies.AUTH_MALFORMED
        return Credentials("PLAIN", parts[1], parts[2], authzid=parts[0])


def _decode(line: str) -> str | None:
    """A SASL response (base64, "=" for empty) -> text; None when malformed."""
    text = line.strip()
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # bad base64 or not UTF-8
        return None
