"""One outbound SMTP/LMTP session's I/O: connect, TLS handshake, reads, writes, timeouts.

The rules are the sans-I/O core's (mta/smtp/transaction.py: OutboundOpening for the
greeting, EHLO/HELO and the STARTTLS policy; OutboundTransaction for MAIL/RCPT/DATA,
pipelining, LMTP replies; over mta/smtp/client.py). Here: bytes in from the transport,
command bytes out, replies awaited in order under the command or data timeout.

    session = await OutboundSession.open(host, address, 25, helo_name="relay.test")
    results = await session.send(message)      # one RecipientResult per recipient, in order
    results = await session.send(m1, follow=lambda: m2)  # m2's MAIL/RCPT/DATA ride m1's content
    results = await session.send(m2)           # only reads m2's replies, then sends its content
    await session.close()                      # QUIT, then close

`open` raises SessionError when no transaction can start here (connect failure, 421
or 5xx greeting, EHLO/HELO refused, TLS required but unavailable, failed handshake):
the caller tries the next MX. `send` never raises for the peer's doing; every
recipient gets a result. A drop, a timeout, a protocol error or a 421 mid-transaction
leaves temporary results for the recipients not yet resolved and `usable = False`.

Invariant: one transaction at a time, except that with PIPELINING the next
message's MAIL/RCPT/DATA may go out with the previous content (`follow`, RFC 2920
3.1): one write and one round trip per message on a busy connection. `send` returns
with no transaction open (final dot answered, or RSET), with the next message's
commands announced (the next `send` must be for that message), or with `usable`
False. Nothing of an announced message's content has gone out, so a connection lost
before its MAIL is answered loses nothing (`stale`: retry once on a new connection).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Final

from mta.messages import Handoff
from mta.smtp.client import CLOSED, NEED_DATA, ClientConnection, ProtocolError, ServerReply
from mta.smtp.transaction import (  # noqa: F401 - the session's types, re-exported for its callers
    TLS_POLICIES, Outbound, OutboundOpening, OutboundRecipient, OutboundTransaction, RecipientResult,
    SessionError,
)

QUIT_SECONDS: Final = 5.0  # how long close() waits for the 221
CLOSE_SECONDS: Final = 2.0  # how long close() waits for the transport to go
HIGH_WATER: Final = 64 * 1024  # unread reply bytes before we stop reading


class _Dropped(Exception):
    """The connection closed under us."""


class _Link(asyncio.Protocol):
    """Transport callbacks -> the core; wakes whoever waits for input or write room.

    `expire()` (the session's deadline passed) wakes them too, and every wait after it
    raises TimeoutError until the session sets a new deadline (`expired = False`)."""

    def __init__(self, conn: ClientConnection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop  # kept: asyncio.get_running_loop() costs a getpid() per call on 3.11
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.expired = False
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
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def readable(self) -> None:
        if self.expired:
            raise TimeoutError()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._readable = self._loop.create_future()
        await self._readable
        if self.expired:
            raise TimeoutError()

    async def drain(self) -> None:
        if self._writable is not None and not self._writable.done():
            if self.expired:
                raise TimeoutError()
            await self._writable
            if self.expired:
                raise TimeoutError()
        if self.closed.done():
            raise _Dropped()

    def expire(self) -> None:
        """The deadline passed: the waiter wakes to a TimeoutError."""
        self.expired = True
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # a later pause_writing makes a new one

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
                 command_timeout: float, data_timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.remote = f"{host}[{address}]:{port}"
        self.usable = True
        self.tls = False
        self._conn = conn
        self._link = link
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._loop = loop
        # One deadline for whatever the session awaits (a reply, write room), one timer
        # for it: moved later, the timer stays and re-arms itself when it fires early
        # (asyncio.timeout per reply cost three getpid() calls on Python 3.11).
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self.transactions = 0  # messages sent on this connection
        # The last send found the connection dead before MAIL was answered, on a connection
        # that had carried a message before: the server dropped it (or said 421) while it
        # waited. Nothing of this message reached the server; a new connection may retry it.
        self.stale = False
        self._ahead: OutboundTransaction | None = None  # announced behind the last content, replies unread

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
        link = _Link(conn, loop)
        remote = f"{host}[{address}]:{port}"
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(lambda: link, address, port)
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise SessionError(451, "4.4.1", f"connect to {remote}: {why}", False, "connect") from None
        session = cls(host, address, port, conn, link, command_timeout, data_timeout, loop)
        try:
            await session._greet(tls, ssl_context_verify)
        except BaseException:
            session.usable = False
            await session._link_close()
            raise
        return session

    async def _greet(self, tls: str, ssl_context_verify: ssl.SSLContext | None) -> None:
        """The opening's rules are OutboundOpening's; here only its I/O."""
        opening = OutboundOpening(self._conn, tls, self.remote)
        command = b""  # the greeting comes unasked
        while not opening.done:
            out = opening.receive(await self._ask(opening, command))
            if opening.failure is not None:
                if out and not self._link.closed.done():
                    try:
                        self._link.write(out)  # QUIT to a 554 greeting
                    except _Dropped:
                        pass  # gone already: the refusal says all there is to say
                raise opening.failure
            if opening.handshake_due:
                await self._handshake(verify=opening.verify, custom=ssl_context_verify)
                self.tls = True
                out = opening.tls_established()
            command = out

    async def _handshake(self, verify: bool, custom: ssl.SSLContext | None) -> None:
        link = self._link
        assert link.transport is not None
        try:
            async with asyncio.timeout(self._command_timeout):
                transport = await self._loop.start_tls(
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

    async def _ask(self, opening: OutboundOpening, command: bytes) -> ServerReply:
        """Send a command of the opening (b"": none) and await its reply; failures are SessionErrors."""
        stage, doing = opening.stage, opening.doing
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

    @property
    def announced(self) -> Outbound | None:
        """The message whose commands went out behind the last content; the next `send` is for it."""
        return self._ahead.message if self._ahead is not None else None

    @property
    def handoff(self) -> Handoff:
        """What a 2xx from this server means for a success notice (RFC 3461 5.2.2): a server
        that offers DSN got NOTIFY and reports success itself (Postfix's rule, LMTP too);
        without DSN an LMTP server delivered (final), an SMTP server relayed."""
        if "DSN" in self._conn.extensions.keywords:
            return "passed"
        return "delivered" if self._conn.lmtp else "relayed"

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
            return [RecipientResult(r.address, 451, "4.4.2", f"connection to {self.remote} is no longer usable")
                    for r in message.recipients]
        if ahead is not None and ahead.message is not message:
            raise RuntimeError("send() of another message than the one announced")
        txn = ahead or OutboundTransaction(self._conn, message)
        if txn.waiting:
            try:
                await self._transaction(txn, follow)
            except TimeoutError:
                self._fail(txn, 451, "4.4.2", f"conversation with {self.remote} timed out while {txn.doing}")
            except _Dropped:
                self.stale = self.transactions > 0 and not txn.mail_answered
                self._fail(txn, 451, "4.4.2", f"lost connection with {self.remote} while {txn.doing}")
            except ProtocolError as exc:
                self._fail(txn, 451, "4.5.0", f"protocol error from {self.remote} while {txn.doing}: {exc}")
            if txn.closing is not None:  # 421: the server is going away
                self.stale = self.transactions > 0 and not txn.mail_answered
                self.abort()
            elif txn.rset_refused:
                self.usable = False
        self.transactions += 1
        return txn.recipient_results()

    async def _transaction(self, txn: OutboundTransaction, follow: Callable[[], Outbound | None] | None) -> None:
        """The transaction's I/O: its rules are OutboundTransaction's."""
        link = self._link
        out = txn.start()
        while True:
            if out:
                link.write(out)
            if not txn.waiting:
                break
            out = txn.receive(await self._reply(self._command_timeout))
        if not txn.content_due:
            return
        self._expect_by(self._data_timeout)  # the content and the final reply, together
        try:
            following = follow() if follow is not None and txn.may_announce else None
            after = OutboundTransaction(self._conn, following) if following is not None else None
            parts = txn.content(after)
            if after is not None and after.announced:  # the next transaction's commands ride this write
                self._ahead = after
            link.writelines(parts)
            await link.drain()
            while txn.waiting:
                txn.receive(await self._reply(None))
        finally:
            self._deadline = None

    async def _reply(self, timeout: float | None) -> ServerReply:
        """The next reply, within `timeout` seconds from now (None: the deadline already set)."""
        event = self._conn.next_event()  # pipelined replies mostly arrive together: no timer
        if isinstance(event, ServerReply):
            return event
        if event is CLOSED:
            raise _Dropped()
        if timeout is not None:
            self._expect_by(timeout)
        try:
            while True:
                await self._link.readable()
                event = self._conn.next_event()
                if isinstance(event, ServerReply):
                    return event
                if event is CLOSED:
                    raise _Dropped()
                assert event is NEED_DATA, event
        finally:
            if timeout is not None:
                self._deadline = None

    # --- the deadline ----------------------------------------------------------------------

    def _expect_by(self, seconds: float) -> None:
        """Waits from now on fail with TimeoutError once `seconds` have passed."""
        self._link.expired = False
        when = self._deadline = self._loop.time() + seconds
        if self._timer is not None:
            if self._timer_at <= when:
                return  # it fires first and moves itself on to the deadline
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(when, self._on_timer), when

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None:
            return  # nothing awaited: the timer sleeps until the next deadline
        if self._loop.time() < self._deadline:
            self._timer, self._timer_at = self._loop.call_at(self._deadline, self._on_timer), self._deadline
        else:
            self._link.expire()

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, txn: OutboundTransaction, code: int, status: str, text: str) -> None:
        """A connection-level failure mid-transaction: unresolved recipients are deferred."""
        self.abort()
        txn.fail(code, status, text)


    # --- closing -----------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now, no QUIT: a transaction was cut short (a drain's deadline)."""
        self.usable = False
        self._stop_timer()
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
        self._stop_timer()
        transport = self._link.transport
        if transport is None:
            return
        transport.close()
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await asyncio.shield(self._link.closed)
        except TimeoutError:
            transport.abort()
