"""The sans-I/O SMTP server connection: bytes in, events out, replies as bytes.

    conn.receive_data(data)            # frames lines, DATA content and BDAT chunks
    ev = conn.next_event()             # MailFrom | RcptTo | Message | NEED_DATA | PAUSED | CLOSED
    conn.reply(policy_reply)           # answers the pending MailFrom/RcptTo/Message
    out = conn.data_to_send()          # replies, in command order (pipelining-safe)

The core answers everything it can decide alone (HELO/EHLO, sequence and syntax
errors, limits, RSET/NOOP/HELP/VRFY/EXPN/QUIT) and hands the application only the
decisions that need policy or storage. While a decision is pending no further input
is processed, so pipelined replies stay in order.

Framing rules (SMTP smuggling, CVE-2023-51764 family): DATA ends only at CRLF.CRLF;
a bare CR or LF anywhere in the content is rejected (550 5.5.2) after the real end of
data, or normalised to CRLF when configured. Commands sent after DATA before our 354
are a synchronisation error. Command lines over 512 octets are discarded unexecuted.

Pure: no asyncio, socket or time imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from mta.smtp import replies, states
from mta.smtp.commands import (
    Bdat, Command, Data, Ehlo, Expn, Help, Helo, MailFrom, Noop, Quit, RcptTo, Rset, Vrfy,
    parse_command,
)
from mta.smtp.replies import Reply
from mta.smtp.states import State

MAX_COMMAND_LINE: Final = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
END_OF_DATA: Final = b"\r\n.\r\n"
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Marker("NEED_DATA")  # feed more bytes
PAUSED: Final = _Marker("PAUSED")  # a decision is pending: call reply() first
CLOSED: Final = _Marker("CLOSED")  # flush data_to_send() and close the connection


@dataclass(frozen=True, slots=True)
class ServerOptions:
    hostname: str
    max_message_bytes: int = 25 * 1024**2
    max_recipients: int = 100
    max_errors: int = 20
    max_received_headers: int = 50
    bare_newline: str = "reject"  # or "normalize"


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message awaiting the application's verdict (usually a queue commit)."""

    sender: MailFrom
    recipients: tuple[RcptTo, ...]
    data: bytes  # unstuffed content, CRLF line ends


Event = MailFrom | RcptTo | Message | _Marker


