"""One milter, one message: the asyncio client over mta/milter/protocol.py.

    milter = MilterAddress.parse("inet:127.0.0.1:8891")
    result = await run_milter(milter, envelope, message, timeout_seconds=30)
    if result.verdict == "accept": message = apply_modifications(message, result.modifications)

A connection per message: negotiate, then connect, helo, mail, each rcpt, data,
headers, end of headers, body chunks, end of message, quit. Before end of message,
any final reply other than continue ends the message there: accept skips the rest
(no modifications), reject, tempfail and discard are the verdict. A reject or
tempfail to one recipient is the whole message's verdict: the pipeline runs at end
of data, when every recipient already had its 250. Each step has its own deadline,
renewed by SMFIR_PROGRESS. A milter that cannot be reached, times out,
closes early or breaks the protocol raises MilterFailed: what then happens is the
caller's default_action.

Thin glue: framing, parsing and the step rules live in the sans-I/O core.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

from mta.milter.changes import Message
from mta.milter.protocol import (
    NEED_DATA,
    Family,
    MilterConnection,
    Modification,
    Negotiated,
    Progress,
    ProtocolError,
    Quarantine,
    Verdict,
    body_chunks,
)
from mta.peeraddress import PeerAddress

READ_BYTES: Final = 65536
QUICKACK: Final = getattr(socket, "TCP_QUICKACK", None)  # Linux: ACK at once (it lapses: set per read)


class MilterFailed(Exception):
    """The milter could not give a verdict: down, timed out, closed, or broke the protocol."""


@dataclass(frozen=True, slots=True)
class MilterAddress(PeerAddress):
    """`inet:host:port` (IPv6 as `inet:[::1]:port`) or `unix:/path`, Postfix's form."""

    KINDS: ClassVar[tuple[str, ...]] = ("inet", "inet6")
    WHAT: ClassVar[str] = "milter"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the milter learns of the SMTP session beside the message."""

    client_name: str  # the client's reverse DNS name, or "[address]"
    client_address: str  # "" when unknown
    client_port: int
    helo: str
    macros: Mapping[str, str] = field(default_factory=dict)  # j, _, {client_addr}, {auth_authen} ...
    queue_id: str = ""  # the {i} macro, from DATA on
    rcpt_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        if not self.client_address:
            return Family.UNKNOWN
        if self.client_address.startswith("/"):
            return Family.UNIX
        try:
            return Family.INET6 if ipaddress.ip_address(self.client_address).version == 6 else Family.INET
        except ValueError:
            return Family.UNKNOWN


@dataclass(frozen=True, slots=True)
class MilterResult:
    verdict: str  # "accept" | "continue" | "reject" | "tempfail" | "discard"
    code: int = 0  # the milter's own reply code when it gave one, else 0
    status: str = ""
    text: str = ""
    modifications: tuple[Modification, ...] = ()  # in the milter's order, for apply_modifications
    negotiated: Negotiated | None = None  # the actions and protocol flags the milter chose, for logs

    @property
    def quarantine(self) -> str | None:
        """The reason, when the milter quarantined the message."""
        reasons = [m.reason for m in self.modifications if isinstance(m, Quarantine)]
        return reasons[-1] if reasons else None


class _Session:
    """One connection: write a step, await its reply within the step's deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout_seconds: float, name: str) -> None:
        self.conn = MilterConnection()
        self._reader, self._writer = reader, writer
        self._timeout = timeout_seconds
        self._name = name
        self.modifications: list[Modification] = []
        sock = writer.get_extra_info("socket")
        self._quickack = sock if QUICKACK is not None and sock is not None and sock.family != socket.AF_UNIX else None

    async def step(self, out: bytes) -> Verdict | Negotiated | None:
        """Send one step; its final reply, or None when none is awaited."""
        if out:
            self._writer.write(out)
            await self._writer.drain()
        if not self.conn.awaiting_reply:
            return None
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await asyncio.wait_for(self._reader.read(READ_BYTES), self._timeout)
                except TimeoutError as exc:
                    raise MilterFailed(f"milter {self._name} timed out after {self._timeout}s") from exc
                if not data:
                    raise MilterFailed(f"milter {self._name} closed the connection")
                if self._quickack is not None:
                    # libmilter writes each modification as its own small packet; with a
                    # delayed ACK from us, the milter's Nagle holds the next one 40 ms.
                    self._quickack.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                self.conn.receive_data(data)
            elif isinstance(event, (Verdict, Negotiated)):
                return event
            elif not isinstance(event, Progress):
                self.modifications.append(event)  # type: ignore[arg-type]


