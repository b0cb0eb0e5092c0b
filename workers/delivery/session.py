"""One outbound SMTP/LMTP session: connect, greet, STARTTLS, then any number of messages.

Thin asyncio glue over the sans-I/O ClientConnection (mta/smtp/client.py): bytes in
from the transport, command bytes out, replies awaited in order under a timeout.

    session = await OutboundSession.open(host, address, 25, helo_name="relay.test")
    results = await session.send(message)      # one RecipientResult per recipient, in order
    results = await session.send(m1, follow=lambda: m2)  # m2's MAIL/RCPT/DATA ride m1's content
    results = await session.send(m2)           # only reads m2's replies, then sends its content
    await session.close()                      # QUIT, then close

`open` raises SessionError when no transaction can start here (connect failure, 421
or 5xx greeting, EHLO/HELO refused, TLS required but unavailable): the caller tries
the next MX. `send` never raises for the peer's doing; every recipient gets a
result. A drop, a timeout, a protocol error or a 421 mid-transaction leaves
temporary results for the recipients not yet resolved and `usable = False`.

TLS policy (`tls`): "none" never; "may" STARTTLS when offered, unverified, and a
refused STARTTLS continues in plaintext; "encrypt" STARTTLS required, unverified;
"verify" STARTTLS required, certificate and MX host name verified. A failed
handshake fails the session (temporary); a required TLS is never downgraded.

Invariant: one transaction at a time, except that with PIPELINING the next
message's MAIL/RCPT/DATA may go out with the previous content (`follow`, RFC 2920
3.1): one write and one round trip per message on a busy connection. `send` returns
with no transaction open (final dot answered, or RSET), with the next message's
commands announced (the next `send` must be for that message), or with `usable`
False. Nothing of an announced message's content has gone out, so a connection lost
before its MAIL is answered loses nothing (`stale`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from mta.smtp import client
from mta.smtp.client import CLOSED, NEED_DATA, ClientConnection, ProtocolError, ServerReply
from mta.smtp.replies import Reply, ReplyClass

TLS_POLICIES: Final = ("none", "may", "encrypt", "verify")
QUIT_SECONDS: Final = 5.0  # how long close() waits for the 221
CLOSE_SECONDS: Final = 2.0  # how long close() waits for the transport to go
HIGH_WATER: Final = 64 * 1024  # unread reply bytes before we stop reading


@dataclass
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass
class Outbound:
    msgid: str
    sender: str  # "" for the null sender
    recipients: list[OutboundRecipient]
    body: bytes  # CRLF line ends, not dot-stuffed
    smtputf8: bool = False
    body_type: str | None = None  # "7BIT" | "8BITMIME"
    ret: str | None = None  # "FULL" | "HDRS"
    envid: str | None = None


@dataclass
class RecipientResult(ReplyClass):
    address: str
    code: int
    status: str  # enhanced status code "x.y.z", "" when the server gave none
    text: str


@dataclass
class _Prepared:
    """A message checked for this server: canonical body, recipients still to try."""

    message: Outbound
    body: bytes
    todo: list[int]  # recipients not refused locally, to send RCPT for
    utf8: bool
    results: list[RecipientResult | None]


class SessionError(Exception):
    """The whole session failed before a transaction could start; try the next MX."""

    def __init__(self, code: int, status: str, text: str, permanent: bool, stage: str) -> None:
        super().__init__(f"{stage}: {code} {status} {text}".replace("  ", " "))
        self.code = code
        self.status = status
        self.text = text
        self.permanent = permanent
        self.stage = stage  # "connect" | "greeting" | "ehlo" | "helo" | "starttls"


class _Dropped(Exception):
    """The connection closed under us."""


class _Closing(Exception):
    """The server said 421: it is closing the connection."""

    def __init__(self, reply: ServerReply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _Link(asyncio.Protocol):
    """Transport callbacks -> the core; wakes whoever waits for input or write room."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data)
        if self._conn.buffered_bytes > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self._conn.receive_eof()
        self._wake_reader()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.receive_eof()
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def readable(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._readable = asyncio.get_running_loop().create_future()
        await self._readable

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable
        if self.closed.done():
            raise _Dropped()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise _Dropped()
        self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        """Several buffers in one write (no joined copy of a large body)."""
        if self.transport is None or self.transport.is_closing():
            raise _Dropped()
        self.transport.writelines(parts)

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)


