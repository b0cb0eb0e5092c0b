"""Server replies as the SMTP/LMTP client reads them: ServerReply, the line parsers, EHLO extensions.

    parse_reply([b"250 2.1.5 Ok"], Verb.RCPT)  -> ServerReply(250, "2.1.5", ("Ok",), Verb.RCPT)
    parse_extensions(reply.lines)              -> Extensions({"PIPELINING": "", "SIZE": "1000"})

A reply's lines come framed (CRLF removed) from ClientConnection (client.py), which
matches each reply to the Verb it answers. A malformed reply raises ProtocolError: the
peer's fault. Servers repeat a few replies ("250 2.1.5 Ok"): a single-line reply is
parsed once per process and its ServerReply (immutable) served again (_PARSED, by line
and verb, emptied when full; the final dot's too: a server's queue ids churn it).
Pure: no I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from mta.smtp.replies import ReplyClass

MAX_REPLY_LINE: Final = 4096  # octets; RFC 5321 says 512, real servers send longer text
MAX_REPLY_LINES: Final = 256  # lines in one multi-line reply
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")
_KEYWORD = re.compile(r"[A-Z0-9][A-Z0-9-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ProtocolError(Exception):
    """The server broke the protocol; the connection cannot be used any more."""


class Verb(enum.Enum):
    """What a reply answers."""

    GREETING = "greeting"
    EHLO = "EHLO"  # LHLO under LMTP
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DOT = "end of data"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"

    # Singletons: hashed by identity, in C (Enum's __hash__ is a Python call; replies look verbs up).
    __hash__ = object.__hash__


# The per-message verbs as globals: reading a member through its Enum class costs ~4 times more.
_MAIL, _RCPT, _DATA, _DOT, _STARTTLS = Verb.MAIL, Verb.RCPT, Verb.DATA, Verb.DOT, Verb.STARTTLS


# Reply classes (code // 100) each command may get; anything else is a ProtocolError.
_ALLOWED_CLASSES: Final[dict[Verb, frozenset[int]]] = (
    {verb: frozenset((2, 4, 5)) for verb in Verb} | {Verb.DATA: frozenset((3, 4, 5))})


@dataclass(frozen=True, slots=True)
class ServerReply(ReplyClass):
    code: int
    status: str  # enhanced status code "x.y.z" (RFC 3463), "" when the reply has none
    lines: tuple[str, ...]  # text of each line, status removed, control characters replaced
    command: Verb | None = None  # what it answers; None from parse_reply()
    # The lines' text joined (empty lines left out): made once, as the reply is (most are
    # parsed once per process), read for every recipient it answers.
    text: str = field(init=False, compare=False, repr=False)
    # ReplyClass.ok as a value, not a property call: read several times per message.
    ok: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", " ".join(line for line in self.lines if line))  # frozen
        object.__setattr__(self, "ok", 200 <= self.code < 300)

    def __str__(self) -> str:
        return " ".join(str(part) for part in (self.code, self.status, self.text) if part)


@dataclass(frozen=True, slots=True)
class Extensions:
    """The EHLO keywords (upper case) and their parameters, as the server listed them."""

    keywords: dict[str, str]
    # The SIZE limit in octets; None when absent, 0 ("no fixed limit") or malformed.
    # Worked out once: every message checks it.
    max_size: int | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        value = self.keywords.get("SIZE", "")
        limit = int(value) if value.isdigit() and 0 < len(value) <= 20 and int(value) > 0 else None
        object.__setattr__(self, "max_size", limit)  # frozen

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.keywords


NO_EXTENSIONS = Extensions({})

# Single-line replies parsed before, by (line, command): ClientConnection fills it.
_PARSED: dict[tuple[bytes, Verb | None], ServerReply] = {}
MAX_PARSED: Final = 1024


def parse_extensions(lines: tuple[str, ...]) -> Extensions:
    """The lines of a 250 EHLO reply -> Extensions (the first line is the greeting)."""
    keywords: dict[str, str] = {}
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if _KEYWORD.fullmatch(keyword):
            keywords[keyword] = params.strip()
    return Extensions(keywords)


def parse_reply(lines: list[bytes], command: Verb | None = None) -> ServerReply:
    """Complete reply lines (CRLF removed) -> ServerReply (answering `command`). Raises only ProtocolError."""
    if not lines:
        raise ProtocolError("empty reply")
    if len(lines) == 1:
        return _parse_line(lines[0], command)
    return _parse_lines(lines, command)


def _parse_lines(lines: list[bytes], command: Verb | None) -> ServerReply:
    code = _check_line(lines[0])
    texts: list[str] = []
    for i, raw in enumerate(lines):
        if _check_line(raw) != code:
            raise ProtocolError("multi-line reply with mixed reply codes")
        last = i == len(lines) - 1
        if (raw[3:4] == b"-") == last:
            raise ProtocolError("multi-line reply not ended by a 'code SP' line")
        texts.append(_CONTROL.sub("?", raw[4:].decode("utf-8", "replace")))
    status = ""
    match = _ENHANCED.match(texts[0])
    if match is not None and match.group(1) == str(code)[0]:
        status = match.group(0)
        texts = [t[len(status):].lstrip(" ") if t.startswith(status) else t for t in texts]
    return ServerReply(code, status, tuple(texts), command)


def _parse_line(raw: bytes, command: Verb | None) -> ServerReply:
    """parse_reply of a single-line reply (most are)."""
    code = _check_line(raw)
    if raw[3:4] == b"-":
        raise ProtocolError("multi-line reply not ended by a 'code SP' line")
    text = raw[4:].decode("utf-8", "replace")
    if not text.isprintable():  # every control character is unprintable
        text = _CONTROL.sub("?", text)
    if text[1:2] == "." and (match := _ENHANCED.match(text)) is not None and match.group(1) == str(code)[0]:
        status = match.group(0)
        return ServerReply(code, status, (text[len(status):].lstrip(" "),), command)
    return ServerReply(code, "", (text,), command)


def _check_line(raw: bytes) -> int:
    code, sep = raw[:3], raw[3:4]
    if len(code) != 3 or not code.isdigit() or code[:1] not in b"2345" or sep not in (b"", b" ", b"-"):
        raise ProtocolError(f"malformed reply line {raw[:40]!r}")
    return int(code)
