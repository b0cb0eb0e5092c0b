"""Attachment names, and the check for a forbidden one ([content] reject_attachment_extensions).

    forbidden_attachment(content, frozenset({"exe", "vbs"})) -> "Invoice.EXE" | None

A part's name comes from Content-Disposition filename or else Content-Type name, with
RFC 2231 (charset, continuations filename*0*=) and RFC 2047 encoded words decoded. Every
part is looked at, nested message/rfc822 parts and the multiparts inside them too, and
the attachments packed inside a TNEF part (winmail.dat), since its recipient's client
unpacks them. Names compare case-insensitively, and without trailing dots, blanks and
control characters, which Windows drops when it opens the file ("a.exe." runs as
"a.exe"). The name returned has its control characters as "?" (it goes into a reply).

A message of more than MAX_PARTS (10,000) MIME parts is not read past them (one with
10**5 empty parts would hold the event loop for seconds); forbidden_attachment then
answers TOO_MANY_PARTS, so a forbidden name cannot hide behind them.

Pure: no I/O; malformed MIME is read as far as it parses and never raises.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import collapse_rfc2231_value

from mta.content.mime import MAX_PARTS, Part, decoded_body, is_truncated, parse_parts, walk
from mta.content.tnef import TnefError, is_tnef, read_tnef


_TRAILING = re.compile(r"[\s.\x00-\x1f]+$")  # what Windows (or a client) drops at a name's end
TOO_MANY_PARTS = f"(more than {MAX_PARTS} MIME parts)"


def forbidden_attachment(content: bytes, extensions: frozenset[str]) -> str | None:
    """The decoded name of the first attachment ending in ".<ext>" for one of `extensions`
    (lower-case, no dot); TOO_MANY_PARTS when not every part could be read; else None."""
    if not extensions:
        return None
    suffixes = tuple("." + ext.lower().lstrip(".") for ext in extensions)
    root = parse_parts(content)
    for name in attachment_names(content, root):
        if _TRAILING.sub("", name).lower().endswith(suffixes):
            return "".join(c if c.isprintable() else "?" for c in name)
    return TOO_MANY_PARTS if is_truncated(root) else None


def attachment_names(content: bytes, root: Part) -> Iterator[str]:
    """Every part's name, in message order; a TNEF part's packed attachments after it."""
    for part in walk(root):
        name = part_name(part)
        if name:
            yield name
        if is_tnef(part, name):
            yield from _tnef_names(content, part)


def part_name(part: Part) -> str | None:
    """The part's file name (Content-Disposition filename, else Content-Type name), decoded."""
    headers = part.headers
    for raw in (_param(headers, "filename", "content-disposition"), _param(headers, "name", "content-type")):
        if raw:
            return _decode_words(raw)
    return None


def _param(headers, param: str, header: str) -> str | None:
    try:
        value = headers.get_param(param, None, header=header)
        if value is None:
            return None
        return collapse_rfc2231_value(value, errors="replace", fallback_charset="utf-8").strip()
    except (ValueError, LookupError, UnicodeError, TypeError, IndexError, HeaderParseError):
        return None


def _decode_words(raw: str) -> str:
    """RFC 2047 encoded words decoded (many mailers use them in parameters, against the RFC)."""
    if "=?" not in raw:
        return raw
    try:
        return str(make_header(decode_header(raw)))
    except (ValueError, LookupError, UnicodeError, HeaderParseError):
        return raw


def _tnef_names(content: bytes, part: Part) -> Iterator[str]:
    data = decoded_body(content, part)
    if data is None:
        return
    try:
        attachments = read_tnef(data)
    except TnefError:
        return
    for attachment in attachments:
        yield attachment.name
