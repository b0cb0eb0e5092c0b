"""The sans-I/O milter client connection: protocol version 6 as libmilter speaks it.

    conn = MilterConnection()
    out = conn.negotiate()                 # every step method returns the bytes to send
    conn.receive_data(data)                # frames packets; replies become events
    ev = conn.next_event()                 # Negotiated | a reply | a Modification | NEED_DATA
    out = conn.connect("c.test", Family.INET, 25, "192.0.2.1", macros)
    if conn.awaiting_reply: ...            # False when the step was skipped or is no-reply

Wire form: each packet is a 4-octet big-endian length (of what follows), one command
or reply code octet, then its data; strings are NUL-terminated.

Rules, from libmilter (sendmail's mi_engine.c, mfdef.h):
1. Negotiation first: we offer every action and protocol flag we implement; the
   milter answers with subsets of them (anything more is its protocol error).
2. A step the milter said it does not want (SMFIP_NO*) is not sent; a step it said
   needs no reply (SMFIP_NR*) is sent and not waited for.
3. Macros for a step go in one SMFIC_MACRO packet just before the step's command,
   filtered by the list the milter asked for at negotiation (SMFIR_SETSYMLIST).
4. Replies are read only while one is awaited; modifications (SMFIR_ADDHEADER ...
   SMFIR_QUARANTINE) only at end of message, and only those actions negotiated;
   SMFIR_SKIP only to a body chunk, and only with SMFIP_SKIP; SMFIR_PROGRESS at any
   awaited step, which it leaves awaited. After SKIP further body chunks are not sent.
5. Body chunks are at most MAX_BODY_CHUNK octets (we do not offer SMFIP_MDS_*).

Errors: ProtocolError is the milter's fault (malformed, oversized or unexpected
packets); next_event raises it after the events before it, and it is sticky. LocalProtocolError is ours (a step out of order).

Pure: no asyncio, socket or time imports.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from mta.milter.codes import (
    ACTIONS_OFFERED,
    LENGTH,
    MAX_BODY_CHUNK,
    MAX_PACKET,
    OPTNEG,
    PROTO_OFFERED,
    VERSION,
    Action,
    Cmd,
    Family,
    Proto,
    Stage,
    packet,
)

_REPLY_CODE = re.compile(r"([45])\d\d(?:[ -]|$)")


class ProtocolError(Exception):
    """The milter broke the protocol; the connection cannot be used any more."""


class LocalProtocolError(Exception):
    """We broke the protocol: a bug in the caller, never the milter's doing."""


# Per step: its command, the flag that skips it, the flag that makes it no-reply, its macro stage.
_STEPS: Final[dict[Cmd, tuple[Proto, Proto, Stage | None]]] = {
    Cmd.CONNECT: (Proto.NOCONNECT, Proto.NR_CONN, Stage.CONNECT),
    Cmd.HELO: (Proto.NOHELO, Proto.NR_HELO, Stage.HELO),
    Cmd.MAIL: (Proto.NOMAIL, Proto.NR_MAIL, Stage.ENVFROM),
    Cmd.RCPT: (Proto.NORCPT, Proto.NR_RCPT, Stage.ENVRCPT),
    Cmd.DATA: (Proto.NODATA, Proto.NR_DATA, Stage.DATA),
    Cmd.HEADER: (Proto.NOHDRS, Proto.NR_HDR, None),
    Cmd.EOH: (Proto.NOEOH, Proto.NR_EOH, Stage.EOH),
    Cmd.BODY: (Proto.NOBODY, Proto.NR_BODY, None),
    Cmd.BODYEOB: (Proto(0), Proto(0), Stage.EOM),
}


# Events: what the milter said.


@dataclass(frozen=True, slots=True)
class Negotiated:
    version: int
    actions: Action
    protocol: Proto
    macros: Mapping[Stage, tuple[str, ...]]  # the macros asked for per stage; absent = all


