"""The asyncio adapter: one InboundProtocol per client connection, I/O glue over the session.

Bytes go into the InboundSession's sans-I/O core (session.py); each event that needs a
decision goes to the session and the reply of its Decision comes back. Awaitable
decisions (DNSBL, AUTH, the message's commit) run as one task at a time; replies leave
once per batch of input (pipelining), and a 250 only after the commit's fsync. A batch
that waits for a decision holds the replies before it until they leave with its reply:
the client sent the command being decided after those, so it does not wait for them
(RFC 2920; one that does not pipeline has nothing unanswered before that command).

What stays here is transport:
- PROXY (listeners with proxy_protocol = true): only peers in trusted_proxies may
  connect, the header must arrive within PROXY_HEADER_SECONDS, its source is the client
  the session decides for; anything else is closed before any greeting.
- TLS: STARTTLS pauses reading before our 220 leaves (nothing sent in plaintext after
  it is read as a command); implicit TLS (smtps) is done before the protocol exists.
- Back-pressure: reading pauses while a decision is pending and input piles up past
  HIGH_WATER.
- Timeouts: one timer, re-armed lazily from the last activity; it never fires while we
  are the ones being waited on, and fires at the deadlines no byte restarts (deadlines.py).
- Closing: after our last reply, a linger (half-close, discard input), not a reset.
- Output: replies wait for the end of the loop's turn (output.py: the turn's metric counts
  and log lines first, then each session's replies in one write, then its half-close); our
  220 to STARTTLS (before the handshake), a last reply closed at once (_linger_close) and
  what waits when the client's EOF closes the transport are written at once, counts and
  lines first.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from mta import logs, metrics, proxyproto, tls
from mta.config import ListenerConfig
from mta.smtp import replies
from mta.smtp.commands import Expn, MailFrom, RcptTo, StartTls, Vrfy
from mta.smtp.replies import Reply
from mta.smtp.server import CLOSED, NEED_DATA, PAUSED, Credentials, Message
from mta.smtp.states import State
from workers.inbound.client import UNKNOWN_CLIENT, Client
from workers.inbound.context import WorkerContext
from workers.inbound.deadlines import Deadlines
from workers.inbound.decision import Decision
from workers.inbound.session import InboundSession

HIGH_WATER = 256 * 1024
PROXY_HEADER_SECONDS = 5.0
LINGER_SECONDS = 2.0


class InboundProtocol(asyncio.Protocol):
    def __init__(self, ctx: WorkerContext, listener: ListenerConfig) -> None:
        self._ctx = ctx
        self._loop = ctx.loop  # never asyncio.get_running_loop() per connection: a getpid each (context.py)
        self._listener = listener
        self._session = InboundSession(ctx, listener)
        self._conn = self._session.conn
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._task: asyncio.Task[None] | None = None  # a decision being made (commit, AUTH, TLS, DNSBL)
        self._dnsbl: asyncio.Task[None] | None = None
        self._gone = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it fires (time.monotonic())
        self._last_activity = 0.0
        self._deadlines = Deadlines.start(ctx.config.limits, time.monotonic())
        self._peer = UNKNOWN_CLIENT  # the TCP peer (a proxy, on proxy_protocol listeners)
        self._proxy_buffer: bytes | None = None  # PROXY header bytes while we wait for it
        self._lingering = False  # our last reply is made: discard input until EOF
        self._linger_timer: asyncio.TimerHandle | None = None
        self._marked = False  # in the TurnWriter's list for this turn
        self._half_close = False  # the linger begins after the turn's write (write_turn)

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = Client.at(peer[0], peer[1])
        if self._conn.tls_active:  # implicit TLS: the handshake is already done
            self._session.tls_info = tls.describe(transport.get_extra_info("ssl_object"))
            metrics.INBOUND_TLS.labels(self._listener.mode, "ok").inc()
        self._ctx.sessions.add(self)
        self._ctx.writer.count(metrics.INBOUND_ACTIVE_SESSIONS)
        self._last_activity = time.monotonic()
        if not self._listener.proxy_protocol:
            self._start_session(self._peer)
            return
        if not self._peer.within(self._listener.trusted_proxies):
            logs.event("proxy_refused", client=self._peer.ip, listener=self._listener.address,
                       reason="not in trusted_proxies")
            transport.close()
            return
        self._proxy_buffer = b""
        self._timer = self._loop.call_later(PROXY_HEADER_SECONDS, self._on_proxy_timeout)

    def _start_session(self, client: Client, early: bytes = b"") -> None:
        """`early`: bytes the client sent after a PROXY header, before our greeting."""
        if self._session.connect_asks_cluster(client):
            if self._transport is not None:
                self._transport.pause_reading()  # nothing is read before the verdict
            self._decide(self._start_session_later(client, early))
            return
        self._begin(self._session.check_connect(client), early)

    async def _start_session_later(self, client: Client, early: bytes) -> None:
        decision = await self._session.check_connect_shared(client)
        self._task = None
        if self._gone or self._transport is None or self._transport.is_closing():
            return
        self._transport.resume_reading()
        self._begin(decision, early)

    def _begin(self, decision: Decision, early: bytes) -> None:
        if decision.accepted:
            self._conn.greet()
            lookup = self._session.dnsbl_lookup()
            if lookup is not None:
                self._dnsbl = self._loop.create_task(lookup)
                self._dnsbl.add_done_callback(self._dnsbl_done)
        else:
            self._conn.refuse(decision.reply)
        self._arm_timer(time.monotonic() + self._ctx.config.limits.command_timeout_seconds)
        self._send()
        if self._conn.state is State.CLOSED:
            self._linger_close()
        elif early:
            self._session.receive_data(early)
            self._pump()

    def _dnsbl_done(self, task: asyncio.Task[None]) -> None:
        """A lookup that raised lets the client through, like a timeout; it is logged."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logs.event("dnsbl_error", client=self._session.client.ip, error=f"{type(exc).__name__}: {exc}")

    def _on_proxy_data(self, data: bytes) -> None:
        self._proxy_buffer = (self._proxy_buffer or b"") + data
        try:
            parsed = proxyproto.parse(self._proxy_buffer)
        except proxyproto.ProxyError as exc:
            logs.event("proxy_refused", client=self._peer.ip, reason=str(exc))
            self._close_now()
            return
        if parsed is None:
            return
        header, used = parsed
        rest, self._proxy_buffer = self._proxy_buffer[used:], None
        if self._timer is not None:
            self._timer.cancel()
        # LOCAL / UNKNOWN (e.g. a health check): the proxy itself, never a relay client.
        source = header.source
        self._start_session(Client(self._peer.ip, self._peer.port) if source is None else Client.at(*source), rest)

    def _on_proxy_timeout(self) -> None:
        logs.event("proxy_refused", client=self._peer.ip, reason="no PROXY header in time")
        self._close_now()

    def _close_now(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        if self._lingering:
            return
        if self._proxy_buffer is not None:
            self._on_proxy_data(data)
            return
        self._session.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self._conn.receive_eof()
        self._write_now()  # the transport closes now: replies waiting for the turn's end leave first
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        self._ctx.sessions.discard(self)
        self._ctx.writer.count(metrics.INBOUND_ACTIVE_SESSIONS, -1)
        self._session.release()
        if self._dnsbl is not None:
            self._dnsbl.cancel()
        if self._task is not None and not isinstance(self._conn.pending, Message):
            # AUTH (its delay, a queued scrypt), TLS or DNSBL work for a client that left.
            self._task.cancel()
        for timer in (self._timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._conn.receive_eof()
        self._session.account(gone=True)
        # A commit in flight still completes: the message may be stored without the
        # client having seen 250 (it will retry; a duplicate, never a loss).

    # --- the session -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Between transactions with nothing pending: safe to close during a drain."""
        return self._conn.pending is None and self._conn.state in (State.GREETED, State.READY)

    def shut_down(self) -> None:
        self._conn.close_with(replies.shutting_down(self._ctx.config.server.hostname))
        self._linger_close()

    def _linger_close(self) -> None:
        """Close after our last reply without resetting the client.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        our 421 (or 221) before the client reads it. So: half-close, discard what the
        client still sends, and close on its EOF or after LINGER_SECONDS; the half-close
        follows the reply's write at the end of the turn (write_turn). Except after a
        QUIT with nothing sent after it: the client waits for our 221 and sends no more, so
        close now (a FIN, as the half-close sends; saves the shutdown and reading its EOF),
        the 221 written first. Now, not at the end of the turn: uvloop releases the socket
        one turn after close(), and a client quick to close after our 221 would wake the
        poll in between for a socket nobody reads (an epoll_ctl DEL per session).
        """
        transport = self._transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        self._lingering = True
        self._session.release()  # the session is over: a reconnect must not count it twice
        conn = self._conn
        if not transport.can_write_eof() or (conn.quit and conn.buffered_bytes == 0):
            self._write_now()
            transport.close()
            return
        self._half_close = True
        self._mark()

    def _pump(self) -> None:
        conn, session = self._conn, self._session
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED or event is CLOSED:  # the most frequent: tested first
                break
            if isinstance(event, MailFrom):
                if session.waits_for_dnsbl or session.mail_asks_cluster:
                    self._decide(self._mail_later(event))
                    break
                conn.reply(session.check_mail(event).reply)
            elif isinstance(event, RcptTo):
                if session.rcpt_asks_cluster:
                    self._decide(self._rcpt_later(event))
                    break
                decision = session.check_rcpt(event)
                conn.reply(decision.reply, decision.rcpt)
            elif isinstance(event, Message):
                self._decide(self._answer_when(session.on_message(event)))  # its received line leaves before its 250 (output.py)
                break
            elif isinstance(event, Credentials):
                self._decide(self._answer_when(session.authenticate(event)))
                break
            elif isinstance(event, (Vrfy, Expn)):
                conn.reply(session.check_vrfy(event))
            elif isinstance(event, StartTls):
                self._write_now()  # our 220 leaves before the handshake; nothing more is read in plaintext
                if self._transport is not None:
                    self._transport.pause_reading()
                self._decide(self._start_tls())
                return
            else:
                break
        session.account()
        pending = conn.pending
        if pending is None:  # else the replies so far leave with the decision's (see the header)
            self._send()
        deadlines, in_transfer = self._deadlines, conn.in_transfer
        if in_transfer != (deadlines.transfer_end is not None):  # the clock is read when a transfer starts or ends
            deadlines.transfer(in_transfer, time.monotonic())
        if pending is None and deadlines.next < self._timer_at:
            self._arm_timer(deadlines.next)  # a transfer began, or a decision kept us past a deadline
        transport = self._transport
        if transport is None:
            return
        if event is CLOSED:
            self._linger_close()
            return
        backed_up = pending is not None and conn.buffered_bytes > HIGH_WATER
        if backed_up and not self._paused:
            transport.pause_reading()
            self._paused = True
        elif not backed_up and self._paused:
            transport.resume_reading()
            self._paused = False

    def _decide(self, decision: Coroutine[Any, Any, None]) -> None:
        self._task = self._loop.create_task(decision)
        self._task.add_done_callback(self._decided)

    def _decided(self, task: asyncio.Task[None]) -> None:
        """A decision that raised must not leave the session waiting for it forever."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logs.event("session_error", client=self._session.client.ip, error=f"{type(exc).__name__}: {exc}")
        if self._task is task:
            self._task = None
        self._conn.close_with(replies.LOCAL_ERROR)
        self._linger_close()

    async def _answer_when(self, decision: Awaitable[Decision]) -> None:
        self._answer((await decision).reply)

    async def _mail_later(self, command: MailFrom) -> None:
        """MAIL after the DNSBL lookup, or counted in the cluster's windows ([cluster] redis)."""
        session = self._session
        if session.waits_for_dnsbl:
            assert self._dnsbl is not None
            await asyncio.wait([self._dnsbl])
        if session.mail_asks_cluster:
            self._answer((await session.check_mail_shared(command)).reply)
        else:
            self._answer(session.check_mail(command).reply)

    async def _rcpt_later(self, command: RcptTo) -> None:
        decision = await self._session.check_rcpt_shared(command)
        self._answer(decision.reply, decision.rcpt)

    def _answer(self, reply: Reply, rcpt: RcptTo | None = None) -> None:
        """Deliver an asynchronous decision and go on with the input."""
        self._task = None
        if self._lingering or self._transport is None or self._transport.is_closing():
            return  # gone, or shut down (421 sent) while we were deciding
        self._conn.reply(reply, rcpt)
        self._pump()

    # --- TLS, output, timers -------------------------------------------------------------

    async def _start_tls(self) -> None:
        ctx = self._ctx
        transport = self._transport
        assert ctx.ssl_context is not None
        if self._gone or self._lingering or transport is None or transport.is_closing():
            self._task = None  # reset before our 220 left: start_tls would never finish
            return
        try:
            secure = await self._loop.start_tls(transport, self, ctx.ssl_context, server_side=True,
                                                ssl_handshake_timeout=ctx.config.tls.handshake_timeout_seconds)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            metrics.INBOUND_TLS.labels(self._listener.mode, "failed").inc()
            logs.event("tls_failed", client=self._session.client.ip, error=str(exc) or type(exc).__name__)
            self._task = None
            transport.close()
            self.connection_lost(None)
            return
        self._task = None
        if secure is None or self._gone:
            return
        self._transport = secure  # type: ignore[assignment]
        self._paused = False  # start_tls resumed reading
        info = tls.describe(secure.get_extra_info("ssl_object"))
        metrics.INBOUND_TLS.labels(self._listener.mode, "ok").inc()
        logs.event("tls", client=self._session.client.ip, tls=info)
        self._last_activity = time.monotonic()
        self._session.tls_started(info)
        self._pump()

    def _send(self) -> None:
        """The replies made so far leave at the end of this turn (output.py), after its log lines."""
        if self._conn.has_output and not self._marked:  # _mark(), one call less per batch of input
            self._marked = True
            self._ctx.writer.mark(self)

    def _mark(self) -> None:
        if not self._marked:
            self._marked = True
            self._ctx.writer.mark(self)

    def write_turn(self) -> None:
        """The TurnWriter's call at the end of the turn: the replies in one write, then the
        half-close that waits for them (_linger_close)."""
        self._marked = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        out = self._conn.data_to_send()
        if out:
            transport.write(out)
        if self._half_close:
            self._half_close = False
            transport.write_eof()
            self._linger_timer = self._loop.call_later(LINGER_SECONDS, transport.close)

    def _write_now(self) -> None:
        """The replies made so far, written now (a line or count never follows the reply it records)."""
        out = self._conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._ctx.writer.before_replies()
            self._transport.write(out)

    def _arm_timer(self, at: float, deadlines: bool = True) -> None:
        """Fire at `at` (time.monotonic()), or at the next session deadline if that is earlier."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = min(at, self._deadlines.next) if deadlines else at
        self._timer = self._loop.call_later(self._timer_at - time.monotonic(), self._on_timer)

    def _on_timer(self) -> None:
        limits = self._ctx.config.limits
        conn = self._conn
        if conn.state is State.CLOSED:
            return
        timeout = limits.data_timeout_seconds if conn.state is State.DATA else limits.command_timeout_seconds
        now = time.monotonic()
        if conn.pending is not None:  # we are the slow side: wait for ourselves (deadlines too)
            self._arm_timer(now + timeout, deadlines=False)
            return
        reason = self._deadlines.expired(now)
        if reason is None:
            if self._last_activity + timeout > now:
                self._arm_timer(self._last_activity + timeout)
                return
            reason = "idle_timeout"
        logs.event("timeout", client=self._session.client.ip, state=conn.state.value, limit=reason)
        metrics.INBOUND_REJECTED.labels(reason, "4xx").inc()
        conn.close_with(replies.timeout(self._ctx.config.server.hostname))
        self._linger_close()
