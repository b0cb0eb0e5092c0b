"""Submission hygiene: the Date and Message-ID a submitted message gets when it lacks them.

RFC 6409 8.2 and 8.3 (Postfix's always_add_missing_headers, for local clients): mail
from a submission or smtps listener, or from an authenticated client, comes from a
user agent that may leave them out. Relayed mail (port 25, not authenticated) is
never changed: it is someone else's message.

`add_missing(data, ...)` returns the content with each missing field appended to the
header section, or `data` itself when nothing is missing. The header section is the
run of field lines (`name:` with RFC 5322's field-name characters, and the folded
lines after them) from the start; it ends at the first other line. When that line is
not the empty line (a message with no separator, or no header at all), an empty line
goes after the added fields, so the body stays the body.

Invariants: only fields are added, nothing else changes; the Message-ID is unique per
queue id and names our host. Pure: no I/O, no clock reads (pass `now`).
"""

from __future__ import annotations

import datetime
import email.utils
import re
from typing import Final

SUBMISSION_MODES: Final = frozenset({"submission", "smtps"})

_FIELD: Final = re.compile(rb"([!-9;-~]+)[ \t]*:")  # field-name (RFC 5322 3.6.8), obs-optional WSP


def header_section(data: bytes) -> tuple[int, set[bytes]]:
    """Where the header section of `data` ends (the offset of the line after it), and the
    lowercase names of its fields."""
    names: set[bytes] = set()
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        stop = len(data) if end < 0 else end
        field = _FIELD.match(data, pos, stop)
        if field is not None:
            names.add(field.group(1).lower())
        elif not (names and data[pos:pos + 1] in (b" ", b"\t")):  # not a folded line of a field
            return pos, names
        pos = stop + 2 if end >= 0 else stop
    return pos, names


def add_missing(data: bytes, *, msgid: str, hostname: str, now: float) -> bytes:
    """`data` with Date and Message-ID appended to its header section when it has none."""
    end, names = header_section(data)
    added = []
    if b"date" not in names:
        moment = datetime.datetime.fromtimestamp(int(now), datetime.UTC)
        added.append(f"Date: {email.utils.format_datetime(moment)}\r\n")
    if b"message-id" not in names:
        added.append(f"Message-ID: <{msgid}@{hostname}>\r\n")
    if not added:
        return data
    if end < len(data) and not data.startswith(b"\r\n", end):
        added.append("\r\n")  # the body had no empty line before it
    elif end == len(data) and data and not data.endswith(b"\r\n"):
        added.insert(0, "\r\n")  # (content without a final line end)
    return data[:end] + "".join(added).encode("utf-8") + data[end:]