@dataclass(frozen=True, slots=True)
class Verdict:
    """A final reply to a step: accept, continue, reject, tempfail, discard, or a reply code."""

    kind: str  # "accept" | "continue" | "reject" | "tempfail" | "discard" | "skip"
    code: int = 0  # SMFIR_REPLYCODE: the milter's own SMTP reply
    status: str = ""  # its enhanced status code, "" when it gave none
    text: str = ""


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: the milter is still working; the reply is still awaited."""


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    index: int  # 1-based among the headers of this name; an empty value deletes
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int  # 0-based position among all headers
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    chunk: bytes  # one piece; the new body is every piece in order


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    sender: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class AddRecipient:
    recipient: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    recipient: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


Modification = (
    AddHeader | ChangeHeader | InsertHeader | ReplaceBody | ChangeFrom | AddRecipient
    | DeleteRecipient | Quarantine
)
Event = Negotiated | Verdict | Progress | Modification


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Marker("NEED_DATA")

_SIMPLE: Final[dict[bytes, str]] = {
    b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail", b"d": "discard", b"s": "skip",
}
# Modification reply code -> the action it needs negotiated.
_MOD_ACTION: Final[dict[bytes, Action]] = {
    b"h": Action.ADDHDRS, b"m": Action.CHGHDRS, b"i": Action.ADDHDRS, b"b": Action.CHGBODY,
    b"e": Action.CHGFROM, b"+": Action.ADDRCPT, b"2": Action.ADDRCPT_PAR, b"-": Action.DELRCPT,
    b"q": Action.QUARANTINE,
}


def _cstr(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LocalProtocolError(f"NUL in a milter string: {text!r}")
    return raw + b"\0"


def _strings(data: bytes, count: int, what: str) -> list[str]:
    """Exactly `count` NUL-terminated strings, else the milter's ProtocolError."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"milter sent {what} with an unterminated string")
    parts = data[:-1].split(b"\0")
    if len(parts) != count:
        raise ProtocolError(f"milter sent {what} with {len(parts)} strings, expected {count}")
    return [part.decode("utf-8", "surrogateescape") for part in parts]


def macro_name(name: str) -> str:
    """The canonical form: one character bare (i, j, _), longer ones in braces ({client_addr})."""
    bare = name.strip("{}")
    return bare if len(bare) == 1 else "{" + bare + "}"


def body_chunks(body: bytes) -> Iterator[bytes]:
    """The body in pieces of at most MAX_BODY_CHUNK octets."""
    for start in range(0, len(body), MAX_BODY_CHUNK):
        yield body[start : start + MAX_BODY_CHUNK]