_unverified: ssl.SSLContext | None = None
_verified: ssl.SSLContext | None = None


def _tls_context(verify: bool, custom: ssl.SSLContext | None) -> ssl.SSLContext:
    """Process-wide contexts: loading the CA store once, not per session."""
    global _unverified, _verified
    if verify:
        if custom is not None:
            return custom
        if _verified is None:
            _verified = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        return _verified
    if _unverified is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _unverified = ctx
    return _unverified


class OutboundSession:
    def __init__(self, host: str, address: str, port: int, conn: ClientConnection, link: _Link,
                 command_timeout: float, data_timeout: float) -> None:
        self.host = host
        self.remote = f"{host}[{address}]:{port}"
        self.usable = True
        self.tls = False
        self._conn = conn
        self._link = link
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._closed = False
        self._doing = "sending MAIL FROM"  # what the transaction is doing, for failure texts
        self.transactions = 0  # messages sent on this connection
        # The last send found the connection dead before MAIL was answered, on a connection
        # that had carried a message before: the server dropped it (or said 421) while it
        # waited. Nothing of this message reached the server; a new connection may retry it.
        self.stale = False
        self._mail_answered = False
        self._ahead: _Prepared | None = None  # announced behind the last content, replies unread

    # --- opening -----------------------------------------------------------------------

    @classmethod
    async def open(cls, host: str, address: str, port: int, *, helo_name: str, tls: str = "may",
                   lmtp: bool = False, connect_timeout: float = 30, command_timeout: float = 300,
                   data_timeout: float = 600, ssl_context_verify: ssl.SSLContext | None = None,
                   ) -> OutboundSession:
        if tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {TLS_POLICIES}, not {tls!r}")
        loop = asyncio.get_running_loop()
        conn = ClientConnection(helo_name, lmtp=lmtp)
        link = _Link(conn)
        remote = f"{host}[{address}]:{port}"
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(lambda: link, address, port)
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise SessionError(451, "4.4.1", f"connect to {remote}: {why}", False, "connect") from None
        session = cls(host, address, port, conn, link, command_timeout, data_timeout)
        try:
            await session._greet(tls, ssl_context_verify)
        except BaseException:
            session.usable = False
            await session._link_close()
            raise
        return session

    async def _greet(self, tls: str, ssl_context_verify: ssl.SSLContext | None) -> None:
        greeting = await self._ask("greeting", "receiving the initial server greeting", b"")
        if not greeting.ok:
            if greeting.code != 421 and not self._link.closed.done():
                try:
                    self._link.write(self._conn.quit())  # RFC 5321 3.1: a 554 greeting waits for QUIT
                except _Dropped:
                    pass  # gone already: the refusal below says all there is to say
            raise self._refused("greeting", greeting)
        await self._hello()
        if tls == "none" or (tls == "may" and "STARTTLS" not in self._conn.extensions):
            return
        if "STARTTLS" not in self._conn.extensions:
            raise SessionError(451, "4.7.5", f"TLS is required, but was not offered by {self.remote}",
                               False, "starttls")
        reply = await self._ask("starttls", "sending STARTTLS", self._conn.starttls())
        if reply.code == 421:
            raise self._refused("starttls", reply)
        if reply.code != 220:
            if tls == "may":
                return  # opportunistic: carry on in plaintext
            raise SessionError(reply.code if reply.temporary else 451, "4.7.5",
                               f"STARTTLS refused by {self.remote}: {reply}", False, "starttls")
        await self._handshake(verify=tls == "verify", custom=ssl_context_verify)
        self._conn.tls_established()
        self.tls = True
        await self._hello()

    async def _hello(self) -> None:
        reply = await self._ask("ehlo", "sending LHLO" if self._conn.lmtp else "sending EHLO", self._conn.ehlo())
        if reply.ok:
            return
        if self._conn.lmtp or not reply.permanent:
            raise self._refused("ehlo", reply)
        reply = await self._ask("helo", "sending HELO", self._conn.helo())
        if not reply.ok:
            raise self._refused("helo", reply)

    async def _handshake(self, verify: bool, custom: ssl.SSLContext | None) -> None:
        link = self._link
        assert link.transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._command_timeout):
                transport = await loop.start_tls(
                    link.transport, link, _tls_context(verify, custom), server_hostname=self.host,
                    ssl_handshake_timeout=self._command_timeout)
        except (OSError, ssl.SSLError, ssl.CertificateError, TimeoutError, ConnectionError) as exc:
            link.transport.abort()
            link.connection_lost(None)  # the TLS layer never reports it: no app connection was made
            raise SessionError(451, "4.7.5", f"TLS handshake with {self.remote} failed: {exc}",
                               False, "starttls") from None
        if transport is None:  # the connection closed during the handshake
            link.connection_lost(None)
            raise SessionError(451, "4.7.5", f"lost connection with {self.remote} during the TLS handshake",
                               False, "starttls")
        link.transport = transport

    async def _ask(self, stage: str, doing: str, command: bytes) -> ServerReply:
        """Send a command of the opening (b"": none) and await its reply; failures are SessionErrors."""
        try:
            if command:
                self._link.write(command)
            return await self._reply(self._command_timeout)
        except TimeoutError:
            raise SessionError(451, "4.4.2", f"conversation with {self.remote} timed out while {doing}",
                               False, stage) from None
        except _Dropped:
            raise SessionError(451, "4.4.2", f"lost connection with {self.remote} while {doing}",
                               False, stage) from None
        except ProtocolError as exc:
            raise SessionError(451, "4.5.0", f"protocol error from {self.remote} while {doing}: {exc}",
                               False, stage) from None

    def _refused(self, stage: str, reply: ServerReply) -> SessionError:
        status = reply.status or ("5.0.0" if reply.permanent else "4.0.0")
        return SessionError(reply.code, status, reply.text, reply.permanent, stage)

    @property
    def announced(self) -> Outbound | None:
        """The message whose commands went out behind the last content; the next `send` is for it."""
        return self._ahead.message if self._ahead is not None else None

    @property
    def reusable(self) -> bool:
        """Usable, and nothing happened while it waited between messages: the server did not
        close it or say anything unasked (a 421 before an idle timeout, say). Replies to an
        announced message's commands are asked for."""
        return (self.usable and not self._link.closed.done()
                and (self._ahead is not None or not self._conn.buffered_bytes))

    # --- messages ----------------------------------------------------------------------

    async def send(self, message: Outbound,
                   follow: Callable[[], Outbound | None] | None = None) -> list[RecipientResult]:
        """Deliver one message; one result per recipient, in order.

        `follow` is asked, as the content goes out, for the message this connection
        carries next (None: none yet). Its MAIL/RCPT/DATA go out in the same write; the
        next `send` must be for that message and only reads their replies."""
        ahead, self._ahead = self._ahead, None
        if not self.usable:
            return [_result(r.address, 451, "4.4.2", f"connection to {self.remote} is no longer usable")
                    for r in message.recipients]
        if ahead is not None and ahead.message is not message:
            raise RuntimeError("send() of another message than the one announced")
        prepared = ahead or self._prepare(message)
        results = prepared.results
        if prepared.todo:
            self._mail_answered = False
            try:
                await self._transaction(prepared, announced=ahead is not None, follow=follow)
            except _Closing as exc:
                self.stale = self.transactions > 0 and not self._mail_answered
                self._fail(message, results, exc.reply.code, exc.reply.status or "4.0.0", exc.reply.text)
            except TimeoutError:
                self._fail(message, results, 451, "4.4.2",
                           f"conversation with {self.remote} timed out while {self._doing}")
            except _Dropped:
                self.stale = self.transactions > 0 and not self._mail_answered
                self._fail(message, results, 451, "4.4.2", f"lost connection with {self.remote} while {self._doing}")
            except ProtocolError as exc:
                self._fail(message, results, 451, "4.5.0", f"protocol error from {self.remote} "
                                                           f"while {self._doing}: {exc}")
        assert all(r is not None for r in results), "a recipient without a result"
        self.transactions += 1
        return results  # type: ignore[return-value]

    def _prepare(self, message: Outbound) -> _Prepared:
        """Local checks against this server's extensions; refused recipients get their result."""
        conn = self._conn
        results: list[RecipientResult | None] = [None] * len(message.recipients)
        addresses = [message.sender] + [r.address for r in message.recipients]
        utf8 = message.smtputf8 or not all(a.isascii() for a in addresses)
        body = client.canonical_body(message.body)
        refusal = client.check_message(conn.extensions, len(body), utf8)
        bad_sender = client.bad_address(message.sender) if refusal is None else None
        if bad_sender is not None:
            refusal = Reply(553, "5.1.7", f"bad sender address syntax: {bad_sender}")
        if refusal is not None:
            return _Prepared(message, body, [], utf8, [_local(r.address, refusal) for r in message.recipients])
        todo: list[int] = []
        for i, rcpt in enumerate(message.recipients):
            why = client.bad_address(rcpt.address) if rcpt.address else "empty address"
            if why is not None:
                results[i] = _local(rcpt.address, Reply(553, "5.1.3", f"bad recipient address syntax: {why}"))
            else:
                todo.append(i)
        return _Prepared(message, body, todo, utf8, results)

    def _mail(self, prepared: _Prepared) -> bytes:
        message = prepared.message
        return self._conn.mail_from(message.sender, size=len(prepared.body), body_type=message.body_type,
                                    smtputf8=prepared.utf8, ret=message.ret, envid=message.envid)

    def _announce(self, prepared: _Prepared) -> bytes:
        """MAIL, every RCPT and DATA as one pipelined group; replies come back in order."""
        conn, rcpts = self._conn, prepared.message.recipients
        return b"".join([self._mail(prepared), *(conn.rcpt_to(rcpts[i].address, rcpts[i].notify, rcpts[i].orcpt)
                                                  for i in prepared.todo), conn.data()])

    async def _transaction(self, prepared: _Prepared, announced: bool,
                           follow: Callable[[], Outbound | None] | None) -> None:
        conn, link = self._conn, self._link
        message, todo, results = prepared.message, prepared.todo, prepared.results
        rcpts = message.recipients
        pipelined = conn.pipelining
        self._doing = "sending MAIL FROM"
        if pipelined:
            if not announced:
                link.write(self._announce(prepared))
        else:
            link.write(self._mail(prepared))
        mail_reply = await self._expect(self._command_timeout)
        self._mail_answered = True
        mail_ok = mail_reply.ok
        if not mail_ok:
            for i in todo:
                results[i] = _result(rcpts[i].address, mail_reply.code, mail_reply.status, mail_reply.text)
        accepted: list[int] = []
        if pipelined or mail_ok:
            for i in todo:
                self._doing = "sending RCPT TO"
                if not pipelined:
                    link.write(conn.rcpt_to(rcpts[i].address, rcpts[i].notify, rcpts[i].orcpt))
                reply = await self._expect(self._command_timeout)
                if not mail_ok:
                    continue
                if reply.ok:
                    accepted.append(i)
                else:
                    results[i] = _result(rcpts[i].address, reply.code, reply.status, reply.text)
        data_reply: ServerReply | None = None
        if pipelined or accepted:
            self._doing = "sending DATA"
            if not pipelined:
                link.write(conn.data())
            data_reply = await self._expect(self._command_timeout)
        if data_reply is not None and data_reply.code == 354 and not accepted:
            # 354 with no recipient: end the empty message and discard it (RFC 2920 3.1).
            self._doing = "sending end of data"
            link.write(conn.message_body(b""))
            await self._expect(self._command_timeout)
        elif data_reply is not None and data_reply.code == 354:
            await self._content(prepared, accepted, follow)
            return
        elif data_reply is not None:
            for i in accepted:
                results[i] = _result(rcpts[i].address, data_reply.code, data_reply.status, data_reply.text)
        if mail_ok:
            self._doing = "sending RSET"
            link.write(conn.rset())
            if not (await self._expect(self._command_timeout)).ok:
                self.usable = False  # a server that cannot reset gets no further transaction

    async def _content(self, prepared: _Prepared, accepted: list[int],
                       follow: Callable[[], Outbound | None] | None) -> None:
        conn, link = self._conn, self._link
        message, results = prepared.message, prepared.results
        self._doing = "sending message body"
        async with asyncio.timeout(self._data_timeout):
            parts = [conn.message_body(prepared.body, canonical=True)]  # _prepare made it canonical
            following = follow() if follow is not None and conn.pipelining else None
            if following is not None:
                after = self._prepare(following)
                if after.todo:  # the next transaction's commands ride this write
                    parts.append(self._announce(after))
                    self._ahead = after
            link.writelines(parts)
            await link.drain()
            self._doing = "receiving the reply to end of data"
            if conn.lmtp:  # one reply per accepted recipient, in RCPT order (RFC 2033 4.2)
                for i in accepted:
                    reply = await self._expect(None)
                    results[i] = _result(message.recipients[i].address, reply.code, reply.status, reply.text)
                return
            reply = await self._expect(None)
        for i in accepted:
            results[i] = _result(message.recipients[i].address, reply.code, reply.status, reply.text)

    async def _expect(self, timeout: float | None) -> ServerReply:
        """The next reply in a transaction; a 421 raises _Closing (the server is going away)."""
        reply = await self._reply(timeout)
        if reply.code == 421:
            raise _Closing(reply)
        return reply

    async def _reply(self, timeout: float | None) -> ServerReply:
        event = self._conn.next_event()  # pipelined replies mostly arrive together: no timer
        if isinstance(event, ServerReply):
            return event
        if event is CLOSED:
            raise _Dropped()
        async with asyncio.timeout(timeout):
            while True:
                event = self._conn.next_event()
                if isinstance(event, ServerReply):
                    return event
                if event is CLOSED:
                    raise _Dropped()
                assert event is NEED_DATA, event
                await self._link.readable()

    def _fail(self, message: Outbound, results: list[RecipientResult | None], code: int, status: str,
              text: str) -> None:
        """A connection-level failure mid-transaction: unresolved recipients are deferred."""
        self.abort()
        for i, rcpt in enumerate(message.recipients):
            if results[i] is None:
                results[i] = _result(rcpt.address, code, status, text)

    # --- closing -----------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now, no QUIT: a transaction was cut short (a drain's deadline)."""
        self.usable = False
        if self._link.transport is not None:
            self._link.transport.abort()

    async def close(self) -> None:
        """QUIT (when the connection is still good), then close. Never raises for the peer."""
        if self._closed:
            return
        self._closed = True
        # With a transaction announced the server may be reading content: no QUIT then.
        if self.usable and not self._link.closed.done() and self._ahead is None:
            self.usable = False
            try:
                self._link.write(self._conn.quit())
                await self._reply(min(self._command_timeout, QUIT_SECONDS))
            except (TimeoutError, _Dropped, ProtocolError):
                pass  # the session is over either way; the 221 carries no information we need
        self.usable = False
        await self._link_close()

    async def _link_close(self) -> None:
        transport = self._link.transport
        if transport is None:
            return
        transport.close()
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await asyncio.shield(self._link.closed)
        except TimeoutError:
            transport.abort()


def _result(address: str, code: int, status: str, text: str) -> RecipientResult:
    return RecipientResult(address, code, status, text)


def _local(address: str, reply: Reply) -> RecipientResult:
    text = reply.text if isinstance(reply.text, str) else " ".join(reply.text)
    return RecipientResult(address, reply.code, reply.status, text)
