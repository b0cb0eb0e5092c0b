"""The asyncio adapter: one InboundProtocol per client connection, glue over the core.

Bytes go to the sans-I/O ServerConnection; its events get policy replies (sync) or a
queue commit (async, through the worker's GroupCommitter); replies are written once
per batch of input, so pipelined replies leave in one write. Back-pressure: reading
pauses while a decision is pending and unprocessed input piles up past HIGH_WATER.
A 250 is written only after the commit (and its fsync) returned.

PROXY protocol (listeners with proxy_protocol = true): only peers in trusted_proxies
may connect; the header must arrive within PROXY_HEADER_SECONDS; its source address
then is the client for the Received header, relay control, per-IP limits and logs.
Anything else closes the connection before any greeting.

Security (docs/operations.md): at connect, [policy] client lists, the AUTH lockout
(submission/smtps listeners) and the shared per-IP limits; a DNSBL lookup starts in
the background and is awaited at the first MAIL. STARTTLS pauses reading before our
220 leaves, so nothing sent in plaintext after it is read as a command; implicit TLS
(smtps) completes its handshake before the protocol exists. AUTH verifies through
the shared auth cache; failures are counted per IP, slow the replies down and end in
a lockout. A password is never logged.

Timeouts: one timer per session, re-armed lazily from the last activity time; it
never fires while we (not the client) are the ones being waited on. It also fires at
the session's deadlines (deadlines.py), which no byte restarts. Memory: each session
reports what it holds to the worker's MemoryBudget (budget.py) after every input.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
import time
from collections.abc import Coroutine
from typing import Any

from mta import logs, metrics, proxyproto, tls
from mta.config import ListenerConfig
from mta.smtp import replies
from mta.smtp.commands import Expn, MailFrom, RcptTo, StartTls, Vrfy
from mta.smtp.replies import Reply
from mta.smtp.server import CLOSED, Credentials, Message, ServerConnection
from mta.smtp.states import State
from mta.users import User
from mtaqueue import Envelope, NewMessage, QueueError, QueueFull, Recipient, new_id
from workers.inbound import policy
from workers.inbound.auth import AUTH_ATTEMPTS
from workers.inbound.context import WorkerContext
from workers.inbound.deadlines import Deadlines
from workers.inbound.ratelimit import AUTH_BUSY, AUTH_BUSY_POLL_SECONDS, AUTH_BUSY_SECONDS, LOCKED_OUT
from workers.inbound.received import received_header

HIGH_WATER = 256 * 1024
PROXY_HEADER_SECONDS = 5.0
LINGER_SECONDS = 2.0



@functools.cache
def _listener_counters(address: str) -> tuple[Any, Any, Any]:
    """A listener's connection, message and byte counters, resolved once per process."""
    return (metrics.INBOUND_CONNECTIONS.labels(address), metrics.INBOUND_MESSAGES.labels(address),
            metrics.INBOUND_BYTES.labels(address))

