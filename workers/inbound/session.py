"""One SMTP session's decisions, without sockets (h11 to protocol.py's uvicorn).

The session owns the sans-I/O core (`conn`, a ServerConnection) and decides every event
that needs policy, a password check or the queue; protocol.py moves bytes, runs the
timers and TLS, and answers each event with the reply of the decision it gets here.
Nothing here touches a socket, a timer or a TLS object: the adapter tells the session
what it learned (the client at `check_connect`, the cipher at `tls_started`).

  check_connect(client) -> Decision      [policy] client lists, the AUTH lockout, per-IP limits
  check_connect_shared(client)           AWAITABLE: the same with the cluster's lockout and connection
                                         window, when `connect_asks_cluster`
  dnsbl_lookup() -> AWAITABLE | None     run in the background from connect; MAIL waits for it
                                         while `waits_for_dnsbl`
  check_mail(MailFrom) -> Decision       sender lists, sender/login match, memory budget, DNSBL,
                                         message rates, then policy.check_mail_from
  check_rcpt(RcptTo) -> RcptDecision     recipient lists, relay control and local users
                                         (policy.check_rcpt_to: the bare <postmaster> rewritten),
                                         who may post to a mailing list (listpost.py), recipient rates
  check_mail_shared, check_rcpt_shared    AWAITABLE: the same, the rates counted in the cluster's windows
                                         ([cluster] redis, sharedlimits.py) when `mail_asks_cluster` /
                                         `rcpt_asks_cluster`
  check_vrfy(Vrfy | Expn) -> Reply
  authenticate(Credentials) -> AWAITABLE Decision   the cluster's lockout, delay, the per-address budget, scrypt
  on_message(Message) -> AWAITABLE Decision         build, the content pipeline, commit
  receive_data(bytes), account(), release()         the memory budget and the per-IP slot

Every refusal is logged and counted here (event=rejected or refused,
mta_inbound_rejected_total) with the reason its Decision carries.

`on_message` runs the content pipeline between `build` and `commit`: `build` makes the
message as it will be stored (envelope with aliases expanded, ORCPT kept, RET forced to
HDRS where backscatter could follow, priority; our Received header in front of the
content; Date and Message-ID added when missing on submission and smtps listeners and for
authenticated clients, mta/submission.py); the stages this listener runs (content.py:
attachments, antivirus, milters, footers, DKIM) change it, refuse it (the reply to end of
data), discard it or quarantine it (stored with every recipient held); `commit` stores it
durably, with its mailing lists' copies in the same transaction (listpost.py), and makes
the 250. The adapter stops reading the client while the awaitable
runs, so a slow stage holds only its own session.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine
from typing import Any

from mta import logs, metrics, submission
from mta.config import ListenerConfig
from mta.smtp import replies
from mta.smtp.commands import Expn, MailFrom, RcptTo, Vrfy
from mta.smtp.replies import Reply
from mta.smtp.server import Credentials, Message, ServerConnection
from mta.users import User
from mtaqueue import Envelope, NewMessage, QueueError, QueueFull, Recipient, new_id
from workers.inbound import content, listpost, policy, transferin
from workers.inbound.auth import AUTH_ATTEMPTS
from workers.inbound.client import UNKNOWN_CLIENT, Client
from workers.inbound.context import WorkerContext
from workers.inbound.decision import Decision
from workers.inbound.ratelimit import AUTH_BUSY, AUTH_BUSY_POLL_SECONDS, AUTH_BUSY_SECONDS, LOCKED_OUT
from workers.inbound.received import received_header


@functools.cache
def _listener_counters(address: str) -> tuple[Any, Any, Any]:
    """A listener's connection, message and byte counters, resolved once per process."""
    return (metrics.INBOUND_CONNECTIONS.labels(address), metrics.INBOUND_MESSAGES.labels(address),
            metrics.INBOUND_BYTES.labels(address))


