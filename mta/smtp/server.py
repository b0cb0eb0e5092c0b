"""The sans-I/O SMTP server connection: bytes in, events out, replies as bytes.

    conn.receive_data(data)            # frames lines, DATA content and BDAT chunks
    ev = conn.next_event()             # MailFrom | RcptTo | Message | Credentials | Vrfy | Expn
                                       # | StartTls | NEED_DATA | PAUSED | CLOSED
    conn.reply(policy_reply)           # answers the pending event (StartTls: conn.tls_started())
    out = conn.data_to_send()          # replies, in command order (pipelining-safe)

The core answers everything it can decide alone (HELO/EHLO, sequence and syntax
errors, limits, RSET/NOOP/HELP/QUIT, VRFY/EXPN unless enabled, the SASL exchange)
and hands the application only the decisions that need policy, storage, a password
check or a TLS handshake. While a decision is pending no further input is processed,
so pipelined replies stay in order.

STARTTLS (RFC 3207): after our 220 every byte already received is discarded, so a
command pipelined behind STARTTLS in plaintext is never executed (CVE-2011-0411,
CVE-2024-34083); after the handshake the session starts over (EHLO needed, no
STARTTLS offered, nothing learned before TLS kept). AUTH PLAIN/LOGIN (RFC 4954) is
offered only under TLS unless auth_plaintext; the decoded credentials go to the
application as one Credentials event, and appear nowhere else.

Framing rules (SMTP smuggling, CVE-2023-51764 family): DATA ends only at CRLF.CRLF
(framing.py); a bare CR or LF anywhere in the content, DATA or BDAT, is rejected
(550 5.5.2) after the real end of data (BDAT: at LAST), or normalised to CRLF when
configured. Commands sent after DATA before our 354 are a synchronisation error.
Command lines over 512 octets (AUTH and SASL responses: 12288) are discarded unexecuted.

The state changes only as states.py says (its rules at the top); DATA and BDAT
framing is framing.py's, the SASL exchange sasl.py's, the content checks content.py's.

Pure: no asyncio, socket or time imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mta.smtp import replies, sasl, states
from mta.smtp.commands import (
    Auth, Bdat, Command, Data, Ehlo, Expn, Help, Helo, MailFrom, Noop, Quit, RcptTo, Rset, StartTls, Vrfy,
    parse_command,
)
from mta.smtp.content import crlf_line_ends, has_bare_newline, too_many_received
from mta.smtp.framing import ChunkReader, DataReader
from mta.smtp.options import ServerOptions
from mta.smtp.quickinit import quick_init
from mta.smtp.replies import Reply
from mta.smtp.sasl import Credentials, SaslExchange
from mta.smtp.states import State, Step

__all__ = ["CLOSED", "NEED_DATA", "PAUSED", "Credentials", "Event", "Message", "ServerConnection", "ServerOptions"]

MAX_COMMAND_LINE: Final = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
MAX_AUTH_LINE: Final = 12288  # AUTH command and SASL responses (RFC 4954 section 4)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# The states tested per command, read from module constants: an Enum member read through its
# class costs ~80 ns on CPython 3.11 (EnumType's __getattr__ puts every class attribute read on
# the slow path), a module constant ~10.
_CLOSED: Final = State.CLOSED
_DATA: Final = State.DATA
_TRANSFERRING: Final = (State.DATA, State.BDAT)

NEED_DATA: Final = _Marker("NEED_DATA")  # feed more bytes
PAUSED: Final = _Marker("PAUSED")  # a decision is pending: call reply() first
CLOSED: Final = _Marker("CLOSED")  # flush data_to_send() and close the connection


@quick_init
@dataclass(frozen=True, slots=True)
class Message:
    """A complete message awaiting the application's verdict (usually a queue commit)."""

    sender: MailFrom
    recipients: tuple[RcptTo, ...]
    data: bytes  # unstuffed content, CRLF line ends


Event = MailFrom | RcptTo | Message | Credentials | Vrfy | Expn | StartTls | _Marker