class InboundProtocol(asyncio.Protocol):
    def __init__(self, ctx: WorkerContext, listener: ListenerConfig) -> None:
        self._ctx = ctx
        self._listener = listener
        self._conn = ServerConnection(ctx.server_options[listener.address], tls=listener.mode == "smtps")
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._task: asyncio.Task[None] | None = None  # a decision being made (commit, AUTH, TLS, DNSBL)
        self._dnsbl: asyncio.Task[Reply | None] | None = None
        self._user: User | None = None  # authenticated
        self._tls_info = ""  # "TLSv1.3 with cipher ..." once encrypted
        self._gone = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it fires (time.monotonic())
        self._last_activity = 0.0
        self._deadlines = Deadlines.start(ctx.config.limits, time.monotonic())
        self._held = 0  # bytes last reported to the worker's memory budget
        self.client_ip = "unknown"
        self.client_port = 0
        self._client_addr: policy.IPAddress | None = None  # None: never in mynetworks
        self._proxy_buffer: bytes | None = None  # PROXY header bytes while we wait for it
        self._counted = False  # in connections_per_ip
        self._lingering = False  # our last reply is sent: discard input until EOF
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = peer[0], peer[1]
            self._client_addr = ipaddress.ip_address(self.client_ip)
        if self._conn.tls_active:  # implicit TLS: the handshake is already done
            self._tls_info = tls.describe(transport.get_extra_info("ssl_object"))
            metrics.INBOUND_TLS.labels(self._listener.mode, "ok").inc()
        self._ctx.sessions.add(self)
        metrics.INBOUND_ACTIVE_SESSIONS.inc()
        self._last_activity = time.monotonic()
        if not self._listener.proxy_protocol:
            self._start_session()
            return
        trusted = self._client_addr is not None and any(
            self._client_addr in net for net in self._listener.trusted_proxies)
        if not trusted:
            logs.event("proxy_refused", client=self.client_ip, listener=self._listener.address,
                       reason="not in trusted_proxies")
            transport.close()
            return
        self._proxy_buffer = b""
        self._timer = asyncio.get_running_loop().call_later(PROXY_HEADER_SECONDS, self._on_proxy_timeout)

    def _start_session(self) -> None:
        ctx = self._ctx
        logs.event("connect", client=self.client_ip, listener=self._listener.address,
                   tls=self._tls_info or None)
        _listener_counters(self._listener.address)[0].inc()
        refusal, reason = self._check_connect()
        if refusal is not None:
            logs.event("refused", client=self.client_ip, reason=reason, reply=str(refusal))
            metrics.INBOUND_REJECTED.labels(reason, f"{refusal.code // 100}xx").inc()
            self._conn.refuse(refusal)
        else:
            self._conn.greet()
            if ctx.config.policy.dnsbl and not self._trusted and not ctx.access.allowed(self.client_ip):
                self._dnsbl = asyncio.get_running_loop().create_task(ctx.access.dnsbl(self.client_ip))
        self._arm_timer(time.monotonic() + ctx.config.limits.command_timeout_seconds)
        self._flush()
        if self._conn.state is State.CLOSED:
            self._linger_close()

    def _check_connect(self) -> tuple[Reply | None, str]:
        ctx, ip = self._ctx, self.client_ip
        denied = ctx.access.client(ip)
        if denied is not None:
            return denied, "client_denied"
        if self._listener.mode in ("submission", "smtps") and ctx.limiter.locked_out(ip):
            return LOCKED_OUT, "auth_lockout"
        limited = ctx.limiter.open_connection(ip, self._trusted)
        if limited is not None:
            return limited, "connection_rate" if limited is not replies.CONNECTION_LIMIT else "max_connections_per_ip"
        self._counted = True
        return None, ""

    @property
    def _trusted(self) -> bool:
        """In [relay] mynetworks: may relay, exempt from the rate windows. HELO grants nothing."""
        return self._client_addr is not None and any(self._client_addr in net
                                                     for net in self._ctx.config.relay.mynetworks)

    def _on_proxy_data(self, data: bytes) -> None:
        self._proxy_buffer += data
        try:
            parsed = proxyproto.parse(self._proxy_buffer)
        except proxyproto.ProxyError as exc:
            logs.event("proxy_refused", client=self.client_ip, reason=str(exc))
            self._close_now()
            return
        if parsed is None:
            return
        header, used = parsed
        rest, self._proxy_buffer = self._proxy_buffer[used:], None
        if self._timer is not None:
            self._timer.cancel()
        if header.source is None:
            # LOCAL / UNKNOWN (e.g. a health check): the proxy itself, never a relay client.
            self._client_addr = None
        else:
            self.client_ip, self.client_port = header.source
            self._client_addr = ipaddress.ip_address(self.client_ip)
        self._start_session()
        if rest and self._conn.state is not State.CLOSED:
            self._conn.receive_data(rest)
            self._pump()

    def _on_proxy_timeout(self) -> None:
        logs.event("proxy_refused", client=self.client_ip, reason="no PROXY header in time")
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
        self._conn.receive_data(data)
        if not self._ctx.budget.admit(self._conn, self._held):
            self._rejected("memory_budget", replies.MEMORY_DISCARDED, held=self._ctx.budget.held)
        self._pump()

    def eof_received(self) -> bool:
        self._conn.receive_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        self._ctx.sessions.discard(self)
        metrics.INBOUND_ACTIVE_SESSIONS.dec()
        self._release_ip()
        if self._dnsbl is not None:
            self._dnsbl.cancel()
        if self._task is not None and not isinstance(self._conn.pending, Message):
            # AUTH (its delay, a queued scrypt), TLS or DNSBL work for a client that left.
            # A commit in flight still completes (below).
            self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._conn.receive_eof()
        self._report_held()
        # A commit in flight still completes: the message may be stored without the
        # client having seen 250 (it will retry; a duplicate, never a loss).

    def _release_ip(self) -> None:
        if not self._counted:
            return
        self._counted = False
        self._ctx.limiter.close_connection(self.client_ip)

    # --- the session -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Between transactions with nothing pending: safe to close during a drain."""
        return self._conn.pending is None and self._conn.state in (State.GREETED, State.READY)

    def shut_down(self) -> None:
        self._conn.close_with(replies.shutting_down(self._ctx.config.server.hostname))
        self._flush()
        self._linger_close()

    def _linger_close(self) -> None:
        """Close after our last reply without resetting the client.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        our 421 (or 221) before the client reads it. So: half-close, discard what the
        client still sends, and close on its EOF or after LINGER_SECONDS.
        """
        transport = self._transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        self._lingering = True
        self._release_ip()  # the session is over: a reconnect must not count it twice
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._linger_timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def _pump(self) -> None:
        conn = self._conn
        while True:
            event = conn.next_event()
            if isinstance(event, MailFrom):
                if self._dnsbl is not None and not self._dnsbl.done() and self._user is None:
                    self._decide(self._mail_after_dnsbl(event))
                    break
                conn.reply(self._check_mail(event))
            elif isinstance(event, RcptTo):
                conn.reply(*self._check_rcpt(event))
            elif isinstance(event, Message):
                self._decide(self._commit(event))
                break
            elif isinstance(event, Credentials):
                self._decide(self._authenticate(event))
                break
            elif isinstance(event, (Vrfy, Expn)):
                conn.reply(self._ctx.local.verify(event.argument, expand=isinstance(event, Expn)))
            elif isinstance(event, StartTls):
                self._flush()  # our 220 leaves; nothing more is read in plaintext
                if self._transport is not None:
                    self._transport.pause_reading()
                self._decide(self._start_tls())
                return
            else:  # NEED_DATA, PAUSED or CLOSED
                break
        self._count_auth_refusals()
        self._flush()
        self._report_held()
        self._deadlines.transfer(conn.in_transfer, time.monotonic())
        if conn.pending is None and self._deadlines.next < self._timer_at:
            self._arm_timer(self._deadlines.next)  # a transfer began, or a decision kept us past a deadline
        transport = self._transport
        if transport is None:
            return
        if event is CLOSED:
            self._linger_close()
            return
        backed_up = conn.pending is not None and conn.buffered_bytes > HIGH_WATER
        if backed_up and not self._paused:
            transport.pause_reading()
            self._paused = True
        elif not backed_up and self._paused:
            transport.resume_reading()
            self._paused = False

    def _report_held(self) -> None:
        """What this session holds, to the worker's memory budget (0 once it is gone)."""
        budget = self._ctx.budget
        self._held = budget.report(self._held, 0 if self._gone else budget.cost(self._conn))

    def _decide(self, decision: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(decision)
        self._task.add_done_callback(self._decided)

    def _decided(self, task: asyncio.Task[None]) -> None:
        """A decision that raised must not leave the session waiting for it forever."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logs.event("session_error", client=self.client_ip, error=f"{type(exc).__name__}: {exc}")
        if self._task is task:
            self._task = None
        self._conn.close_with(replies.LOCAL_ERROR)
        self._flush()
        self._linger_close()

    def _answer(self, reply: Reply) -> None:
        """Deliver an asynchronous decision and go on with the input."""
        self._task = None
        if self._lingering or self._transport is None or self._transport.is_closing():
            return  # gone, or shut down (421 sent) while we were deciding
        self._conn.reply(reply)
        self._pump()

    # --- policy --------------------------------------------------------------------

    def _check_mail(self, command: MailFrom) -> Reply:
        ctx = self._ctx
        sender = command.address.text
        reply = ctx.access.sender(sender)
        reason = "sender_denied"
        if reply is None and self._user is not None and ctx.config.auth.sender_login_match \
                and not self._user.owns(sender):
            reply, reason = replies.SENDER_NOT_OWNED, "sender_login_mismatch"
        if reply is None:
            reply, reason = ctx.budget.check_mail(command.size), "memory_budget"
        if reply is None and self._dnsbl is not None and self._user is None:
            reply, reason = self._dnsbl_verdict(), "dnsbl"
        if reply is None:
            reply, reason = ctx.limiter.message(self.client_ip, self._user_name, self._trusted), "message_rate"
        if reply is None:
            return policy.check_mail_from(ctx.config.relay, self._client_addr, command)
        self._rejected(reason, reply, sender=sender)
        return reply

    def _dnsbl_verdict(self) -> Reply | None:
        assert self._dnsbl is not None and self._dnsbl.done()
        if self._dnsbl.cancelled() or self._dnsbl.exception() is not None:
            return None  # a lookup that broke lets the client through, like a timeout
        return self._dnsbl.result()

    async def _mail_after_dnsbl(self, command: MailFrom) -> None:
        assert self._dnsbl is not None
        await asyncio.wait([self._dnsbl])
        self._answer(self._check_mail(command))

    def _check_rcpt(self, command: RcptTo) -> tuple[Reply, RcptTo]:
        """The reply, and the recipient as the transaction keeps it (see policy.RcptDecision)."""
        ctx = self._ctx
        rcpt = command.address.text
        reply = ctx.access.recipient(rcpt)
        if reply is not None:
            self._rejected("recipient_denied", reply, rcpt=rcpt)
            return reply, command
        decision = policy.check_rcpt_to(ctx.config.relay, self._client_addr, command, ctx.local,
                                        hostname=ctx.config.server.hostname, authenticated=self._user is not None)
        if decision.reason:
            self._rejected(decision.reason, decision.reply, rcpt=rcpt)
            return decision.reply, command
        limited = ctx.limiter.recipient(self.client_ip, self._user_name, self._trusted)
        if limited is not None:
            self._rejected("recipient_rate", limited, rcpt=rcpt)
            return limited, command
        return decision.reply, decision.rcpt

    def _rejected(self, reason: str, reply: Reply, **fields: object) -> None:
        logs.event("rejected", client=self.client_ip, user=self._user_name, reason=reason, reply=str(reply), **fields)
        metrics.INBOUND_REJECTED.labels(reason, f"{reply.code // 100}xx").inc()

    @property
    def _user_name(self) -> str | None:
        return self._user.name if self._user is not None else None

    # --- TLS and AUTH --------------------------------------------------------------

    async def _start_tls(self) -> None:
        ctx = self._ctx
        transport = self._transport
        assert ctx.ssl_context is not None
        if self._gone or self._lingering or transport is None or transport.is_closing():
            self._task = None  # reset before our 220 left: start_tls would never finish
            return
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(transport, self, ctx.ssl_context, server_side=True,
                                          ssl_handshake_timeout=ctx.config.tls.handshake_timeout_seconds)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            metrics.INBOUND_TLS.labels(self._listener.mode, "failed").inc()
            logs.event("tls_failed", client=self.client_ip, error=str(exc) or type(exc).__name__)
            self._task = None
            transport.close()
            self.connection_lost(None)
            return
        self._task = None
        if secure is None or self._gone:
            return
        self._transport = secure  # type: ignore[assignment]
        self._paused = False  # start_tls resumed reading
        self._tls_info = tls.describe(secure.get_extra_info("ssl_object"))
        metrics.INBOUND_TLS.labels(self._listener.mode, "ok").inc()
        logs.event("tls", client=self.client_ip, tls=self._tls_info)
        self._last_activity = time.monotonic()
        self._user = None  # nothing learned before TLS is kept (auth_plaintext listeners)
        self._conn.tls_started()
        self._pump()

    async def _authenticate(self, credentials: Credentials) -> None:
        ctx, ip = self._ctx, self.client_ip
        if ctx.limiter.locked_out(ip):
            AUTH_ATTEMPTS.labels("locked_out").inc()
            logs.event("auth", client=ip, user=replies.sanitize(credentials.username), result="locked_out")
            self._answer(LOCKED_OUT)
            return
        delay = ctx.limiter.auth_delay(ip)
        if delay > 0:
            await asyncio.sleep(delay)
        # At most max_failures - failures checks from one address run at once: concurrent
        # guesses cannot exceed the budget; concurrent good logins wait for a slot.
        waited = 0.0
        while (admitted := ctx.limiter.auth_begin(ip)) == "busy":
            while True:  # polled with reads: one write transaction per admission attempt
                if waited >= AUTH_BUSY_SECONDS:
                    AUTH_ATTEMPTS.labels("busy").inc()
                    self._answer(AUTH_BUSY)
                    return
                await asyncio.sleep(AUTH_BUSY_POLL_SECONDS)
                waited += AUTH_BUSY_POLL_SECONDS
                if not ctx.limiter.auth_busy(ip):
                    break
        if admitted == "locked":
            AUTH_ATTEMPTS.labels("locked_out").inc()
            self._answer(LOCKED_OUT)
            return
        result = None
        # A check cut short (the client left) counts as a failure: its scrypt runs on in
        # the executor, so a free retry would let one address keep the threads busy.
        failed = True
        try:
            if credentials.authzid in ("", credentials.username):
                result = await ctx.authenticator.verify(credentials.username, credentials.password)
            failed = not (result is not None and result.ok and result.user is not None)
        finally:
            failures = ctx.limiter.auth_end(ip, failed)
        if result is not None and not failed and result.user is not None:
            self._user = result.user
            AUTH_ATTEMPTS.labels("success").inc()
            logs.event("auth", client=ip, user=result.user.name, mechanism=credentials.mechanism,
                       result="success", cached=result.cached)
            self._answer(replies.AUTH_OK)
            return
        AUTH_ATTEMPTS.labels("failure").inc()
        logs.event("auth", client=ip, user=replies.sanitize(credentials.username), mechanism=credentials.mechanism,
                   result="failure", failures=failures)
        self._answer(LOCKED_OUT if failures >= ctx.config.auth.max_failures else replies.AUTH_FAILED)

    def _count_auth_refusals(self) -> None:
        """AUTH attempts the core refused alone (no TLS, malformed): counted here."""
        for result in self._conn.auth_refusals:
            AUTH_ATTEMPTS.labels(result).inc()
        self._conn.auth_refusals.clear()

    async def _commit(self, message: Message) -> None:
        ctx = self._ctx
        msgid = new_id()
        rcpts = [r.address.text for r in message.recipients]
        protocol = ("UTF8SMTP" if message.sender.smtputf8 else "ESMTP") if self._conn.esmtp else "SMTP"
        # RFC 3848: S for TLS, A for an authenticated submission.
        protocol += ("S" if self._conn.tls_active else "") + ("A" if self._user is not None else "")
        header = received_header(helo=self._conn.helo_name, client_ip=self.client_ip,
                                 hostname=ctx.config.server.hostname, protocol=protocol,
                                 msgid=msgid, recipients=rcpts, tls=self._tls_info)
        body = header + message.data
        now = time.time()
        envelope = Envelope(
            id=msgid, sender=message.sender.address.text, recipients=self._final_recipients(message),
            size=len(body), arrival=now, next_attempt=now,
            ret=policy.dsn_ret(message.sender.ret, message.recipients, trusted=self._trusted or self._user is not None),
            priority=policy.message_priority(ctx.config, sender=message.sender.address.text,
                                             recipients=rcpts, listener=self._listener.address,
                                             user=self._user_name),
            envid=message.sender.envid, body_type=message.sender.body,
            smtputf8=message.sender.smtputf8,
            client={"ip": self.client_ip, "port": self.client_port, "helo": self._conn.helo_name,
                    "listener": self._listener.address, "protocol": protocol,
                    "tls": self._tls_info or None, "user": self._user_name},
        )
        try:
            await ctx.committer.commit(NewMessage(envelope, body))
        except QueueFull as exc:
            logs.event("queue_full", msgid=msgid, client=self.client_ip, error=str(exc))
            metrics.INBOUND_REJECTED.labels("queue_full", "4xx").inc()
            reply = replies.QUEUE_FULL
        except QueueError as exc:
            logs.event("queue_error", msgid=msgid, client=self.client_ip, error=str(exc))
            metrics.INBOUND_REJECTED.labels("queue_error", "4xx").inc()
            reply = replies.QUEUE_ERROR
        else:
            reply = replies.queued(msgid)
            logs.event("received", msgid=msgid, client=self.client_ip, user=self._user_name, sender=envelope.sender,
                       nrcpt=len(rcpts), size=len(body), priority=envelope.priority or None)
            ctx.notifier.new(msgid)
            _, messages, octets = _listener_counters(self._listener.address)
            messages.inc()
            octets.inc(len(body))
        self._answer(reply)

    def _final_recipients(self, message: Message) -> list[Recipient]:
        """Accepted recipients with aliases expanded (the original kept as ORCPT), deduplicated."""
        out: list[Recipient] = []
        seen: set[str] = set()
        for rcpt in message.recipients:
            address = rcpt.address.text  # a bare <postmaster> was rewritten at RCPT (policy.check_rcpt_to)
            targets = self._ctx.local.expand(address)
            orcpt = rcpt.orcpt or (f"rfc822;{rcpt.address.text}" if targets != [address] else None)
            for target in targets:
                if target.lower() not in seen:
                    seen.add(target.lower())
                    out.append(Recipient(target, rcpt.notify, orcpt))
        return out

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _arm_timer(self, at: float, deadlines: bool = True) -> None:
        """Fire at `at` (time.monotonic()), or at the next session deadline if that is earlier."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = min(at, self._deadlines.next) if deadlines else at
        self._timer = asyncio.get_running_loop().call_later(self._timer_at - time.monotonic(), self._on_timer)

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
        logs.event("timeout", client=self.client_ip, state=conn.state.value, limit=reason)
        metrics.INBOUND_REJECTED.labels(reason, "4xx").inc()
        conn.close_with(replies.timeout(self._ctx.config.server.hostname))
        self._flush()
        self._linger_close()