async def run_milter(address: MilterAddress, envelope: Envelope, message: Message,
                     timeout_seconds: float) -> MilterResult:
    """Run `message` through the milter at `address`; its verdict and modifications."""
    try:
        if address.path:
            opening = asyncio.open_unix_connection(address.path)
        else:
            opening = asyncio.open_connection(address.host, address.port)
        reader, writer = await asyncio.wait_for(opening, timeout_seconds)
    except (OSError, TimeoutError) as exc:
        why = str(exc) or f"no connection within {timeout_seconds}s"
        raise MilterFailed(f"milter {address} cannot be reached: {why}") from exc
    session = _Session(reader, writer, timeout_seconds, str(address))
    try:
        result = await _run(session, envelope, message)
        writer.write(session.conn.quit())
        return result
    except ProtocolError as exc:
        raise MilterFailed(f"milter {address} broke the protocol: {exc}") from exc
    except OSError as exc:
        raise MilterFailed(f"milter {address} failed: {exc}") from exc
    finally:
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        return  # the milter hung up first: the connection is closed either way


async def _run(session: _Session, env: Envelope, message: Message) -> MilterResult:
    conn = session.conn
    negotiated = await session.step(conn.negotiate())
    assert isinstance(negotiated, Negotiated), "the core awaits the negotiation reply"
    macros = {name: _text(value) for name, value in env.macros.items()}
    data_macros = macros | ({"{i}": env.queue_id} if env.queue_id else {})
    steps = [
        lambda: conn.connect(env.client_name, env.family, env.client_port, env.client_address, macros),
        lambda: conn.helo(_text(env.helo), macros),
        lambda: conn.mail(message.sender, message.sender_args, macros),
    ]
    for rcpt in message.recipients:
        rcpt_macros = macros | {"{rcpt_addr}": rcpt}
        steps.append(lambda rcpt=rcpt, m=rcpt_macros: conn.rcpt(rcpt, env.rcpt_args.get(rcpt, ()), m))
    steps.append(lambda: conn.data(data_macros))
    for name, value in message.headers:
        steps.append(lambda name=name, value=value: conn.header(_text(name), " " + _text(value).replace("\r\n", "\n")))
    steps.append(lambda: conn.end_of_headers(data_macros))
    for chunk in body_chunks(message.body):
        steps.append(lambda chunk=chunk: conn.body(chunk))
    for make in steps:
        verdict = await session.step(make())
        if isinstance(verdict, Verdict) and verdict.kind not in ("continue", "skip"):
            return _result(verdict, (), negotiated)
    verdict = await session.step(conn.end_of_message(data_macros))
    if not isinstance(verdict, Verdict):
        raise MilterFailed("milter gave no verdict at end of message")
    return _result(verdict, tuple(session.modifications), negotiated)


def _text(text: str) -> str:
    """What the client sent, as a milter string: a NUL (which SMTP lets through) shows as a space."""
    return text.replace("\0", " ")


def _result(verdict: Verdict, mods: tuple[Modification, ...], negotiated: Negotiated) -> MilterResult:
    return MilterResult(verdict.kind, verdict.code, verdict.status, verdict.text, mods, negotiated)