class MilterConnection:
    """One milter connection's protocol state: steps out as bytes, replies in as events."""

    def __init__(self, actions: Action = ACTIONS_OFFERED, protocol: Proto = PROTO_OFFERED) -> None:
        self._offer_actions = actions
        self._offer_protocol = protocol
        self.negotiated: Negotiated | None = None
        self._buffer = bytearray()
        self._events: list[Event] = []
        self._awaiting: Cmd | None = None
        self._skip_body = False
        self._error: ProtocolError | None = None

    @property
    def awaiting_reply(self) -> bool:
        return self._awaiting is not None

    @property
    def header_leading_space(self) -> bool:
        """SMFIP_HDR_LEADSPC: header values go and come with their leading space."""
        return self.negotiated is not None and Proto.HDR_LEADSPC in self.negotiated.protocol

    # Steps out.

    def negotiate(self) -> bytes:
        self._expect_idle(first=True)
        self._awaiting = Cmd.OPTNEG
        return packet(Cmd.OPTNEG.value, OPTNEG.pack(VERSION, self._offer_actions, self._offer_protocol))

    def connect(self, hostname: str, family: Family, port: int, address: str,
                macros: Mapping[str, str] = {}) -> bytes:
        data = _cstr(hostname) + family.value
        if family is not Family.UNKNOWN:
            data += struct.pack(">H", port) + _cstr(address)
        return self._step(Cmd.CONNECT, data, macros)

    def helo(self, name: str, macros: Mapping[str, str] = {}) -> bytes:
        return self._step(Cmd.HELO, _cstr(name), macros)

    def mail(self, sender: str, args: tuple[str, ...] = (), macros: Mapping[str, str] = {}) -> bytes:
        return self._step(Cmd.MAIL, b"".join(_cstr(s) for s in (f"<{sender}>", *args)), macros)

    def rcpt(self, recipient: str, args: tuple[str, ...] = (), macros: Mapping[str, str] = {}) -> bytes:
        return self._step(Cmd.RCPT, b"".join(_cstr(s) for s in (f"<{recipient}>", *args)), macros)

    def data(self, macros: Mapping[str, str] = {}) -> bytes:
        return self._step(Cmd.DATA, b"", macros)

    def header(self, name: str, value: str) -> bytes:
        """One header; `value` as it follows the colon, folding as LF (libmilter's form)."""
        if not self.header_leading_space:
            value = value.lstrip(" \t")
        return self._step(Cmd.HEADER, _cstr(name) + _cstr(value), {})

    def end_of_headers(self, macros: Mapping[str, str] = {}) -> bytes:
        return self._step(Cmd.EOH, b"", macros)

    def body(self, chunk: bytes) -> bytes:
        if len(chunk) > MAX_BODY_CHUNK:
            raise LocalProtocolError(f"body chunk of {len(chunk)} octets; at most {MAX_BODY_CHUNK}")
        if self._skip_body:
            return b""
        return self._step(Cmd.BODY, chunk, {})

    def end_of_message(self, macros: Mapping[str, str] = {}) -> bytes:
        return self._step(Cmd.BODYEOB, b"", macros)

    def abort(self) -> bytes:
        """Forget the current message; the connection may carry another (no reply)."""
        self._expect_idle()
        self._skip_body = False
        return packet(Cmd.ABORT.value)

    def quit(self) -> bytes:
        self._awaiting = None
        return packet(Cmd.QUIT.value)

    def quit_nc(self) -> bytes:
        """Quit this message but keep the connection for a new one (SMFIC_QUIT_NC)."""
        self._expect_idle()
        self._skip_body = False
        return packet(Cmd.QUIT_NC.value)

    def _expect_idle(self, first: bool = False) -> None:
        if self._error is not None:
            raise self._error
        if self._awaiting is not None:
            raise LocalProtocolError(f"a reply to {self._awaiting.name} is still awaited")
        if first != (self.negotiated is None):
            raise LocalProtocolError("negotiate first, and only once")

    def _step(self, cmd: Cmd, data: bytes, macros: Mapping[str, str]) -> bytes:
        self._expect_idle()
        assert self.negotiated is not None
        skip, no_reply, stage = _STEPS[cmd]
        if skip and skip in self.negotiated.protocol:
            return b""
        out = b""
        if stage is not None and macros:
            wanted = self.negotiated.macros.get(stage)
            pairs = [(macro_name(k), v) for k, v in macros.items()]
            if wanted is not None:
                pairs = [(k, v) for k, v in pairs if k in wanted]
            if pairs:
                out = packet(Cmd.MACRO.value, cmd.value + b"".join(_cstr(k) + _cstr(v) for k, v in pairs))
        if not (no_reply and no_reply in self.negotiated.protocol):
            self._awaiting = cmd
        return out + packet(cmd.value, data)

    # Replies in.

    def receive_data(self, data: bytes) -> None:
        """Frame and parse; the milter's error surfaces from next_event, after the events before it."""
        if self._error is not None:
            return
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = LENGTH.unpack_from(self._buffer)
            if length == 0 or length > MAX_PACKET:
                self._fail(f"milter sent a packet of {length} octets (1 to {MAX_PACKET})")
                return
            if len(self._buffer) < 4 + length:
                return
            code, payload = bytes(self._buffer[4:5]), bytes(self._buffer[5 : 4 + length])
            del self._buffer[: 4 + length]
            try:
                self._events.append(self._parse(code, payload))
            except ProtocolError as exc:
                self._fail(str(exc))
                return

    def next_event(self) -> Event | _Marker:
        if self._events:
            return self._events.pop(0)
        if self._error is not None:
            raise self._error
        return NEED_DATA

    def _fail(self, reason: str) -> None:
        self._error = ProtocolError(reason)
        self._buffer.clear()

    def _parse(self, code: bytes, data: bytes) -> Event:
        awaiting = self._awaiting
        if awaiting is None:
            raise ProtocolError(f"milter sent reply {code!r} when none was awaited")
        if awaiting is Cmd.OPTNEG:
            if code != Cmd.OPTNEG.value:
                raise ProtocolError(f"milter answered negotiation with {code!r}")
            self._awaiting = None
            self.negotiated = self._parse_optneg(data)
            return self.negotiated
        if code == b"p":
            return Progress()
        if code in _SIMPLE or code == b"y":
            verdict = _SIMPLE.get(code, "")
            if verdict == "skip" and (awaiting is not Cmd.BODY or Proto.SKIP not in self._protocol):
                raise ProtocolError(f"milter sent SKIP to {awaiting.name} without negotiating it")
            if data and code != b"y":
                raise ProtocolError(f"milter sent {verdict} with data")
            self._awaiting = None
            if verdict == "skip":
                self._skip_body = True
                return Verdict("skip")
            return _parse_reply_code(data) if code == b"y" else Verdict(verdict)
        if code in _MOD_ACTION:
            if awaiting is not Cmd.BODYEOB:
                raise ProtocolError(f"milter sent modification {code!r} to {awaiting.name}")
            assert self.negotiated is not None
            if _MOD_ACTION[code] not in self.negotiated.actions:
                raise ProtocolError(f"milter sent {code!r} without negotiating {_MOD_ACTION[code].name}")
            return _parse_modification(code, data)
        raise ProtocolError(f"milter sent unknown reply {code!r} to {awaiting.name}")

    @property
    def _protocol(self) -> Proto:
        assert self.negotiated is not None
        return self.negotiated.protocol

    def _parse_optneg(self, data: bytes) -> Negotiated:
        if len(data) < OPTNEG.size:
            raise ProtocolError(f"milter's negotiation is {len(data)} octets, expected at least 12")
        version, actions, protocol = OPTNEG.unpack_from(data)
        if version < 2 or version > VERSION:
            raise ProtocolError(f"milter speaks protocol version {version}; we speak 2 to {VERSION}")
        if actions & ~int(self._offer_actions):
            raise ProtocolError(f"milter asks for actions {actions:#x} beyond those offered")
        if protocol & ~int(self._offer_protocol):
            raise ProtocolError(f"milter asks for protocol flags {protocol:#x} beyond those offered")
        macros: dict[Stage, tuple[str, ...]] = {}
        rest = data[OPTNEG.size :]
        while rest:
            if len(rest) < 5 or b"\0" not in rest[4:]:
                raise ProtocolError("milter's macro list in negotiation is malformed")
            (stage,) = LENGTH.unpack_from(rest)
            names, _, rest = rest[4:].partition(b"\0")
            try:
                macros[Stage(stage)] = tuple(macro_name(n) for n in names.decode("ascii").split())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ProtocolError(f"milter asks for macros at unknown stage {stage}") from exc
        return Negotiated(version, Action(actions), Proto(protocol), macros)


