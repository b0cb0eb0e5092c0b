"""The sans-I/O SMTP/LMTP client connection: commands as bytes, server replies as events.

    conn = ClientConnection("relay.test", lmtp=False)
    conn.receive_data(data)            # frames reply lines; multi-line replies are one event
    ev = conn.next_event()             # ServerReply | NEED_DATA | CLOSED
    out = conn.ehlo()                  # every command method returns the bytes to send

One session may carry several transactions (MAIL ... final dot, or RSET). Every
command pushes the reply it expects onto a FIFO, so pipelined replies are matched
to their commands in order; each ServerReply names the command it answers. With
PIPELINING the next transaction's MAIL may follow the content at once, before the
reply to the final dot (RFC 2920 3.1: the content may start a command group).

What the core decides alone: the EHLO extensions (forgotten after STARTTLS, RFC
3207 4.2); which MAIL/RCPT parameters the server may see (only advertised ones:
SIZE, BODY=8BITMIME, SMTPUTF8, and the DSN parameters RET/ENVID/NOTIFY/ORCPT);
dot-stuffing, with any bare CR or LF in the body sent as CRLF; how many replies
follow the final dot (one, or under LMTP one per accepted recipient, RFC 2033 4.2).
`check_message` names the local refusal (552 5.3.4, 553 5.6.7) for a message the
server cannot take.

Errors: ProtocolError is the peer's fault (a malformed or unexpected reply, bytes
after the 220 to STARTTLS); it is sticky and the connection is unusable after it.
LocalProtocolError is ours (a command out of order, CR or LF in an address).

Replies are parsed by serverreplies.py (ServerReply, Extensions; a single-line reply
once per process, _PARSED). Pure: no asyncio, socket or time imports.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

from mta.smtp.content import crlf_line_ends, has_bare_newline
from mta.smtp.replies import Reply
from mta.smtp.serverreplies import (  # noqa: F401 - the reply side, re-exported for the client's callers
    _ALLOWED_CLASSES, _CONTROL, _DATA, _DOT, _MAIL, _PARSED, _RCPT, _STARTTLS, MAX_PARSED, MAX_REPLY_LINE,
    MAX_REPLY_LINES, NO_EXTENSIONS, Extensions, ProtocolError, ServerReply, Verb, _check_line, parse_extensions,
    parse_reply,
)

_SUSPECT = re.compile(r"[\x00-\x1f\x7f<>]")  # what bad_address looks at more closely

# Local refusals: the message never reaches DATA at this server.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "message size exceeds the size limit of the server")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "SMTPUTF8 is required, but was not offered by the server")


class LocalProtocolError(Exception):
    """We broke the protocol: a bug in the caller, never the peer's doing."""


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Marker("NEED_DATA")  # feed more bytes with receive_data()
CLOSED = _Marker("CLOSED")  # the server closed the connection; no reply is coming


Event = ServerReply | _Marker


def check_message(extensions: Extensions, size: int, smtputf8: bool) -> Reply | None:
    """The local refusal for a message this server cannot take, or None (check before MAIL)."""
    if smtputf8 and "SMTPUTF8" not in extensions:
        return NEEDS_SMTPUTF8
    limit = extensions.max_size
    if limit is not None and size > limit:
        return MESSAGE_TOO_BIG
    return None


def bad_address(address: str) -> str | None:
    """Why `address` cannot go into a MAIL or RCPT command, or None."""
    if _SUSPECT.search(address) is None:
        return None  # the common case, in one search
    if _CONTROL.search(address):
        return "control character in address"
    local, _, domain = address.rpartition("@")
    if not local.startswith('"') and ("<" in address or ">" in address):
        return "angle bracket in address"
    if "<" in domain or ">" in domain:
        return "angle bracket in address"
    return None


def xtext(value: str) -> str | None:
    """RFC 3461 xtext encoding; None for non-ASCII text (it has no xtext form)."""
    if not value.isascii():
        return None
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