class ServerConnection:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.state = State.CONNECTED
        self.helo_name: str | None = None
        self.esmtp = False
        self.errors = 0
        self._out: list[bytes] = []
        self._buffer = bytearray()
        self._pending: Command | Message | None = None
        self._discarding = False  # inside an over-long command line
        self._scan_from = 0  # DATA: where to resume looking for CRLF.CRLF
        self._data_overflow = False  # DATA/BDAT: content beyond max_message_bytes was dropped
        self._bdat_left: int | None = None  # octets of the current BDAT chunk still to read
        self._bdat_verdict: Reply | None = None  # a chunk being read only to be discarded
        self._bdat_last = False
        self._chunks: list[bytes] = []
        self._chunks_size = 0
        self._reset_transaction()

    # --- the application's side --------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def pending(self) -> Command | Message | None:
        return self._pending

    def greet(self) -> None:
        assert self.state is State.CONNECTED, self.state
        self._send(replies.greeting(self.options.hostname))
        self.state = State.GREETED

    def refuse(self, reply: Reply) -> None:
        """Reject the connection outright (e.g. 421 4.7.0 too many connections)."""
        self._send(reply)
        self.state = State.CLOSED

    def close_with(self, reply: Reply) -> None:
        """Timeouts and shutdown: send a 421 now and close."""
        if self.state is not State.CLOSED:
            self._send(reply)
            self.state = State.CLOSED

    def receive_data(self, data: bytes) -> None:
        if self.state is not State.CLOSED:
            self._buffer += data

    def receive_eof(self) -> None:
        self.state = State.CLOSED

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event:
        while True:
            if self.state is State.CLOSED:
                return CLOSED
            if self._pending is not None:
                return PAUSED
            if self.state is State.DATA:
                event = self._step_data()
            elif self._bdat_left is not None:
                event = self._step_bdat()
            else:
                event = self._step_command()
            if event is not None:
                return event

    def reply(self, reply: Reply) -> None:
        """Answer the pending MailFrom, RcptTo or Message."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("reply() with no pending event")  # our bug, not the peer's
        self._pending = None
        if isinstance(pending, Message):
            self._reset_transaction()
            self.state = State.READY
            self._send(reply)
            return
        if reply.positive:
            if isinstance(pending, MailFrom):
                self._mail = pending
            elif isinstance(pending, RcptTo):
                self._rcpts.append(pending)
        self._answer(pending, reply)

    # --- framing -----------------------------------------------------------------

    def _step_command(self) -> Event | None:
        buf = self._buffer
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_COMMAND_LINE:
                self._discarding = True
                buf.clear()
            return NEED_DATA
        raw = bytes(buf[:end])
        del buf[: end + 1]
        if self._discarding:
            self._discarding = False
            self._send(replies.LINE_TOO_LONG)
            return None
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) + 2 > MAX_COMMAND_LINE:
            self._send(replies.LINE_TOO_LONG)
            return None
        if b"\r" in raw or b"\x00" in raw:
            self._send(replies.BAD_CHARACTERS)
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._send(replies.BAD_CHARACTERS)
            return None
        utf8 = self._mail is not None and self._mail.smtputf8
        command = parse_command(line, utf8=utf8)
        if isinstance(command, Reply):
            self._send(command)
            return None
        return self._dispatch(command)

    def _step_data(self) -> Event | None:
        buf = self._buffer
        end = buf.find(END_OF_DATA, self._scan_from)
        if end < 0:
            slack = self.options.max_message_bytes // 32 + 1024  # dot-stuffing overhead
            if len(buf) > self.options.max_message_bytes + slack:
                self._data_overflow = True
                del buf[:-4]  # keep a possible partial CRLF.CRLF
            self._scan_from = max(0, len(buf) - 4)
            return NEED_DATA
        content = bytes(buf[: end + 2])  # with the leading virtual CRLF and the last line's CRLF
        del buf[: end + 5]
        self._scan_from = 0
        return self._finish_data(content)

    def _finish_data(self, content: bytes) -> Event | None:
        if self._data_overflow:
            return self._end_message(replies.SIZE_EXCEEDED)
        data = content.replace(b"\r\n.", b"\r\n")[2:]  # unstuff, drop the virtual CRLF
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            if self.options.bare_newline == "reject":
                return self._end_message(replies.BARE_NEWLINE)
            # Unstuffed first: a dot after a bare LF was never at a line start.
            data = _ANY_NEWLINE.sub(b"\r\n", data)
        return self._complete(data)

    def _step_bdat(self) -> Event | None:
        assert self._bdat_left is not None
        buf = self._buffer
        if self._bdat_left:
            if not buf:
                return NEED_DATA
            take = min(self._bdat_left, len(buf))
            if self._bdat_verdict is None:
                if self._chunks_size + take > self.options.max_message_bytes:
                    self._bdat_verdict = replies.SIZE_EXCEEDED
                    self._reset_transaction()
                    self.state = State.READY
                else:
                    self._chunks.append(bytes(buf[:take]))
                    self._chunks_size += take
            del buf[:take]
            self._bdat_left -= take
            if self._bdat_left:
                return NEED_DATA
        self._bdat_left = None
        if self._bdat_verdict is not None:
            verdict, self._bdat_verdict = self._bdat_verdict, None
            self._send(verdict)
            return None
        if self._bdat_last:
            return self._complete(b"".join(self._chunks))
        self._answer(Bdat(self._chunks_size, False), replies.chunk_ok(self._chunks_size))
        return None

    # --- commands ----------------------------------------------------------------

    def _dispatch(self, command: Command) -> Event | None:
        if isinstance(command, Bdat):
            return self._start_bdat(command)
        error = states.sequence_error(self.state, command)
        if error is not None:
            self._send(error)
            return None
        if isinstance(command, (Helo, Ehlo)):
            self._reset_transaction()
            self.helo_name = command.name
            self.esmtp = isinstance(command, Ehlo)
            self._answer(command, self._ehlo_reply() if self.esmtp else Reply(250, "", self.options.hostname))
        elif isinstance(command, MailFrom):
            if command.size is not None and command.size > self.options.max_message_bytes:
                self._send(replies.SIZE_EXCEEDED)
                return None
            self._pending = command
            return command
        elif isinstance(command, RcptTo):
            if len(self._rcpts) >= self.options.max_recipients:
                self._send(replies.TOO_MANY_RECIPIENTS)
                return None
            self._pending = command
            return command
        elif isinstance(command, Data):
            if self._buffer:
                self._send(replies.SYNC_ERROR)
                self.state = State.CLOSED
                return None
            self._answer(command, replies.START_DATA)
            self._buffer += b"\r\n"  # the CRLF that ended DATA starts the first line
            self._scan_from = 0
        elif isinstance(command, Rset):
            self._reset_transaction()
            self.state = states.after_reset(self.state)
            self._send(replies.OK)
        elif isinstance(command, Noop):
            self._send(replies.OK)
        elif isinstance(command, Help):
            self._send(replies.HELP)
        elif isinstance(command, Vrfy):
            self._send(replies.VRFY_CANNOT)
        elif isinstance(command, Expn):
            self._send(replies.EXPN_DISABLED)
        elif isinstance(command, Quit):
            self._send(replies.closing(self.options.hostname))
            self.state = State.CLOSED
        return None

    def _start_bdat(self, command: Bdat) -> Event | None:
        # The chunk's octets follow the command whatever we answer: read them all
        # (RFC 3030 section 2), keeping them only when the chunk is acceptable.
        self._bdat_left = command.size
        self._bdat_last = command.last
        self._bdat_verdict = states.sequence_error(self.state, command)
        return None

    def _ehlo_reply(self) -> Reply:
        return Reply(250, "", (
            self.options.hostname,
            "PIPELINING",
            f"SIZE {self.options.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ))

    # --- helpers -----------------------------------------------------------------

    def _complete(self, data: bytes) -> Event | None:
        if len(data) > self.options.max_message_bytes:
            return self._end_message(replies.SIZE_EXCEEDED)
        if _count_received(data) > self.options.max_received_headers:
            return self._end_message(replies.TOO_MANY_HOPS)
        assert self._mail is not None and self._rcpts, "message without an envelope"
        message = Message(self._mail, tuple(self._rcpts), data)
        self._pending = message
        return message

    def _end_message(self, reply: Reply) -> None:
        self._reset_transaction()
        self.state = State.READY
        self._send(reply)
        return None

    def _answer(self, command: object, reply: Reply) -> None:
        if reply.positive:
            self.state = states.after_positive(self.state, command)
        self._send(reply)

    def _reset_transaction(self) -> None:
        self._mail: MailFrom | None = None
        self._rcpts: list[RcptTo] = []
        self._chunks = []
        self._chunks_size = 0
        self._data_overflow = False

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())
        # Errors count against the client; 421s and our own system trouble (4.3.x: queue
        # full or failing) do not: a client must not be cut off for our full disk.
        if reply.code >= 400 and reply.code != 421 and not reply.status.startswith("4.3."):
            self.errors += 1
            if self.errors >= self.options.max_errors:
                self._out.append(replies.too_many_errors(self.options.hostname).to_bytes())
                self.state = State.CLOSED


def _count_received(data: bytes) -> int:
    """Received header fields in the header section (up to the first empty line)."""
    end = data.find(b"\r\n\r\n")
    header = data if end < 0 else data[: end + 2]
    return len(_RECEIVED.findall(header))
