"""The MIME structure of a stored message as byte spans, and splicing changes into it.

    root = parse_parts(content)          # Part tree: each part's header and body spans
    for part in walk(root): ...          # pre-order, containers before what they hold
    splice(content, [(start, end, b"new")])  # every byte outside the edits stays as it was

A Part records where its header starts and ends, where its body starts and where it
ends; its MIME fields are kept in an `email` Message (compat32: values as written,
nothing decoded or re-folded) for reading their parameters. Children: the parts of a
multipart (between its delimiter lines; the line end before a delimiter belongs to the
delimiter, RFC 2046 5.1.1) and the message of a message/rfc822 part. The content is
never re-serialised: a change replaces the bytes of the part (or header field) it
touches, so other signatures and the operator's diff of untouched parts hold.

Malformed MIME is read as far as it parses: no blank line -> all header; no closing
delimiter -> the last part runs to the end; nesting deeper than MAX_DEPTH is a leaf; past
MAX_PARTS parts in all, a multipart's remaining parts are not read (its `truncated`).
Pure: no I/O. Nothing here raises on any input bytes.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import Message

MAX_DEPTH = 32
MAX_PARTS = 10_000
# The fields a Part keeps: what MIME structure and our stages read.
MIME_FIELDS = frozenset({"content-type", "content-disposition", "content-transfer-encoding", "x-mta-footer"})
_BLANK_LINE = re.compile(rb"\n\r?\n")
_NAMES = rb"(?:content-type|content-disposition|content-transfer-encoding|x-mta-footer)[ \t]*:"
_MIME_FIELD_FIRST = re.compile(_NAMES, re.IGNORECASE)
_MIME_FIELD = re.compile(rb"\n" + _NAMES, re.IGNORECASE)
_FIELD_START = re.compile(rb"(?m)^(?=[^ \t\r\n])")


@dataclass(frozen=True, slots=True)
class Part:
    start: int        # first byte of the header section
    header_end: int   # one past the last header field's line end (the blank line excluded)
    body_start: int   # first byte after the blank line (== end when there is no body)
    end: int          # one past the last byte of the body
    headers: Message  # MIME_FIELDS only, values as written (compat32)
    children: tuple[Part, ...] = ()
    truncated: bool = False  # parts past MAX_PARTS in this multipart were not read

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()

    @property
    def transfer_encoding(self) -> str:
        return str(self.headers.get("content-transfer-encoding", "7bit")).strip().lower()


def parse_parts(content: bytes, start: int = 0, end: int | None = None) -> Part:
    """The part at content[start:end] (the whole message by default) and all it holds, up
    to MAX_PARTS parts in all (a message with 10**5 empty parts must not hold the loop)."""
    return _parse(content, start, len(content) if end is None else end, 0, [MAX_PARTS - 1])


def is_truncated(root: Part) -> bool:
    return any(part.truncated for part in walk(root))


def _parse(content: bytes, start: int, end: int, depth: int, budget: list[int]) -> Part:
    if content.startswith(b"\r\n", start) or content.startswith(b"\n", start):
        header_end = start
        body_start = min(end, start + (2 if content[start] == 13 else 1))
    else:
        blank = _BLANK_LINE.search(content, start, end)
        header_end = blank.start() + 1 if blank else end
        body_start = blank.end() if blank else end
    headers = _mime_headers(content, start, header_end)
    part = Part(start, header_end, body_start, end, headers)
    if depth >= MAX_DEPTH:
        return part
    if part.content_type.startswith("multipart/"):
        boundary = boundary_of(headers)
        if boundary:
            spans = _multipart_spans(content, body_start, end, boundary, budget[0] + 1)
            truncated = len(spans) > budget[0]
            children = []
            for s, e in spans:
                if budget[0] <= 0:
                    truncated = True
                    break
                budget[0] -= 1
                children.append(_parse(content, s, e, depth + 1, budget))
            return Part(start, header_end, body_start, end, headers, tuple(children), truncated)
    elif part.content_type == "message/rfc822" and part.transfer_encoding in ("7bit", "8bit", "binary"):
        if body_start < end and budget[0] > 0:
            budget[0] -= 1
            inner = _parse(content, body_start, end, depth + 1, budget)
            return Part(start, header_end, body_start, end, headers, (inner,))
    return part


def _mime_headers(content: bytes, start: int, header_end: int) -> Message:
    """The part's MIME_FIELDS as a compat32 Message. A search for their names only (one
    starting with a literal LF runs at C speed): 4 million other header lines cost 60 ms,
    where splitting every field cost 2.5 s."""
    headers = Message()
    found = [m.end() for m in (_MIME_FIELD_FIRST.match(content, start, header_end),) if m]
    found += [m.end() for m in _MIME_FIELD.finditer(content, start, header_end)]
    for name_end in found:
        end = content.find(b"\n", name_end, header_end)
        while end != -1 and end + 1 < header_end and content[end + 1] in b" \t":
            end = content.find(b"\n", end + 1, header_end)  # folded: the field goes on
        end = header_end if end == -1 else end + 1
        field_start = content.rfind(b"\n", start, name_end) + 1 or start
        name, _, value = content[field_start:end].partition(b":")
        headers[name.strip().decode("ascii", "replace")] = \
            value.lstrip(b" \t").rstrip(b"\r\n").decode("ascii", "surrogateescape")
    return headers


def walk(part: Part) -> Iterator[Part]:
    yield part
    for child in part.children:
        yield from walk(child)


def boundary_of(headers: Message) -> bytes | None:
    try:
        boundary = headers.get_boundary()
    except (ValueError, LookupError, UnicodeError):
        return None
    if not boundary:
        return None
    return boundary.encode("utf-8", "surrogateescape").rstrip(b" ")


def _multipart_spans(content: bytes, body_start: int, end: int, boundary: bytes,
                     limit: int) -> list[tuple[int, int]]:
    """(start, end) of each body part between the delimiter lines of one boundary.

    A literal search (C speed) for "--boundary", then the checks: at the start of a line,
    followed by "--" or not, blanks, and the line end (or the end of the body)."""
    needle = b"--" + boundary
    spans: list[tuple[int, int]] = []
    part_start: int | None = None
    at = content.find(needle, body_start, end)
    while at >= 0:
        after = at + len(needle)
        closing = content.startswith(b"--", after, end)
        line_end = after + 2 if closing else after
        while line_end < end and content[line_end] in b" \t":
            line_end += 1
        at_line_start = at == body_start or content[at - 1] == 10
        if at_line_start and (line_end == end or content.startswith(b"\n", line_end, end)
                              or content.startswith(b"\r\n", line_end, end)):
            if part_start is not None:
                before = at - 1 if at > body_start else at  # the line end before belongs to the delimiter
                if before > body_start and content[before - 1] == 13:
                    before -= 1
                spans.append((part_start, max(part_start, before)))
            if closing or len(spans) >= limit:
                return spans
            part_start = min(end, line_end + (2 if content.startswith(b"\r\n", line_end, end) else 1))
        at = content.find(needle, after, end)
    if part_start is not None:
        spans.append((part_start, end))
    return spans


def header_fields(content: bytes, part: Part) -> list[tuple[str, int, int]]:
    """(lower-case name, start, end) of each field in the part's header, folding included."""
    return _fields(content, part.start, part.header_end)