def canonical_body(body: bytes) -> bytes:
    """Content as it goes out, before stuffing: every line end CRLF, the last line ended.

    Its length is what SIZE= announces (RFC 1870: CRLFs counted, stuffing not).
    """
    if has_bare_newline(body):
        body = crlf_line_ends(body)  # bare CR or LF: never on the wire
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def stuff_body(body: bytes, canonical: bool = False) -> bytes:
    """Message content -> the DATA wire form: canonical, dot-stuffed, ending CRLF.CRLF.

    `canonical`: the caller has made it canonical already (canonical_body); it is not
    checked again (on a 1 MiB body the check is most of the work)."""
    if not canonical:
        body = canonical_body(body)
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class ClientConnection:
    def __init__(self, helo_name: str, lmtp: bool = False) -> None:
        self.helo_name = helo_name
        self.lmtp = lmtp
        self.extensions = NO_EXTENSIONS
        self.greeted = False  # a 2xx greeting arrived
        self.helo_done = False  # EHLO/LHLO/HELO accepted since the greeting or STARTTLS
        self.esmtp = False
        self.tls = False
        self.accepted = 0  # RCPTs accepted in the current transaction
        self._awaiting: deque[Verb] = deque([Verb.GREETING])
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # lines of the multi-line reply being read
        self._eof = False
        self._error: ProtocolError | None = None
        self._tls_pending = False  # 220 to STARTTLS: nothing but the handshake until tls_established()
        self._in_mail = False  # MAIL sent and not refused; until the content is sent, or RSET
        self._data_ok = False  # 354 received: the body may be sent
        self._utf8 = False  # the current transaction is SMTPUTF8

    # --- input -----------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def awaiting(self) -> tuple[Verb, ...]:
        return tuple(self._awaiting)

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions.keywords

    def receive_data(self, data: bytes) -> None:
        if not self._eof:
            self._buffer += data

    def receive_eof(self) -> None:
        self._eof = True

    def next_event(self) -> Event:
        if self._error is not None:
            raise self._error
        try:
            reply = self._read_reply()
        except ProtocolError as exc:
            self._error = exc
            raise
        if reply is None:
            return CLOSED if self._eof else NEED_DATA
        return reply

    def _read_reply(self) -> ServerReply | None:
        buf, lines = self._buffer, self._lines
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_REPLY_LINE:
                    raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            raw = bytes(buf[:end - 1] if end and buf[end - 1] == 13 else buf[:end])  # CR LF or a bare LF
            del buf[: end + 1]
            if len(raw) > MAX_REPLY_LINE:
                raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
            if not lines:
                seen = _PARSED.get((raw, self._awaiting[0] if self._awaiting else None))
                if seen is not None:
                    return self._commit(seen)
                if raw[3:4] != b"-":  # a single-line reply: parse_reply checks it
                    return self._commit(self._parse([raw]))
            _check_line(raw)
            lines.append(raw)
            if raw[3:4] == b"-":
                if len(lines) >= MAX_REPLY_LINES:
                    raise ProtocolError(f"reply of more than {MAX_REPLY_LINES} lines")
                continue
            self._lines = []
            return self._commit(self._parse(lines))

    def _parse(self, lines: list[bytes]) -> ServerReply:
        verb = self._awaiting[0] if self._awaiting else None
        reply = parse_reply(lines, verb)
        if len(lines) == 1 and verb is not None:
            if len(_PARSED) >= MAX_PARSED:
                _PARSED.clear()
            _PARSED[(lines[0], verb)] = reply
        return reply

    def _commit(self, reply: ServerReply) -> ServerReply:
        if not self._awaiting:
            raise ProtocolError(f"reply with no command outstanding: {reply}")
        verb = self._awaiting.popleft()
        if reply.code // 100 not in _ALLOWED_CLASSES[verb]:
            raise ProtocolError(f"unexpected reply to {verb.value}: {reply}")
        if verb is _DOT:
            return reply  # the transaction ended on our side with the content
        if verb is _RCPT:
            self.accepted += reply.ok
        elif verb is _MAIL:
            self._in_mail = self._in_mail and reply.ok
        elif verb is _DATA:
            self._data_ok = reply.code == 354
            if self._data_ok and self.lmtp and self.accepted == 0:
                raise ProtocolError("354 to DATA with no accepted recipient (RFC 2033 4.2)")
        elif verb is Verb.GREETING:
            self.greeted = reply.ok
        elif verb in (Verb.EHLO, Verb.HELO) and reply.ok:
            self.helo_done = True
            self.esmtp = verb is Verb.EHLO
            self.extensions = parse_extensions(reply.lines) if self.esmtp else NO_EXTENSIONS
        elif verb is Verb.STARTTLS and reply.code == 220:
            if self._buffer:
                # Plaintext sent after the 220 would be read as if it came over TLS.
                raise ProtocolError("data after the 220 reply to STARTTLS (response injection)")
            self._tls_pending = True
        elif verb is Verb.RSET and reply.ok:
            self._end_transaction()
        return reply

    # --- commands --------------------------------------------------------------------

    def ehlo(self) -> bytes:
        self._check_ready(helo=False)
        return self._command(Verb.EHLO, f"{'LHLO' if self.lmtp else 'EHLO'} {self.helo_name}")

    def helo(self) -> bytes:
        if self.lmtp:
            raise LocalProtocolError("LMTP has no HELO (RFC 2033 4.1)")
        self._check_ready(helo=False)
        return self._command(Verb.HELO, f"HELO {self.helo_name}")

    def starttls(self) -> bytes:
        self._check_ready(helo=True)
        if self.tls or "STARTTLS" not in self.extensions:
            raise LocalProtocolError("STARTTLS not offered, or TLS already active")
        return self._command(Verb.STARTTLS, "STARTTLS")

    def tls_established(self) -> None:
        """The handshake after the 220 to STARTTLS succeeded: forget what we knew; EHLO again."""
        if not self._tls_pending:
            raise LocalProtocolError("tls_established() without a 220 to STARTTLS")
        self._tls_pending = False
        self.tls = True
        self.helo_done = self.esmtp = False
        self.extensions = NO_EXTENSIONS

    def mail_from(self, sender: str, size: int | None = None, body_type: str | None = None,
                  smtputf8: bool = False, ret: str | None = None, envid: str | None = None) -> bytes:
        """MAIL FROM with the parameters the server advertised (SMTPUTF8 must be)."""
        self._check_ready(helo=True)
        if self._in_mail:
            raise LocalProtocolError("MAIL inside a transaction")
        ext = self.extensions.keywords  # the dict itself: Extensions.__contains__ is a Python call
        if _DOT in self._awaiting and "PIPELINING" not in ext:
            raise LocalProtocolError("MAIL before the reply to the final dot, without PIPELINING")
        self._check_address(sender, smtputf8)
        params: list[str] = []
        if size is not None and "SIZE" in ext:
            params.append(f"SIZE={size}")
        if body_type is not None and "8BITMIME" in ext:
            params.append(f"BODY={body_type.upper()}")
        if smtputf8:
            if "SMTPUTF8" not in ext:
                raise LocalProtocolError("SMTPUTF8 transaction to a server without SMTPUTF8")
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if ret is not None:
                params.append(f"RET={ret.upper()}")
            encoded = xtext(envid) if envid else None
            if encoded:
                params.append(f"ENVID={encoded}")
        self._in_mail = True
        self._data_ok = False
        self.accepted = 0
        self._utf8 = smtputf8
        return self._command(_MAIL, " ".join([f"MAIL FROM:<{sender}>", *params]))

    def rcpt_to(self, address: str, notify: tuple[str, ...] | None = None, orcpt: str | None = None) -> bytes:
        if not self._in_mail:
            raise LocalProtocolError("RCPT without MAIL")
        if not address:
            raise LocalProtocolError("empty recipient")
        self._check_address(address, self._utf8)
        params: list[str] = []
        if "DSN" in self.extensions.keywords:
            if notify:
                params.append("NOTIFY=" + ",".join(n.upper() for n in notify))
            addr_type, semi, original = (orcpt or "").partition(";")
            encoded = xtext(original) if semi and addr_type.isascii() and addr_type else None
            if encoded:
                params.append(f"ORCPT={addr_type};{encoded}")
        return self._command(_RCPT, " ".join([f"RCPT TO:<{address}>", *params]))

    def data(self) -> bytes:
        if not self._in_mail:
            raise LocalProtocolError("DATA without MAIL")
        return self._command(_DATA, "DATA")

    def message_body(self, body: bytes, canonical: bool = False) -> bytes:
        """After the 354: the content, stuffed and terminated (b"" sends a lone dot);
        `canonical` as for stuff_body.

        The transaction ends here on our side: the next MAIL may follow (with PIPELINING)."""
        if not self._data_ok or self._awaiting:
            raise LocalProtocolError("message body before the 354 reply to DATA")
        replies = self.accepted if self.lmtp else 1
        self._awaiting.extend([_DOT] * replies)
        self._end_transaction()
        return stuff_body(body, canonical)

    def rset(self) -> bytes:
        self._check_ready(helo=False)
        return self._command(Verb.RSET, "RSET")

    def noop(self) -> bytes:
        self._check_ready(helo=False)
        return self._command(Verb.NOOP, "NOOP")

    def quit(self) -> bytes:
        if self._tls_pending:
            raise LocalProtocolError("QUIT between STARTTLS and the handshake")
        return self._command(Verb.QUIT, "QUIT")

    # --- helpers ---------------------------------------------------------------------

    def _command(self, verb: Verb, line: str) -> bytes:
        self._awaiting.append(verb)
        return line.encode("utf-8") + b"\r\n"

    def _check_ready(self, helo: bool) -> None:
        if not self.greeted:
            raise LocalProtocolError("command before a 2xx greeting")
        if self._tls_pending or _STARTTLS in self._awaiting:
            raise LocalProtocolError("command between STARTTLS and the handshake")
        if helo and not self.helo_done:
            raise LocalProtocolError("command before EHLO/HELO was accepted")

    def _check_address(self, address: str, utf8: bool) -> None:
        if _SUSPECT.search(address) is None and (utf8 or address.isascii()):
            return  # the common case, as in bad_address: one search, no call
        why = bad_address(address)
        if why is not None:
            raise LocalProtocolError(why)
        if not utf8 and not address.isascii():
            raise LocalProtocolError("non-ASCII address in a transaction without SMTPUTF8")

    def _end_transaction(self) -> None:
        self._in_mail = self._data_ok = False
        self.accepted = 0
