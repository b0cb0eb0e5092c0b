"""A message as sendmail's callers hand it over, made fit to send (cron, PHP mail(), scripts).

    read_input(stream, ignore_dots, limit)   stdin up to EOF, or up to a line "." alone
                                             (sendmail's default; -i/-oi: dots are data)
    complete(raw, ...)   -> Completed        CRLF line ends; a leading mbox "From " line
                                             dropped; with -t the To/Cc/Bcc recipients
                                             (Resent-To/Cc/Bcc instead when there are any);
                                             Bcc and Resent-Bcc fields removed; Date,
                                             Message-ID and From added when missing

The header section ends at the first empty line, or at the first line that is neither a
field nor a field's continuation: then an empty line is put there, so what follows stays
the body (as Postfix's cleanup does). Fields we add go after the caller's.

Pure but for the clock and randomness the caller passes in; standard library only.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from mta.smtp.content import crlf_line_ends

_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # a field name: printable ASCII but ":" (RFC 5322 3.6.8)
_RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")
_RESENT_FIELDS = (b"resent-to", b"resent-cc", b"resent-bcc")


class TooBig(ValueError):
    """More input than the limit allows."""


@dataclass(frozen=True, slots=True)
class Completed:
    message: bytes  # CRLF line ends, ready for the maildrop
    recipients: tuple[str, ...]  # from the header fields (with extract), as written there
    added: tuple[str, ...]  # the names of the fields we added


def read_input(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """The message on `stream`; TooBig past `limit` bytes."""
    if ignore_dots:
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise TooBig(f"over {limit} bytes")
        return data
    lines, size = [], 0
    for line in iter(stream.readline, b""):
        if line.rstrip(b"\r\n") == b".":
            break
        size += len(line)
        if size > limit:
            raise TooBig(f"over {limit} bytes")
        lines.append(line)
    return b"".join(lines)


def complete(raw: bytes, *, sender: str, full_name: str | None, hostname: str, now: float, unique: str,
             extract: bool) -> Completed:
    """`raw` as it will be dropped: see the module's header. `unique`: random text for a Message-ID."""
    data = crlf_line_ends(raw)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"From "):  # an mbox separator line, never a field
        data = data[data.index(b"\r\n") + 2:]
    fields, body = _split(data)
    names = {_name(field) for field in fields}
    recipients = _recipients(fields) if extract else ()
    fields = [f for f in fields if _name(f) not in (b"bcc", b"resent-bcc")]
    added: list[bytes] = []
    if b"date" not in names:
        added.append(b"Date: " + email.utils.formatdate(now, localtime=True).encode() + b"\r\n")
    if b"message-id" not in names:
        added.append(f"Message-ID: <{int(now * 1000)}.{unique}@{hostname}>\r\n".encode())
    if b"from" not in names:
        address = sender or f"MAILER-DAEMON@{hostname}"
        added.append(b"From: " + email.utils.formataddr((full_name or "", address)).encode() + b"\r\n")
    return Completed(b"".join(fields) + b"".join(added) + b"\r\n" + body, recipients,
                     tuple(f[:f.index(b":")].decode() for f in added))


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """(the header fields, each with its continuation lines and CRLFs; the body)."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n", pos) + 2
        line = data[pos:end]
        if line == b"\r\n":
            return fields, data[end:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:  # not a field: the body starts here, after the empty line we put in
            return fields, data[pos:]
        pos = end
    return fields, b""


def _name(field: bytes) -> bytes:
    return field[:field.index(b":")].rstrip(b" \t").lower()


def _recipients(fields: Sequence[bytes]) -> tuple[str, ...]:
    """The addresses of To/Cc/Bcc, or of Resent-To/Cc/Bcc when the message has any."""
    resent = [f for f in fields if _name(f) in _RESENT_FIELDS]
    chosen = resent or [f for f in fields if _name(f) in _RECIPIENT_FIELDS]
    values = [f[f.index(b":") + 1:].decode("utf-8", "replace").replace("\r\n", "") for f in chosen]
    return tuple(address for _name_, address in email.utils.getaddresses(values) if address)