class InboundSession:
    def __init__(self, ctx: WorkerContext, listener: ListenerConfig) -> None:
        self.ctx = ctx
        self.listener = listener
        self.conn = ServerConnection(ctx.server_options[listener.address], tls=listener.mode == "smtps")
        self.client = UNKNOWN_CLIENT
        self.trusted = False  # in [relay] mynetworks: may relay, exempt from the rate windows; HELO grants nothing
        self.user: User | None = None  # authenticated
        self.tls_info = ""  # "TLSv1.3 with cipher ..." once encrypted
        self._counted = False  # holds a per-IP connection slot
        self._held = 0  # bytes last reported to the worker's memory budget
        self._dnsbl_pending = False
        self._dnsbl_verdict: Reply | None = None
        self._sender = ""  # the transaction's envelope sender (a RCPT follows only an accepted MAIL)

    @property
    def user_name(self) -> str | None:
        return self.user.name if self.user is not None else None

    # --- connect -----------------------------------------------------------------------

    def check_connect(self, client: Client) -> Decision:
        """Greet (the accepted decision's reply) or refuse `client`; an accepted client holds
        a per-IP slot until `release`."""
        self._connected(client)
        refusal = self._connect_refusal()
        if refusal is None:
            refusal = self.ctx.limiter.open_connection(client.ip, self.trusted)
            self._counted = refusal is None
        return self._connect_verdict(refusal)

    def connect_asks_cluster(self, client: Client) -> bool:
        """The cluster's lockout (submission, smtps) or connection window applies: the connect
        is decided by `check_connect_shared`."""
        shared = self.ctx.shared
        return shared is not None and (self._checks_lockout or
                                       shared.applies_to_connect(client.within(self.ctx.config.relay.mynetworks)))

    async def check_connect_shared(self, client: Client) -> Decision:
        """AWAITABLE: check_connect with the cluster's lockout and connection window (sharedlimits.py)."""
        shared = self.ctx.shared
        assert shared is not None
        self._connected(client)
        refusal = self._connect_refusal()
        if refusal is None and self._checks_lockout and await shared.locked_out(client.ip):
            refusal = Decision(LOCKED_OUT, "auth_lockout")
        if refusal is None:
            refusal = self.ctx.limiter.open_connection(client.ip, self.trusted, rate=False)
        if refusal is None:
            self._counted = True  # from here a client that leaves gives its slot back (release)
            refusal = await shared.connection(client.ip, self.trusted)
            if refusal is not None:
                self.release()
        return self._connect_verdict(refusal)

    @property
    def _checks_lockout(self) -> bool:
        return self.listener.mode in ("submission", "smtps")

    def _connected(self, client: Client) -> None:
        self.client = client
        # Decided once per session, like Postfix's smtpd: a reload during it changes the next one.
        self.trusted = client.within(self.ctx.config.relay.mynetworks)
        logs.event("connect", client=client.ip, listener=self.listener.address, tls=self.tls_info or None)
        self.ctx.writer.count(_listener_counters(self.listener.address)[0])

    def _connect_verdict(self, refusal: Decision | None) -> Decision:
        if refusal is None:
            return Decision(replies.greeting(self.ctx.config.server.hostname))
        logs.event("refused", client=self.client.ip, reason=refusal.reason, reply=str(refusal.reply))
        metrics.INBOUND_REJECTED.labels(refusal.reason, f"{refusal.reply.code // 100}xx").inc()
        return refusal

    def _connect_refusal(self) -> Decision | None:
        """The refusals before the per-IP slot: client_deny, the node's lockout."""
        ctx, ip = self.ctx, self.client.ip
        denied = ctx.access.client(ip)
        if denied is not None:
            return Decision(denied, "client_denied")
        if self._checks_lockout and ctx.limiter.locked_out(ip):
            return Decision(LOCKED_OUT, "auth_lockout")
        return None

    def release(self) -> None:
        """The session is over: give its per-IP slot back (once; a reconnect must not count twice)."""
        if self._counted:
            self._counted = False
            self.ctx.limiter.close_connection(self.client.ip)

    def dnsbl_lookup(self) -> Coroutine[Any, Any, None] | None:
        """AWAITABLE, for the adapter to run in the background from an accepted connect: the
        DNSBL lookup. None when this client is not looked up (no zones, mynetworks, client_allow)."""
        ctx = self.ctx
        if not ctx.config.policy.dnsbl or self.trusted or ctx.access.allowed(self.client.ip):
            return None
        self._dnsbl_pending = True
        return self._look_up_dnsbl()

    async def _look_up_dnsbl(self) -> None:
        try:
            self._dnsbl_verdict = await self.ctx.access.dnsbl(self.client.ip)
        finally:
            self._dnsbl_pending = False  # a lookup that broke or was cancelled lets the client through

    @property
    def waits_for_dnsbl(self) -> bool:
        """MAIL must wait for the lookup (an authenticated session skips it)."""
        return self._dnsbl_pending and self.user is None

    # --- MAIL, RCPT, VRFY ----------------------------------------------------------------

    def check_mail(self, command: MailFrom) -> Decision:
        self._sender = command.address.text
        refusal = self._mail_refusal(command)
        if refusal is None:
            limited = self.ctx.limiter.message(self.client.ip, self.user_name, self.trusted)
            refusal = Decision(limited, "message_rate") if limited is not None else None
        return self._mail_verdict(command, refusal)

    @property
    def mail_asks_cluster(self) -> bool:
        """A shared message window applies: MAIL is decided by `check_mail_shared`, not `check_mail`."""
        shared = self.ctx.shared
        return shared is not None and shared.applies_to_mail(self.user_name, self.trusted)

    @property
    def rcpt_asks_cluster(self) -> bool:
        """A shared recipient window applies: RCPT is decided by `check_rcpt_shared`."""
        shared = self.ctx.shared
        return shared is not None and shared.applies_to_rcpt(self.user_name, self.trusted)

    async def check_mail_shared(self, command: MailFrom) -> Decision:
        """AWAITABLE: check_mail with the message rate counted in the cluster's windows (sharedlimits.py)."""
        assert self.ctx.shared is not None
        self._sender = command.address.text
        refusal = self._mail_refusal(command)
        if refusal is None:
            refusal = await self.ctx.shared.message(self.client.ip, self.user_name, self.trusted)
        return self._mail_verdict(command, refusal)

    def _mail_verdict(self, command: MailFrom, refusal: Decision | None) -> Decision:
        if refusal is None:
            return Decision(policy.check_mail_from(self.ctx.config.relay, self.client.address, command))
        self._rejected(refusal, sender=command.address.text)
        return refusal

    def _mail_refusal(self, command: MailFrom) -> Decision | None:
        """The refusals before the message rate."""
        ctx, sender = self.ctx, command.address.text
        denied = ctx.access.sender(sender)
        if denied is not None:
            return Decision(denied, "sender_denied")
        if self.user is not None and ctx.config.auth.sender_login_match and not self.user.owns(sender):
            return Decision(replies.SENDER_NOT_OWNED, "sender_login_mismatch")
        busy = ctx.budget.check_mail(command.size)
        if busy is not None:
            return Decision(busy, "memory_budget")
        if self._dnsbl_verdict is not None and self.user is None:
            return Decision(self._dnsbl_verdict, "dnsbl")
        return None

    def check_rcpt(self, command: RcptTo) -> policy.RcptDecision:
        """The verdict, and the recipient as the transaction keeps it (see policy.RcptDecision)."""
        decision = self._rcpt_decision(command)
        if not decision.reason:
            limited = self.ctx.limiter.recipient(self.client.ip, self.user_name, self.trusted)
            if limited is not None:
                decision = policy.RcptDecision(limited, "recipient_rate", command)
        return self._rcpt_verdict(command, decision)

    async def check_rcpt_shared(self, command: RcptTo) -> policy.RcptDecision:
        """AWAITABLE: check_rcpt with the recipient rate counted in the cluster's windows."""
        assert self.ctx.shared is not None
        decision = self._rcpt_decision(command)
        if not decision.reason:
            limited = await self.ctx.shared.recipient(self.client.ip, self.user_name, self.trusted)
            if limited is not None:
                decision = policy.RcptDecision(limited.reply, limited.reason, command)
        return self._rcpt_verdict(command, decision)

    def _rcpt_verdict(self, command: RcptTo, decision: policy.RcptDecision) -> policy.RcptDecision:
        if decision.reason:
            self._rejected(Decision(decision.reply, decision.reason), rcpt=command.address.text)
        return decision

    def _rcpt_decision(self, command: RcptTo) -> policy.RcptDecision:
        """The verdict before the recipient rate."""
        ctx = self.ctx
        rcpt = command.address.text
        denied = ctx.access.recipient(rcpt)
        decision = (policy.RcptDecision(denied, "recipient_denied", command) if denied is not None else
                    policy.check_rcpt_to(ctx.config.relay, self.client.address, command, ctx.local,
                                         hostname=ctx.config.server.hostname, authenticated=self.user is not None))
        if not decision.reason:
            refusal = listpost.check_post(ctx.local.lists, decision.rcpt.address.text, self._sender)
            if refusal is not None:
                decision = policy.RcptDecision(refusal.reply, refusal.reason, command)
        return decision

    def check_vrfy(self, command: Vrfy | Expn) -> Reply:
        return self.ctx.local.verify(command.argument, expand=isinstance(command, Expn))

    def _rejected(self, refusal: Decision, **fields: object) -> None:
        logs.event("rejected", client=self.client.ip, user=self.user_name, reason=refusal.reason,
                   reply=str(refusal.reply), **fields)
        metrics.INBOUND_REJECTED.labels(refusal.reason, f"{refusal.reply.code // 100}xx").inc()

    # --- input, memory, TLS ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Client bytes into the core; a transfer that takes the worker past its memory
        budget is refused (the core reads the rest, keeps none, answers 451 4.3.1 at its end)."""
        self.conn.receive_data(data)
        budget = self.ctx.budget
        if not budget.admit(self.conn, self._held):
            self._rejected(Decision(replies.MEMORY_DISCARDED, "memory_budget"), held=budget.held)

    def account(self, gone: bool = False) -> None:
        """After each batch of input: count the AUTH exchanges the core refused alone, and
        report what the session holds to the worker's memory budget (0 once it is gone)."""
        for result in self.conn.auth_refusals:
            AUTH_ATTEMPTS.labels(result).inc()
        self.conn.auth_refusals.clear()
        budget = self.ctx.budget
        held = 0 if gone else budget.cost(self.conn)
        if held != self._held:  # most batches change nothing: no report
            self._held = budget.report(self._held, held)

    def tls_started(self, info: str) -> None:
        """The STARTTLS handshake completed: the session starts over, nothing learned before kept."""
        self.tls_info = info
        self.user = None
        self.conn.tls_started()

    # --- AUTH ----------------------------------------------------------------------------

    async def authenticate(self, credentials: Credentials) -> Decision:
        """AWAITABLE: the AUTH verdict. Waits out the failure delay and, while checks in progress
        from the address hold its failure budget, a slot; scrypt runs on the authenticator's threads."""
        ctx, ip = self.ctx, self.client.ip
        if ctx.limiter.locked_out(ip):
            logs.event("auth", client=ip, user=replies.sanitize(credentials.username), result="locked_out")
            return _auth_result(Decision(LOCKED_OUT, "locked_out"))
        if ctx.shared is not None:  # the cluster's failure count: a lockout earned on other nodes holds here
            refusal = await ctx.shared.auth_admit(ip)
            if refusal is not None:
                logs.event("auth", client=ip, user=replies.sanitize(credentials.username), result=refusal.reason)
                return _auth_result(refusal)
        delay = ctx.limiter.auth_delay(ip)
        if delay > 0:
            await asyncio.sleep(delay)
        # At most max_failures - failures checks from one address run at once: concurrent
        # guesses cannot exceed the budget; concurrent good logins wait for a slot.
        waited = 0.0
        while (admitted := ctx.limiter.auth_begin(ip)) == "busy":
            while True:  # polled with reads: one write transaction per admission attempt
                if waited >= AUTH_BUSY_SECONDS:
                    return _auth_result(Decision(AUTH_BUSY, "busy"))
                await asyncio.sleep(AUTH_BUSY_POLL_SECONDS)
                waited += AUTH_BUSY_POLL_SECONDS
                if not ctx.limiter.auth_busy(ip):
                    break
        if admitted == "locked":
            return _auth_result(Decision(LOCKED_OUT, "locked_out"))
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
        if failed and ctx.shared is not None:
            failures = max(failures, await ctx.shared.auth_failed(ip))
        if result is not None and not failed and result.user is not None:
            self.user = result.user
            logs.event("auth", client=ip, user=result.user.name, mechanism=credentials.mechanism,
                       result="success", cached=result.cached)
            return _auth_result(Decision(replies.AUTH_OK))
        logs.event("auth", client=ip, user=replies.sanitize(credentials.username), mechanism=credentials.mechanism,
                   result="failure", failures=failures)
        if failures >= ctx.config.auth.max_failures:
            return _auth_result(Decision(LOCKED_OUT, "failure"))
        return _auth_result(Decision(replies.AUTH_FAILED, "failure"))

    # --- the message: build, [content pipeline], commit ---------------------------------------

    async def on_message(self, message: Message) -> Decision:
        """AWAITABLE: end of data to the verdict on the message: build, the content pipeline
        (content.py: the stages this listener runs), commit."""
        stored = self.build(message)
        stages = self.ctx.content.for_listener(self.listener.address)
        if not stages:
            return await self.commit(stored, message)
        work = content.Work(stored.envelope, stored.body, self._facts(message))
        verdict = await content.run(stages, work)
        msgid, notes = work.envelope.id, ",".join(work.notes)
        if verdict.refusal is not None:
            self._rejected(verdict.refusal, msgid=msgid, sender=work.envelope.sender, content=notes)
            return verdict.refusal
        if verdict.discard:
            logs.event("discarded", msgid=msgid, client=self.client.ip, sender=work.envelope.sender, content=notes)
            return Decision(replies.queued(msgid))
        work.envelope.size = len(work.body)
        return await self.commit(NewMessage(work.envelope, work.body), message, notes, work.quarantine)

    def _facts(self, message: Message) -> content.Facts:
        mail = message.sender
        args = ((f"SIZE={mail.size}",) if mail.size is not None else ()) + \
            ((f"BODY={mail.body}",) if mail.body else ()) + (("SMTPUTF8",) if mail.smtputf8 else ()) + \
            ((f"RET={mail.ret}",) if mail.ret else ()) + ((f"ENVID={mail.envid}",) if mail.envid else ())
        return content.Facts(hostname=self.ctx.config.server.hostname, listener=self.listener.address,
                             client_ip=self.client.ip, client_port=self.client.port, helo=self.conn.helo_name or "",
                             user=self.user_name, tls=self.tls_info, sender_args=args)

    def build(self, message: Message) -> NewMessage:
        """The message as it will be stored: envelope and body (our Received header first)."""
        ctx, conn = self.ctx, self.conn
        msgid = new_id()
        rcpts = [r.address.text for r in message.recipients]
        protocol = ("UTF8SMTP" if message.sender.smtputf8 else "ESMTP") if conn.esmtp else "SMTP"
        # RFC 3848: S for TLS, A for an authenticated submission.
        protocol += ("S" if conn.tls_active else "") + ("A" if self.user is not None else "")
        header = received_header(helo=conn.helo_name, client_ip=self.client.ip,
                                 hostname=ctx.config.server.hostname, protocol=protocol,
                                 msgid=msgid, recipients=rcpts, tls=self.tls_info)
        now = time.time()
        content = transferin.strip(message.data)  # another node's transfer field: never passed on
        if self.listener.mode in submission.SUBMISSION_MODES or self.user is not None:
            # A user agent's message: Date and Message-ID when it has none. Never relayed mail's.
            content = submission.add_missing(content, msgid=msgid, hostname=ctx.config.server.hostname, now=now)
        body = header + content
        sender = message.sender.address.text
        envelope = Envelope(
            id=msgid, sender=sender, recipients=self.final_recipients(message),
            size=len(body), arrival=now, next_attempt=now,
            ret=policy.dsn_ret(message.sender.ret, message.recipients, trusted=self.trusted or self.user is not None),
            priority=policy.message_priority(ctx.config, sender=sender, recipients=rcpts,
                                             listener=self.listener.address, user=self.user_name),
            envid=message.sender.envid, body_type=message.sender.body,
            smtputf8=message.sender.smtputf8,
            client={"ip": self.client.ip, "port": self.client.port, "helo": conn.helo_name,
                    "listener": self.listener.address, "protocol": protocol,
                    "tls": self.tls_info or None, "user": self.user_name},
        )
        return NewMessage(envelope, body)

    def final_recipients(self, message: Message) -> list[Recipient]:
        """Accepted recipients with aliases expanded (the original kept as ORCPT), deduplicated."""
        out: list[Recipient] = []
        seen: set[str] = set()
        for rcpt in message.recipients:
            address = rcpt.address.text  # a bare <postmaster> was rewritten at RCPT (policy.check_rcpt_to)
            targets = self.ctx.local.expand(address)
            orcpt = rcpt.orcpt or (f"rfc822;{address}" if targets != [address] else None)
            for target in targets:
                key = target.lower()
                if key not in seen:
                    seen.add(key)
                    out.append(Recipient(target, rcpt.notify, orcpt))
        return out

    async def commit(self, stored: NewMessage, received: Message, notes: str | None = None,
                     quarantine: str | None = None) -> Decision:
        """AWAITABLE: the durable commit (group commit, fsync), then 250 queued as ID; a full or
        failing queue is a 4xx, never a 250 for a message that is not stored."""
        envelope = stored.envelope
        msgid = envelope.id
        copies = listpost.split(stored, self.ctx.local.lists, self.ctx.local.expand)
        if quarantine is not None:
            for rcpt in (r for c in copies for r in c.message.envelope.recipients):
                rcpt.state, rcpt.last_reply = "held", f"quarantined by {quarantine}"
        try:
            await self.ctx.committer.commit_all(tuple(c.message for c in copies))
        except QueueFull as exc:
            logs.event("queue_full", msgid=msgid, client=self.client.ip, error=str(exc))
            metrics.INBOUND_REJECTED.labels("queue_full", "4xx").inc()
            return Decision(replies.QUEUE_FULL, "queue_full")
        except QueueError as exc:
            logs.event("queue_error", msgid=msgid, client=self.client.ip, error=str(exc))
            metrics.INBOUND_REJECTED.labels("queue_error", "4xx").inc()
            return Decision(replies.QUEUE_ERROR, "queue_error")
        logs.event("received", msgid=msgid, client=self.client.ip, user=self.user_name, sender=envelope.sender,
                   nrcpt=len(received.recipients), size=len(stored.body), priority=envelope.priority or None,
                   content=notes, quarantined=quarantine)
        listpost.log_copies(copies, msgid)
        if self.ctx.cache is not None:
            transferin.note(self.ctx.cache, received.data, msgid)  # the data as received: the field is in it
        for copy in copies:
            if quarantine is None and copy.held_for is None:
                self.ctx.notifier.new(copy.message.envelope.id)
        _, messages, octets = _listener_counters(self.listener.address)
        self.ctx.writer.count(messages)  # written before the 250 leaves (output.py)
        self.ctx.writer.count(octets, len(stored.body))
        return Decision(replies.queued(msgid))


def _auth_result(decision: Decision) -> Decision:
    """Count an AUTH verdict in mta_auth_attempts_total (result: its reason, or success)."""
    AUTH_ATTEMPTS.labels(decision.reason or "success").inc()
    return decision
