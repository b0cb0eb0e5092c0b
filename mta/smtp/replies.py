"""SMTP replies: the Reply value and every canonical reply the server sends.

One place for codes, enhanced status codes (RFC 3463) and texts, so transcripts, the
server core and the workers agree. Texts never echo unsanitised client input.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


class ReplyClass:
    """ok / temporary / permanent from an SMTP reply code (mixed into reply values)."""

    __slots__ = ()
    code: int

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # enhanced status code "x.y.z", or "" where none applies (220, EHLO)
    text: str | tuple[str, ...]
    # Made with the value, read per reply sent (most are the constants below, sent per message).
    positive: bool = field(init=False, repr=False, compare=False)  # 2xx or 3xx
    wire: bytes = field(init=False, repr=False, compare=False)  # as sent: "code-"/"code " lines, CRLF

    def __post_init__(self) -> None:
        if type(self.text) is str:  # one line, as most are (queued's, per message): no tuples
            wire = f"{self.code} {self.status} {self.text}\r\n" if self.status else f"{self.code} {self.text}\r\n"
        else:
            wire = self._wire_from_lines()
        object.__setattr__(self, "positive", self.code < 400)  # frozen
        object.__setattr__(self, "wire", wire.encode("utf-8", "replace"))

    def _wire_from_lines(self) -> str:
        """The wire form of any number of lines: the reference for __post_init__'s one-line case."""
        lines = self.lines
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n")
        return "".join(out)

    @property
    def lines(self) -> tuple[str, ...]:
        texts = (self.text,) if isinstance(self.text, str) else self.text
        prefix = f"{self.status} " if self.status else ""
        return tuple(f"{prefix}{t}" for t in texts)

    def __str__(self) -> str:
        return " ".join((str(self.code), *self.lines))


# Positive
OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# Sequence and syntax
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Error: bad characters in command line")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
MIXED_BDAT_DATA = Reply(503, "5.5.1", "Error: DATA and BDAT cannot be mixed in one transaction")
EXPN_DISABLED = Reply(502, "5.5.1", "Error: EXPN not available")
SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization (commands sent before 354)")
NO_PARAMETERS = Reply(501, "5.5.4", "Syntax: this command takes no parameters")


def syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


def bad_parameter(why: str) -> Reply:
    return Reply(501, "5.5.4", f"Error: {why}")


def unknown_parameter(name: str) -> Reply:
    return Reply(555, "5.5.4", f"Error: unsupported parameter {sanitize(name, 32)}")


def bad_sender(why: str) -> Reply:
    return Reply(501, "5.1.7", f"Bad sender address syntax: {why}")


def bad_recipient(why: str) -> Reply:
    return Reply(501, "5.1.3", f"Bad recipient address syntax: {why}")


UTF8_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (Received headers)")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> in message content (only <CR><LF> is allowed)")
QUEUE_FULL = Reply(452, "4.3.1", "Error: insufficient system storage, try again later")
QUEUE_ERROR = Reply(451, "4.3.0", "Error: queue write failed, try again later")
MEMORY_BUSY = Reply(452, "4.3.1", "Error: insufficient system resources, try again later")  # at MAIL
MEMORY_DISCARDED = Reply(451, "4.3.1", "Error: insufficient system resources, message discarded, try again later")
LOCAL_ERROR = Reply(421, "4.3.0", "Error: local error in processing, closing connection")
CONNECTION_LIMIT = Reply(421, "4.7.0", "Error: too many connections from your address")

# TLS and AUTH (RFC 3207, RFC 4954)
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "Error: command not implemented")
TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Error: encryption required for requested authentication mechanism")
AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_MALFORMED = Reply(501, "5.5.2", "Error: malformed authentication data (base64 expected)")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Error: sender address not owned by the authenticated user")


# The content pipeline's verdicts at end of data (a milter may give its own reply instead).
CONTENT_REJECTED = Reply(550, "5.7.1", "Error: message content rejected")
CONTENT_TEMPFAIL = Reply(451, "4.7.1", "Error: content filter unavailable, try again later")
VIRUS_SCAN_FAILED = Reply(451, "4.7.1", "Error: virus scan unavailable, try again later")
TOO_MANY_PARTS = Reply(554, "5.7.1", "Error: message refused, too many MIME parts to check its attachments")


def attachment_refused(name: str) -> Reply:
    return Reply(554, "5.7.1", f"Error: attachment {sanitize(name)!r} refused: its file type is not accepted here")


def virus_found(signature: str) -> Reply:
    return Reply(554, "5.7.1", f"Error: message refused, it contains a virus ({sanitize(signature)})")


def too_many_junk_commands(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many NOOP/RSET/HELP/VRFY/EXPN commands, closing connection")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def chunk_ok(octets: int) -> Reply:
    return Reply(250, "2.0.0", f"Ok: {octets} octets received")


@functools.lru_cache(maxsize=64)  # the same few per process: made once, not per session
def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP")


@functools.lru_cache(maxsize=64)  # the same few per process: made once, not per session
def ehlo(hostname: str, max_message_bytes: int, *, starttls: bool, auth: tuple[str, ...]) -> Reply:
    """Our EHLO reply: the extensions offered (STARTTLS before TLS only, AUTH when offered)."""
    lines = [hostname, "PIPELINING", f"SIZE {max_message_bytes}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
             "CHUNKING", "DSN"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH " + " ".join(auth))
    return Reply(250, "", tuple(lines))


@functools.lru_cache(maxsize=64)  # the same few per process: made once, not per session
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors, closing connection")


def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded, closing connection")


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing connection")


def too_busy(hostname: str) -> Reply:
    """Beyond [limits] max_sessions or max_sessions_per_worker (the master answers it)."""
    return Reply(421, "4.3.2", f"{hostname} Service not available, too busy, closing connection")


def sanitize(text: str, limit: int = 64) -> str:
    """Client text made safe to echo in a reply or a log line: printable, bounded."""
    clean = "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")
