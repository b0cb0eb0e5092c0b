"""Batch SMTP (RFC 2442): queued messages as the client side of an SMTP session, and back.

Writing (`header`, `message`, `trailer`): what an SMTP client that takes every reply as
a success sends, which is how RFC 2442 defines the content: EHLO; per message MAIL FROM
(SIZE, BODY, SMTPUTF8, RET, ENVID), one RCPT TO (NOTIFY, ORCPT) per recipient still
queued (ready, deferred or held), DATA and the content dot-stuffed; QUIT at the end. CRLF
line ends. MAIL and RCPT come from the outbound client (mta/smtp/client.py) told that
every extension is there, so they are the lines a next hop would get. Content that is
not CRLF text (a bare CR or LF, no final CRLF: BDAT may store that) goes as BDAT n LAST
with its exact bytes instead, which DATA could not carry.

Our envelope holds more than BSMTP's commands: the id, arrival, next attempt, priority,
attempts, each recipient's state, attempts and last reply (delivered ones too), the
client. It rides before each MAIL as NOOP lines, `NOOP XMTA-ENVELOPE i/n <base64>`, the
pieces of records.encode(envelope). NOOP takes any argument and changes nothing (RFC 5321
4.1.1.9): any BSMTP reader takes the file and delivers what the commands say. Ours
(`read`) gives the envelope back exactly, after checking that the MAIL and RCPT lines are
those that envelope gives and the content its size: a message edited in the file is
refused (with the line and why), never imported half-edited; delete its NOOP lines to
import it as plain BSMTP.

Reading: a stream of commands, LF or CRLF line ends, verbs in any case. EHLO/HELO, NOOP,
RSET, QUIT, VRFY, EXPN, HELP are taken (QUIT ends the batch); MAIL, RCPT, then DATA or
BDAT make a message. A command the server would refuse spoils its transaction: its
content is still read (the writer assumed success and sent it) and the message comes out
as a BatchError naming the first refusal. Memory: one message at a time.

Pure: no I/O beyond the stream it is handed, no clock reads.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from mta.smtp import client as smtpclient
from mta.smtp.commands import Bdat, Data, Ehlo, Helo, MailFrom, Quit, RcptTo, Rset, parse_command
from mta.smtp.replies import Reply
from mtaqueue import records
from mtaqueue.ids import is_id
from mtaqueue.records import CorruptRecord, Envelope

ENVELOPE_WORD: Final = "XMTA-ENVELOPE"
PIECE_CHARS: Final = 400  # base64 per NOOP line: the line stays under RFC 5321's 512 octets
MAX_COMMAND_BYTES: Final = 4096  # a longer line where a command belongs: this is not a BSMTP file
READ_BYTES: Final = 65536  # content is read in lines of at most this much
QUEUED: Final = frozenset({"ready", "active", "deferred", "held"})
_EHLO_REPLY: Final = b"250-bsmtp\r\n250-SIZE\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 PIPELINING\r\n"


class NotBatch(Exception):
    """The stream is not batch SMTP (or ends inside a message); nothing after it is read."""


@dataclass
class BatchMessage:
    """One message as read: its commands, content, and our envelope record if it had one."""

    line: int  # the line of its MAIL
    mail: MailFrom
    rcpts: list[RcptTo]
    commands: list[str]  # the MAIL and RCPT lines as read, without line ends
    body: bytes
    record: Envelope | None  # from the NOOP XMTA-ENVELOPE lines before the MAIL
    helo: str | None  # the last EHLO/HELO name before it


@dataclass
class BatchError:
    """A message refused (or a stray command): the line of its MAIL (or the command), why."""

    line: int
    error: str


# --- writing --------------------------------------------------------------------------------

def header(hostname: str) -> bytes:
    return f"EHLO {hostname}\r\n".encode()


def trailer() -> bytes:
    return b"QUIT\r\n"


def message(envelope: Envelope, body: bytes) -> list[bytes]:
    """One message's part of the batch (pieces to write in order); [] when no recipient is
    queued (a finished message). ValueError when an address cannot go into MAIL or RCPT."""
    lines = commands(envelope)
    if not lines:
        return []
    record = base64.b64encode(records.encode(envelope)).decode("ascii")
    pieces = [record[i:i + PIECE_CHARS] for i in range(0, len(record), PIECE_CHARS)]
    noops = "".join(f"NOOP {ENVELOPE_WORD} {n}/{len(pieces)} {p}\r\n" for n, p in enumerate(pieces, 1))
    out = [noops.encode("ascii"), b"".join(line.encode("utf-8") + b"\r\n" for line in lines)]
    if smtpclient.canonical_body(body) == body:
        out += [b"DATA\r\n", smtpclient.stuff_body(body, canonical=True)]
    else:
        out += [f"BDAT {len(body)} LAST\r\n".encode("ascii"), body]
    return out


def commands(envelope: Envelope) -> list[str]:
    """The MAIL and RCPT lines of `envelope` (without line ends): the outbound client's, told
    every extension is offered; [] when it has no queued recipient."""
    queued = [r for r in envelope.recipients if r.state in QUEUED]
    if not queued:
        return []
    conn = smtpclient.ClientConnection("bsmtp")
    conn.receive_data(b"220 bsmtp\r\n")
    conn.next_event()
    conn.ehlo()
    conn.receive_data(_EHLO_REPLY)
    conn.next_event()
    try:
        wire = [conn.mail_from(envelope.sender, envelope.size, envelope.body_type, envelope.smtputf8,
                               envelope.ret, envelope.envid)]
        wire += [conn.rcpt_to(r.address, r.notify, r.orcpt) for r in queued]
    except smtpclient.LocalProtocolError as exc:
        raise ValueError(str(exc)) from None
    return [w.decode("utf-8").removesuffix("\r\n") for w in wire]


# --- reading --------------------------------------------------------------------------------

@dataclass
class _Transaction:
    line: int
    mail: MailFrom | None = None
    rcpts: list[RcptTo] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    error: str | None = None  # the first refusal: the message is not taken

    def refuse(self, line: int, why: str) -> None:
        if self.error is None:
            self.error = f"line {line}: {why}"


def read(stream: BinaryIO, max_message_bytes: int) -> Iterator[BatchMessage | BatchError]:
    """The messages of a batch, one by one; NotBatch (after those before it) when the
    stream is not batch SMTP or ends inside a message."""
    number = 0
    helo: str | None = None
    pieces: list[str] = []  # the XMTA-ENVELOPE pieces read so far for the next MAIL
    record: Envelope | str | None = None  # decoded (or why not) when the last piece came
    txn: _Transaction | None = None
    while True:
        raw = stream.readline(MAX_COMMAND_BYTES + 2)
        if not raw:
            if txn is not None:
                raise NotBatch(f"the file ends in the transaction of line {txn.line}, before its DATA")
            return
        number += 1
        if not raw.endswith(b"\n") and len(raw) > MAX_COMMAND_BYTES:
            raise NotBatch(f"line {number} is longer than {MAX_COMMAND_BYTES} octets where a command belongs: "
                           "not a batch SMTP file")
        try:
            line = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if txn is None:
                txn = _Transaction(number)
            txn.refuse(number, "a command that is not UTF-8")
            continue
        if not line.strip():
            continue  # a blank line between commands (hand-written files)
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "NOOP":
            pieces, record = _envelope_piece(arg, pieces, record)
            continue
        if verb in ("VRFY", "EXPN", "HELP"):
            continue
        utf8 = txn is not None and txn.mail is not None and txn.mail.smtputf8
        command = parse_command(line, utf8=utf8)
        if isinstance(command, Reply):
            if txn is None:
                txn = _Transaction(number)
            txn.refuse(number, f"{line[:60]!r}: {command.code} {command.text}")
            continue
        match command:
            case Ehlo(name=name) | Helo(name=name):
                helo = name
            case Quit():
                return
            case Rset():
                txn, pieces, record = None, [], None
            case MailFrom():
                if txn is not None:
                    yield BatchError(txn.line, txn.error or f"line {txn.line}: MAIL with no DATA after it")
                txn = _Transaction(number, command, commands=[line])
            case RcptTo():
                if txn is None:
                    txn = _Transaction(number)
                if txn.mail is None:
                    txn.refuse(number, "RCPT before MAIL")
                txn.rcpts.append(command)
                txn.commands.append(line)
            case Data() | Bdat():
                body, too_big, lines = _content(stream, command, max_message_bytes)
                number += lines
                current, txn = txn or _Transaction(number), None
                found, pieces, record = record, [], None
                if too_big:
                    current.refuse(current.line, f"the content is bigger than {max_message_bytes} octets")
                yield _message(current, body, found, helo)
            case _:
                if txn is None:
                    txn = _Transaction(number)
                txn.refuse(number, f"{verb} has no place in batch SMTP")


def _envelope_piece(arg: str, pieces: list[str], record: Envelope | str | None) -> tuple[list[str], Envelope | str | None]:
    """One NOOP: a piece of our envelope record (the record once whole), or any other NOOP."""
    word, _, rest = arg.partition(" ")
    if word.upper() != ENVELOPE_WORD:
        return pieces, record
    place, _, data = rest.partition(" ")
    n, _, total = place.partition("/")
    if not (n.isdigit() and total.isdigit() and int(n) == len(pieces) + 1 <= int(total)):
        return [], f"{ENVELOPE_WORD} piece {place} out of order"
    pieces = [*pieces, data]
    if int(n) < int(total):
        return pieces, None
    try:
        return [], records.decode(base64.b64decode("".join(pieces), validate=True))
    except (binascii.Error, ValueError, CorruptRecord) as exc:
        return [], f"the {ENVELOPE_WORD} record does not decode: {exc}"


def _content(stream: BinaryIO, command: Data | Bdat, limit: int) -> tuple[bytes, bool, int]:
    """The content after DATA (unstuffed, line ends made CRLF) or BDAT n LAST (exact), whether
    it is bigger than `limit` (then b"": it is read to its end all the same), and the lines
    it took in the file (BDAT: 0, its bytes may end mid-line)."""
    if isinstance(command, Bdat):
        if not command.last:
            raise NotBatch("BDAT without LAST: only one chunk per message is read")
        body = stream.read(command.size)
        if len(body) < command.size:
            raise NotBatch(f"the file ends inside a BDAT chunk of {command.size} octets")
        return (b"", True, 0) if len(body) > limit else (body, False, 0)
    out = bytearray()
    size, start, lines = 0, True, 0
    while True:
        piece = stream.readline(READ_BYTES)
        if not piece:
            raise NotBatch("the file ends inside a message's DATA (no line with a lone dot)")
        whole = piece.endswith(b"\n")
        lines += whole
        if start and piece.rstrip(b"\r\n") == b"." and whole:
            return (b"", True, lines) if size > limit else (bytes(out), False, lines)
        if start and piece.startswith(b"."):
            piece = piece[1:]
        if whole and not piece.endswith(b"\r\n"):
            piece = piece[:-1] + b"\r\n"
        size += len(piece)
        if size <= limit:
            out += piece
        start = whole


def _message(txn: _Transaction, body: bytes, record: Envelope | str | None,
             helo: str | None) -> BatchMessage | BatchError:
    if txn.error is None and (txn.mail is None or not txn.rcpts):
        txn.refuse(txn.line, "DATA without MAIL and RCPT")
    if txn.error is not None or txn.mail is None:
        return BatchError(txn.line, txn.error or "")
    if isinstance(record, str):
        return BatchError(txn.line, f"line {txn.line}: {record}")
    if record is not None:
        why = _disagrees(record, txn.commands, body)
        if why is not None:
            return BatchError(txn.line, f"line {txn.line}: message {record.id}: {why} (was the file edited? "
                                        f"delete its NOOP {ENVELOPE_WORD} lines to import it as plain BSMTP)")
    return BatchMessage(txn.line, txn.mail, txn.rcpts, txn.commands, body, record, helo)


def _disagrees(record: Envelope, lines: list[str], body: bytes) -> str | None:
    """Why the record is not this message's envelope; None when it is."""
    if not is_id(record.id):
        return f"its id {record.id!r} is not a queue id"
    try:
        expected = commands(record)
    except ValueError as exc:
        return f"its envelope cannot be written as commands: {exc}"
    if expected != lines:
        return "its MAIL and RCPT lines are not those of its envelope record"
    if len(body) != record.size:
        return f"its content is {len(body)} octets, its envelope record says {record.size}"
    return None