def _parse_reply_code(data: bytes) -> Verdict:
    (text,) = _strings(data, 1, "REPLYCODE")
    if not _REPLY_CODE.match(text):
        raise ProtocolError(f"milter's reply code is not 4xx or 5xx: {text[:60]!r}")
    code, _, rest = text.partition(" ")
    status = ""
    first = rest.split(" ", 1)[0]
    if re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", first):
        status, rest = first, rest[len(first) :].lstrip(" ")
    kind = "tempfail" if code.startswith("4") else "reject"
    return Verdict(kind, int(code[:3]), status, rest.replace("\r\n", " ").replace("\n", " "))


def _parse_modification(code: bytes, data: bytes) -> Modification:
    if code in (b"m", b"i"):
        if len(data) < 4:
            raise ProtocolError(f"milter sent {code!r} without its index")
        (index,) = LENGTH.unpack_from(data)
        name, value = _strings(data[4:], 2, "a header change")
        if not name:
            raise ProtocolError("milter sent a header change with an empty name")
        return ChangeHeader(index, name, value) if code == b"m" else InsertHeader(index, name, value)
    if code == b"h":
        name, value = _strings(data, 2, "ADDHEADER")
        if not name:
            raise ProtocolError("milter added a header with an empty name")
        return AddHeader(name, value)
    if code == b"b":
        return ReplaceBody(data)
    if code == b"q":
        return Quarantine(_strings(data, 1, "QUARANTINE")[0])
    if code == b"-":
        return DeleteRecipient(_strings(data, 1, "DELRCPT")[0])
    if code == b"+":
        return AddRecipient(_strings(data, 1, "ADDRCPT")[0])
    # CHGFROM and ADDRCPT_PAR: an address, then optional ESMTP arguments.
    parts = _strings(data, data.count(b"\0"), "an address change")
    if not 1 <= len(parts) <= 2:
        raise ProtocolError(f"milter sent {code!r} with {len(parts)} strings")
    args = parts[1] if len(parts) == 2 else ""
    return ChangeFrom(parts[0], args) if code == b"e" else AddRecipient(parts[0], args)