class ServerConnection:
    def __init__(self, options: ServerOptions, *, tls: bool = False) -> None:
        self.options = options
        self.state = State.CONNECTED
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls_active = tls  # implicit TLS: the handshake came before the greeting
        self.authenticated: str | None = None
        self.errors = 0
        self.junk = 0
        self.auth_refusals: list[str] = []  # "no_tls" / "malformed" AUTH attempts, for the app's metrics
        self.quit = False  # the client said QUIT (we answered 221): it closes when it has read it
        self._sasl: SaslExchange | None = None
        self._out: list[bytes] = []
        self._buffer = bytearray()
        # The event awaiting reply() (or tls_started()); read-only for the application. An
        # attribute, not a property: the worker reads it several times per input.
        self.pending: Command | Message | None = None
        self._discarding = False  # inside an over-long command line
        self._data = DataReader()  # DATA: the end of data and the stuffed lines
        self._refusal: Reply | None = None  # DATA/BDAT: content is being dropped; the reply at its end
        self._bdat = ChunkReader()  # BDAT: the chunk being read, the chunks kept
        self._reset_transaction()

    # --- the application's side --------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def has_output(self) -> bool:
        """Replies wait for data_to_send()."""
        return bool(self._out)

    @property
    def held_bytes(self) -> int:
        """Octets held for this connection: unprocessed input, BDAT chunks, a Message awaiting its verdict."""
        waiting = len(self.pending.data) if isinstance(self.pending, Message) else 0
        return len(self._buffer) + self._bdat.size + waiting

    @property
    def in_transfer(self) -> bool:
        """Reading message content: from our 354 or the first BDAT to the end of the data."""
        return self.pending is None and (self.state in _TRANSFERRING or self._bdat.left is not None)

    def refuse_content(self, reply: Reply) -> bool:
        """The application cannot hold this transfer (e.g. worker memory): read the rest of it,
        keep none of it, answer `reply` at its end (BDAT: the chunk's end). False: no transfer
        to refuse, or it is already being dropped."""
        if not self.in_transfer or self._refusal is not None or self._bdat.verdict is not None:
            return False
        self._refusal = reply
        self._bdat.clear()
        if self.state is State.DATA:  # no end of data in the buffer: keep a possible partial one
            self._data.drop(self._buffer)
        return True

    def greet(self) -> None:
        assert self.state is State.CONNECTED, self.state
        self._send(replies.greeting(self.options.hostname))
        self.state = states.after(self.state, Step.GREETING)

    def refuse(self, reply: Reply) -> None:
        """Reject the connection outright (e.g. 421 4.7.0 too many connections)."""
        self._send(reply)
        self.state = states.after(self.state, Step.CLOSE)

    def close_with(self, reply: Reply) -> None:
        """Timeouts and shutdown: send a 421 now and close."""
        if self.state is not State.CLOSED:
            self._send(reply)
            self.state = states.after(self.state, Step.CLOSE)

    def receive_data(self, data: bytes) -> None:
        if self.state is not _CLOSED:
            self._buffer += data

    def receive_eof(self) -> None:
        self.state = states.after(self.state, Step.CLOSE)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event:
        while True:
            if self.state is _CLOSED:
                return CLOSED
            if self.pending is not None:
                return PAUSED
            if self.state is _DATA:
                event = self._step_data()
            elif self._bdat.left is not None:
                event = self._step_bdat()
            else:
                event = self._step_command()
            if event is not None:
                return event

    @property
    def auth_offered(self) -> bool:
        return bool(self.options.auth_mechanisms) and (self.tls_active or self.options.auth_plaintext)

    def reply(self, reply: Reply, accepted: RcptTo | None = None) -> None:
        """Answer the pending MailFrom, RcptTo, Message, Credentials, Vrfy or Expn; `accepted`:
        a RcptTo as the transaction keeps it, when policy rewrote it (the bare <postmaster>)."""
        pending = self.pending
        kind = type(pending)  # one of the event classes, compared by identity: no subclasses
        if pending is None or kind is StartTls:
            raise RuntimeError(f"reply() with pending {pending!r}")  # our bug, not the peer's
        self.pending = None
        if self.state is _CLOSED:  # closed (timeout, shutdown) while the app decided
            return
        if reply.code == 421:  # e.g. a lockout: a 421 always ends the session
            self._send(reply)
            self.state = states.after(self.state, Step.CLOSE)
        elif kind is RcptTo:
            if reply.positive:
                self._rcpts.append(accepted or pending)
            self._answer(pending, reply)
        elif kind is MailFrom:
            if reply.positive:
                self._mail = pending
            self._answer(pending, reply)
        elif kind is Message:
            self._end_message(reply)
        elif kind is Credentials:
            if reply.positive:
                self.authenticated = pending.username
            self._send(reply)
        else:  # Vrfy, Expn: no state change
            self._send(reply)

    def tls_started(self) -> None:
        """The handshake after our 220 to STARTTLS succeeded: start the session over."""
        if not isinstance(self.pending, StartTls):
            raise RuntimeError(f"tls_started() with pending {self.pending!r}")
        self.pending = None
        # The buffer was cleared when STARTTLS was answered and reading stayed paused until
        # the handshake: what is buffered now came encrypted (a client's EHLO may already be here).
        self.tls_active = True
        self.helo_name = None
        self.esmtp = False
        self.authenticated = None
        self._reset_transaction()
        self.state = states.after(self.state, Step.TLS_STARTED)

    # --- framing -----------------------------------------------------------------

    def _step_command(self) -> Event | None:
        buf = self._buffer
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_COMMAND_LINE and len(buf) > self._line_limit(buf):
                self._discarding = True
                buf.clear()
            return NEED_DATA
        raw = buf[: end - 1 if end and buf[end - 1] == 13 else end]  # without its CRLF (or LF); decoded, never kept
        del buf[: end + 1]
        if self._discarding:
            self._discarding = False
            self._sasl = None  # an over-long SASL response ends the exchange
            self._send(replies.LINE_TOO_LONG)
            return None
        if len(raw) + 2 > MAX_COMMAND_LINE and len(raw) + 2 > self._line_limit(raw):
            self._sasl = None
            self._send(replies.LINE_TOO_LONG)
            return None
        if 13 in raw or 0 in raw:  # CR, NUL: an int is a memchr, b"\r" in raw a failed int conversion first
            self._send(replies.BAD_CHARACTERS)
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._send(replies.BAD_CHARACTERS)
            return None
        if self._sasl is not None:
            return self._sasl_step(self._sasl.respond(line))
        utf8 = self._mail is not None and self._mail.smtputf8
        command = parse_command(line, utf8)
        if isinstance(command, Reply):
            self._send(command)
            return None
        return self._dispatch(command)

    def _line_limit(self, line: bytes | bytearray) -> int:
        """The longest command line allowed for `line` (it starts where the command does)."""
        return MAX_AUTH_LINE if self._sasl is not None or line[:5].upper() == b"AUTH " else MAX_COMMAND_LINE

    def _step_data(self) -> Event | None:
        buf = self._buffer
        end = self._data.find_end(buf)
        if end < 0:
            slack = self.options.max_message_bytes // 32 + 1024  # dot-stuffing overhead
            if self._refusal is not None or len(buf) > self.options.max_message_bytes + slack:
                self._refusal = self._refusal or replies.SIZE_EXCEEDED
                self._data.drop(buf)
            return NEED_DATA
        data = self._data.take(buf, end)
        if self._refusal is not None:
            return self._end_message(self._refusal)
        return self._complete(data)  # unstuffed first: a dot after a bare LF was never at a line start

    def _step_bdat(self) -> Event | None:
        chunk = self._bdat
        if self._refusal is not None and chunk.verdict is None:  # refuse_content(): this chunk gets it
            self._refuse_chunk(self._refusal)
        if chunk.left:
            if not self._buffer:
                return NEED_DATA
            arriving = min(chunk.left, len(self._buffer))
            if chunk.verdict is None and chunk.size + arriving > self.options.max_message_bytes:
                self._refuse_chunk(replies.SIZE_EXCEEDED)
            if chunk.read(self._buffer):
                return NEED_DATA
        verdict = chunk.end()
        if verdict is not None:
            self._send(verdict)
            return None
        if chunk.last:
            return self._complete(chunk.content())
        self._answer(Bdat(chunk.size, False), replies.chunk_ok(chunk.size))
        return None

    def _refuse_chunk(self, reply: Reply) -> None:
        """Drop the transaction now; `reply` answers the chunk once it is read."""
        self._bdat.verdict = reply
        self._reset_transaction()
        self.state = states.after(self.state, Step.CHUNK_REFUSED)

    # --- commands ----------------------------------------------------------------

    def _dispatch(self, command: Command) -> Event | None:
        kind = type(command)  # parse_command's classes, compared by identity: no subclasses
        if kind is Bdat:
            return self._start_bdat(command)  # type: ignore[arg-type]
        if kind is Auth:
            return self._start_auth(command)  # type: ignore[arg-type]
        if kind is StartTls and self.tls_active:
            self._send(replies.TLS_ACTIVE)
            return None
        error = states.sequence_error(self.state, command)
        if error is not None:
            self._send(error)
            return None
        return _ON_COMMAND[kind](self, command)

    def _hello(self, command: Helo | Ehlo) -> None:
        self._reset_transaction()
        self.helo_name = command.name
        self.esmtp = type(command) is Ehlo
        self._answer(command, self._ehlo_reply() if self.esmtp else Reply(250, "", self.options.hostname))

    def _start_tls(self, command: StartTls) -> Event | None:
        if not self.options.starttls:
            self._send(replies.TLS_NOT_AVAILABLE)
            return None
        self._buffer.clear()  # pipelined behind STARTTLS in plaintext: never executed
        self._send(replies.START_TLS)
        self.pending = command
        return command

    def _mail_from(self, command: MailFrom) -> Event | None:
        if self.options.auth_required and self.authenticated is None:
            self._send(replies.AUTH_REQUIRED)
            return None
        if command.size is not None and command.size > self.options.max_message_bytes:
            self._send(replies.SIZE_EXCEEDED)
            return None
        self.pending = command
        return command

    def _rcpt_to(self, command: RcptTo) -> Event | None:
        if len(self._rcpts) >= self.options.max_recipients:
            self._send(replies.TOO_MANY_RECIPIENTS)
            return None
        self.pending = command
        return command

    def _start_data(self, command: Data) -> None:
        if self._buffer:
            self._send(replies.SYNC_ERROR)
            self.state = states.after(self.state, Step.CLOSE)
            return
        self._answer(command, replies.START_DATA)
        self._buffer += b"\r\n"  # the CRLF that ended DATA starts the first line
        self._data.reset()

    def _quit(self, command: Quit) -> None:
        self.quit = True
        self._answer(command, replies.closing(self.options.hostname))

    def _junk_command(self, command: Rset | Noop | Help | Vrfy | Expn) -> Event | None:
        self.junk += 1
        if self.junk > self.options.max_junk_commands:
            self._send(replies.too_many_junk_commands(self.options.hostname))
            self.state = states.after(self.state, Step.CLOSE)
            return None
        if isinstance(command, Rset):
            self._reset_transaction()
            self._answer(command, replies.OK)
        elif isinstance(command, Noop):
            self._send(replies.OK)
        elif isinstance(command, Help):
            self._send(replies.HELP)
        elif isinstance(command, Vrfy) and not self.options.vrfy:
            self._send(replies.VRFY_CANNOT)
        elif isinstance(command, Expn) and not self.options.expn:
            self._send(replies.EXPN_DISABLED)
        else:  # VRFY/EXPN enabled: the application looks the address up
            self.pending = command
            return command
        return None

    def _start_auth(self, command: Auth) -> Event | None:
        error = sasl.check_start(command, mechanisms=self.options.auth_mechanisms, state=self.state,
                                 esmtp=self.esmtp, authenticated=self.authenticated is not None,
                                 offered=self.auth_offered)
        if error is not None:
            if error is replies.AUTH_NEEDS_TLS:
                self.auth_refusals.append("no_tls")
            self._send(error)
            return None
        self._sasl = SaslExchange(command.mechanism)
        return self._sasl_step(self._sasl.start(command.initial))

    def _sasl_step(self, result: Reply | Credentials) -> Event | None:
        """A challenge to send, the reply that ends the exchange, or the Credentials to check."""
        assert self._sasl is not None
        if self._sasl.done:
            self._sasl = None
        if isinstance(result, Credentials):
            self.pending = result
            return result
        if result is replies.AUTH_MALFORMED:
            self.auth_refusals.append("malformed")
        self._send(result)
        return None

    def _start_bdat(self, command: Bdat) -> Event | None:
        # The chunk's octets follow the command whatever we answer: read them all
        # (RFC 3030 section 2), keeping them only when the chunk is acceptable.
        self._bdat.begin(command.size, command.last, states.sequence_error(self.state, command))
        return None

    def _ehlo_reply(self) -> Reply:
        o = self.options
        return replies.ehlo(o.hostname, o.max_message_bytes, starttls=o.starttls and not self.tls_active,
                            auth=o.auth_mechanisms if self.auth_offered else ())

    # --- helpers -----------------------------------------------------------------

    def _complete(self, data: bytes) -> Event | None:
        """The whole content, DATA (unstuffed) or BDAT (chunks joined: a CRLF split across two is no bare CR)."""
        if has_bare_newline(data):
            if self.options.bare_newline == "reject":
                return self._end_message(replies.BARE_NEWLINE)
            data = crlf_line_ends(data)
        if len(data) > self.options.max_message_bytes:
            return self._end_message(replies.SIZE_EXCEEDED)
        if too_many_received(data, self.options.max_received_headers):
            return self._end_message(replies.TOO_MANY_HOPS)
        assert self._mail is not None and self._rcpts, "message without an envelope"
        message = Message(self._mail, tuple(self._rcpts), data)
        self.pending = message
        return message

    def _end_message(self, reply: Reply) -> None:
        """The reply to the content ends the transaction, whatever its code."""
        self._reset_transaction()
        self.state = states.after(self.state, Step.MESSAGE_DONE)
        self._send(reply)
        return None

    def _answer(self, command: object, reply: Reply) -> None:
        if reply.positive:
            self.state = states.after_positive(self.state, command)
        self._send(reply)

    def _reset_transaction(self) -> None:
        self._mail: MailFrom | None = None
        self._rcpts: list[RcptTo] = []
        self._bdat.clear()
        self._refusal = None

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.wire)
        # Errors count against the client; 421s and our own system trouble (4.3.x: queue
        # full or failing) do not: a client must not be cut off for our full disk.
        if reply.code >= 400 and reply.code != 421 and not reply.status.startswith("4.3."):
            self.errors += 1
            if self.errors >= self.options.max_errors:
                self._out.append(replies.too_many_errors(self.options.hostname).wire)
                self.state = states.after(self.state, Step.CLOSE)


# What _dispatch does with each command that passed its sequence check (BDAT and AUTH have their own).
_ON_COMMAND: Final = {
    Helo: ServerConnection._hello, Ehlo: ServerConnection._hello, StartTls: ServerConnection._start_tls,
    MailFrom: ServerConnection._mail_from, RcptTo: ServerConnection._rcpt_to, Data: ServerConnection._start_data,
    Quit: ServerConnection._quit, Rset: ServerConnection._junk_command, Noop: ServerConnection._junk_command,
    Help: ServerConnection._junk_command, Vrfy: ServerConnection._junk_command, Expn: ServerConnection._junk_command,
}