def _fields(content: bytes, start: int, end: int) -> list[tuple[str, int, int]]:
    starts = [m.start() for m in _FIELD_START.finditer(content, start, end)]
    fields = []
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else end
        name = content[s:e].partition(b":")[0].strip().lower().decode("latin-1")
        fields.append((name, s, e))
    return fields


def decoded_body(content: bytes, part: Part) -> bytes | None:
    """The part's body with its transfer encoding undone; None when it does not decode."""
    body = content[part.body_start:part.end]
    encoding = part.transfer_encoding
    if encoding == "base64":
        try:
            return binascii.a2b_base64(body)
        except binascii.Error:
            return None
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def encode_body(data: bytes, encoding: str) -> bytes:
    """`data` (CRLF line ends) in a transfer encoding, lines CRLF, no longer than 76."""
    if encoding == "base64":
        lines = [binascii.b2a_base64(data[i:i + 57], newline=False) for i in range(0, len(data), 57)]
        return b"".join(line + b"\r\n" for line in lines)
    if encoding == "quoted-printable":
        lines = data.split(b"\r\n")
        return b"\r\n".join(binascii.b2a_qp(line, quotetabs=False, istext=False) for line in lines)
    return data


def splice(content: bytes, edits: Sequence[tuple[int, int, bytes]]) -> bytes:
    """content with each (start, end) span replaced; spans must not overlap."""
    out = []
    at = 0
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
        out.append(content[at:start])
        out.append(new)
        at = end
    out.append(content[at:])
    return b"".join(out)
