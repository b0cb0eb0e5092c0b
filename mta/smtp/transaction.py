"""The outbound rules over ClientConnection: the opening of a session, then one transaction per message.

    opening = OutboundOpening(conn, tls="may", remote="mx.test[192.0.2.1]:25")
    out = opening.receive(reply)       # bytes to send next; see .failure, .handshake_due, .done
    txn = OutboundTransaction(conn, message)   # local checks; refused recipients get their result
    out = txn.start()                  # then while txn.waiting: out = txn.receive(reply)
    parts = txn.content(after)         # once txn.content_due: the body, `after`'s commands behind it

The opening: greeting, EHLO (LHLO) with a HELO fallback after a 5xx EHLO (never under
LMTP), then STARTTLS by policy: "none" never; "may" when offered, a refusal carries on
in plaintext; "encrypt"/"verify" required (`verify`: the caller checks the certificate
and the host name). After the handshake EHLO again. A failure is a SessionError: no
transaction can start on this connection (the caller tries the next MX).

A transaction: with PIPELINING, MAIL, every RCPT and DATA go out as one group and the
replies are read in order; without it, one command at a time. MAIL refused: every
recipient gets its reply. No RCPT accepted: no content; a 354 (pipelined) gets a lone dot
and the message is discarded (RFC 2920 3.1); RSET after an accepted MAIL. After the dot
one reply for all accepted recipients, or under LMTP one each, in RCPT order (RFC 2033
4.2). A 421 ends it: recipients not yet answered get the 421 (`closing`). With
PIPELINING the next message's commands may ride this content (`content(after)`, RFC 2920
3.1); `after` is then announced and its own `start()` sends nothing.

Invariant: every recipient has a result once `waiting` and `content_due` are both False
(or after `fail`). Pure: no asyncio, socket, ssl or time imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mta.smtp import client
from mta.smtp.client import ClientConnection, ServerReply
from mta.smtp.replies import Reply, ReplyClass

TLS_POLICIES: Final = ("none", "may", "encrypt", "verify")


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


class SessionError(Exception):
    """The whole session failed before a transaction could start; try the next MX."""

    def __init__(self, code: int, status: str, text: str, permanent: bool, stage: str) -> None:
        super().__init__(f"{stage}: {code} {status} {text}".replace("  ", " "))
        self.code = code
        self.status = status
        self.text = text
        self.permanent = permanent
        self.stage = stage  # "connect" | "greeting" | "ehlo" | "helo" | "starttls"


def refused(stage: str, reply: ServerReply) -> SessionError:
    status = reply.status or ("5.0.0" if reply.permanent else "4.0.0")
    return SessionError(reply.code, status, reply.text, reply.permanent, stage)


class OutboundOpening:
    """Greeting, EHLO/HELO and STARTTLS: fed replies, gives the next command."""

    def __init__(self, conn: ClientConnection, tls: str, remote: str) -> None:
        if tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {TLS_POLICIES}, not {tls!r}")
        self._conn = conn
        self._tls = tls
        self._remote = remote
        self.stage = "greeting"  # what the next reply answers
        self.doing = "receiving the initial server greeting"  # for failure texts
        self.failure: SessionError | None = None  # the session cannot go on (bytes returned: send them first)
        self.handshake_due = False  # 220 to STARTTLS: handshake, then tls_established()
        self.done = False  # ready for MAIL

    @property
    def verify(self) -> bool:
        """The handshake checks the certificate and the MX host name."""
        return self._tls == "verify"

    def receive(self, reply: ServerReply) -> bytes:
        conn, stage = self._conn, self.stage
        if stage == "greeting":
            if reply.ok:
                return self._ehlo()
            self.failure = refused("greeting", reply)
            return b"" if reply.code == 421 else conn.quit()  # RFC 5321 3.1: a 554 greeting waits for QUIT
        if stage == "ehlo":
            if reply.ok:
                return self._after_hello()
            if conn.lmtp or not reply.permanent:
                self.failure = refused("ehlo", reply)
                return b""
            self.stage, self.doing = "helo", "sending HELO"
            return conn.helo()
        if stage == "helo":
            if reply.ok:
                return self._after_hello()
            self.failure = refused("helo", reply)
            return b""
        if stage == "starttls":
            if reply.code == 421:
                self.failure = refused("starttls", reply)
            elif reply.code == 220:
                self.handshake_due = True
            elif self._tls == "may":
                self.done = True  # opportunistic: carry on in plaintext
            else:
                self.failure = SessionError(reply.code if reply.temporary else 451, "4.7.5",
                                            f"STARTTLS refused by {self._remote}: {reply}", False, "starttls")
            return b""
        raise client.LocalProtocolError(f"reply fed to an opening in stage {stage}")

    def tls_established(self) -> bytes:
        """The handshake succeeded: EHLO again."""
        self.handshake_due = False
        self._conn.tls_established()
        return self._ehlo()

    def _ehlo(self) -> bytes:
        self.stage, self.doing = "ehlo", "sending LHLO" if self._conn.lmtp else "sending EHLO"
        return self._conn.ehlo()

    def _after_hello(self) -> bytes:
        conn, tls = self._conn, self._tls
        offered = "STARTTLS" in conn.extensions
        if conn.tls or tls == "none" or (tls == "may" and not offered):
            self.done = True
            return b""
        if not offered:
            self.failure = SessionError(451, "4.7.5", f"TLS is required, but was not offered by {self._remote}",
                                        False, "starttls")
            return b""
        self.stage, self.doing = "starttls", "sending STARTTLS"
        return conn.starttls()


# What a transaction is doing (the text goes into failure replies); compared with `is`.
# Set together with `waiting` (a reply is due), which is True in every stage but
# _CONTENT and _DONE: two assignments where it moves on, not a call per reply.
_MAIL: Final = "sending MAIL FROM"
_RCPT: Final = "sending RCPT TO"
_DATA: Final = "sending DATA"
_EMPTY: Final = "sending end of data"  # the lone dot after a 354 with no recipient
_CONTENT: Final = "sending message body"
_DOT: Final = "receiving the reply to end of data"
_RSET: Final = "sending RSET"
_DONE: Final = "done"


class OutboundTransaction:
    """One message on one connection: fed the replies in order, gives the commands."""

    __slots__ = ("_conn", "_mail_ok", "_next", "_pipelined", "_utf8", "accepted", "announced", "body", "closing",
                 "doing", "mail_answered", "message", "results", "rset_refused", "todo", "waiting")

    def __init__(self, conn: ClientConnection, message: Outbound) -> None:
        self._conn = conn
        self.message = message
        rcpts = message.recipients
        self.results: list[RecipientResult | None] = [None] * len(rcpts)
        utf8 = message.smtputf8 or not message.sender.isascii()
        for r in rcpts:  # a loop, not all(genexpr): no generator per message
            utf8 = utf8 or not r.address.isascii()
        self._utf8 = utf8
        self.body = client.canonical_body(message.body)
        self.todo: list[int] = []  # recipients not refused locally, to send RCPT for
        self.accepted: list[int] = []
        self.mail_answered = False  # a reply to MAIL came (not a 421): the server saw this message
        self.closing: ServerReply | None = None  # the server said 421: the connection is going away
        self.rset_refused = False  # a server that cannot reset gets no further transaction
        self.announced = False  # the commands went out behind the previous content
        self._pipelined = conn.pipelining
        self._mail_ok = False
        self._next = 0  # index into todo of the next RCPT reply
        self.doing = _DONE  # what it is doing, for failure texts
        self.waiting = False  # a reply is due (under the command timeout; the data timeout after the content)
        refusal = client.check_message(conn.extensions, len(self.body), self._utf8)
        bad_sender = client.bad_address(message.sender) if refusal is None else None
        if bad_sender is not None:
            refusal = Reply(553, "5.1.7", f"bad sender address syntax: {bad_sender}")
        if refusal is not None:
            self.results = [_local(r.address, refusal) for r in rcpts]
            return
        for i, rcpt in enumerate(rcpts):
            why = client.bad_address(rcpt.address) if rcpt.address else "empty address"
            if why is not None:
                self.results[i] = _local(rcpt.address, Reply(553, "5.1.3", f"bad recipient address syntax: {why}"))
            else:
                self.todo.append(i)
        if self.todo:
            self.doing, self.waiting = _MAIL, True

    # --- state -------------------------------------------------------------------------

    @property
    def content_due(self) -> bool:
        """354 with recipients accepted: send content() now."""
        return self.doing is _CONTENT

    @property
    def may_announce(self) -> bool:
        """The next message's commands may ride this content (PIPELINING)."""
        return self._pipelined

    def recipient_results(self) -> list[RecipientResult]:
        assert None not in self.results, "a recipient without a result"
        return self.results  # type: ignore[return-value]

    # --- commands ----------------------------------------------------------------------

    def start(self) -> bytes:
        """The first bytes of the transaction (none when it was announced)."""
        if self.doing is not _MAIL or self.announced:
            return b""
        return self.announce() if self._pipelined else self._mail()

    def announce(self) -> bytes:
        """MAIL, every RCPT and DATA as one pipelined group; replies come back in order."""
        self.announced = True
        conn, rcpts = self._conn, self.message.recipients
        return b"".join([self._mail(), *[conn.rcpt_to(rcpts[i].address, rcpts[i].notify, rcpts[i].orcpt)
                                         for i in self.todo], conn.data()])

    def content(self, after: OutboundTransaction | None = None) -> list[bytes]:
        """The content, stuffed and ended; `after`'s commands behind it when it has any."""
        if self.doing is not _CONTENT:
            raise client.LocalProtocolError("content before a 354 with recipients accepted")
        self.doing, self.waiting = _DOT, True
        parts = [self._conn.message_body(self.body, canonical=True)]  # canonical_body made it canonical
        if after is not None and self._pipelined and after.doing is _MAIL:
            parts.append(after.announce())
        return parts

    def receive(self, reply: ServerReply) -> bytes:
        """The next reply of this transaction; returns the command to send next (b"": none)."""
        stage = self.doing
        if reply.code == 421:
            self.closing = reply
            self.fail(reply.code, reply.status or "4.0.0", reply.text)
            return b""
        if stage is _MAIL:
            self.mail_answered = True
            self._mail_ok = reply.ok
            if not reply.ok:
                self._resolve(self.todo, reply)
                if not self._pipelined:
                    self.doing, self.waiting = _DONE, False
                    return b""
            self.doing, self.waiting = _RCPT, True
            return self._rcpt()
        if stage is _RCPT:
            i = self.todo[self._next]
            self._next += 1
            if self._mail_ok:
                if reply.ok:
                    self.accepted.append(i)
                else:
                    self._resolve((i,), reply)
            if self._next < len(self.todo):
                return self._rcpt()
            if self._pipelined or self.accepted:
                self.doing, self.waiting = _DATA, True
                return b"" if self._pipelined else self._conn.data()
            return self._reset()
        if stage is _DATA:
            if reply.code == 354 and not self.accepted:
                self.doing, self.waiting = _EMPTY, True
                return self._conn.message_body(b"")
            if reply.code == 354:
                self.doing, self.waiting = _CONTENT, False
                return b""
            self._resolve(self.accepted, reply)
            return self._reset()
        if stage is _EMPTY:
            return self._reset()
        if stage is _DOT:
            if self._conn.lmtp:  # one reply per accepted recipient, in RCPT order (RFC 2033 4.2)
                self._resolve((self.accepted[self._next - len(self.todo)],), reply)
                self._next += 1
                if self._next - len(self.todo) < len(self.accepted):
                    return b""
            else:
                self._resolve(self.accepted, reply)
            self.doing, self.waiting = _DONE, False
            return b""
        if stage is _RSET:
            self.rset_refused = not reply.ok
            self.doing, self.waiting = _DONE, False
            return b""
        raise client.LocalProtocolError(f"reply fed to a transaction while {stage}")

    def fail(self, code: int, status: str, text: str) -> None:
        """The connection failed mid-transaction: recipients not yet answered get this reply."""
        self.doing, self.waiting = _DONE, False
        for i, rcpt in enumerate(self.message.recipients):
            if self.results[i] is None:
                self.results[i] = RecipientResult(rcpt.address, code, status, text)

    # --- helpers -----------------------------------------------------------------------

    def _mail(self) -> bytes:
        m = self.message
        return self._conn.mail_from(m.sender, size=len(self.body), body_type=m.body_type, smtputf8=self._utf8,
                                    ret=m.ret, envid=m.envid)

    def _rcpt(self) -> bytes:
        if self._pipelined:
            return b""
        rcpt = self.message.recipients[self.todo[self._next]]
        return self._conn.rcpt_to(rcpt.address, rcpt.notify, rcpt.orcpt)

    def _reset(self) -> bytes:
        if not self._mail_ok:
            self.doing, self.waiting = _DONE, False
            return b""
        self.doing, self.waiting = _RSET, True
        return self._conn.rset()

    def _resolve(self, indices: list[int] | tuple[int, ...], reply: ServerReply) -> None:
        rcpts, results = self.message.recipients, self.results
        for i in indices:
            results[i] = RecipientResult(rcpts[i].address, reply.code, reply.status, reply.text)


def _local(address: str, reply: Reply) -> RecipientResult:
    text = reply.text if isinstance(reply.text, str) else " ".join(reply.text)
    return RecipientResult(address, reply.code, reply.status, text)
