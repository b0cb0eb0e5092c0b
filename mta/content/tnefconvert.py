"""[content] tnef = "convert": winmail.dat parts replaced by the attachments packed in them.

    convert_tnef(content) -> new content | content unchanged | None (no TNEF part)

Each application/ms-tnef (or winmail.dat) part becomes one ordinary MIME part per packed
attachment: base64, Content-Type guessed from the name (mimetypes; else
application/octet-stream), the name in Content-Type name= and Content-Disposition
filename= (RFC 2231 when it is not plain ASCII or is long). In a multipart the new parts
take the TNEF part's place between the parent's delimiters; a message that is a TNEF
part itself (top level or inside message/rfc822) becomes multipart/mixed. The TNEF
message body (RTF) is not carried over: the sender's client sends the text alongside,
as Debian's tnef also leaves it out by default.

Never lose content: a TNEF part that does not decode or parse, holds no attachment, or
holds one we cannot unpack (an embedded message, an OLE object) is kept as it is; the
result is then the content unchanged. Only the TNEF part's bytes (and, when it becomes
a multipart, its own Content-* fields) change. Pure: no I/O; never raises.
"""

from __future__ import annotations

import hashlib
import mimetypes
from email.utils import encode_rfc2231

from mta.content.attachments import part_name
from mta.content.mime import Part, boundary_of, decoded_body, encode_body, header_fields, parse_parts, splice
from mta.content.tnef import TnefAttachment, TnefError, is_tnef, read_tnef

_REPLACED_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
_PARAM_CHUNK = 60


def convert_tnef(content: bytes) -> bytes | None:
    edits: list[tuple[int, int, bytes]] = []
    seen = False
    for part, parent in _parts_with_parents(parse_parts(content), None):
        if part.children or part.content_type.startswith("multipart/") or not is_tnef(part, part_name(part)):
            continue
        seen = True
        attachments = _attachments(content, part)
        if attachments is None:
            continue
        parts = [_mime_part(a) for a in attachments]
        boundary = _parent_boundary(parent)
        if boundary is not None:
            edits.append((part.start, part.end, (b"\r\n--" + boundary + b"\r\n").join(parts)))
        else:
            edits.extend(_as_multipart(content, part, parts))
    if not seen:
        return None
    return splice(content, edits)


def _parts_with_parents(part: Part, parent: Part | None):
    yield part, parent
    for child in part.children:
        yield from _parts_with_parents(child, part)


def _attachments(content: bytes, part: Part) -> list[TnefAttachment] | None:
    data = decoded_body(content, part)
    if data is None:
        return None
    try:
        attachments = read_tnef(data)
    except TnefError:
        return None
    if not attachments or any(a.data is None for a in attachments):
        return None
    return attachments


def _parent_boundary(parent: Part | None) -> bytes | None:
    if parent is None or not parent.content_type.startswith("multipart/"):
        return None
    return boundary_of(parent.headers)


def _mime_part(attachment: TnefAttachment) -> bytes:
    content_type = mimetypes.guess_type(attachment.name, strict=False)[0] or "application/octet-stream"
    header = (f"Content-Type: {content_type};{_param('name', attachment.name)}\r\n"
              f"Content-Disposition: attachment;{_param('filename', attachment.name)}\r\n"
              "Content-Transfer-Encoding: base64\r\n\r\n").encode("ascii")
    return header + encode_body(attachment.data or b"", "base64").removesuffix(b"\r\n")


def _param(key: str, value: str) -> str:
    """ key="value", or RFC 2231 continuations (key*0*=utf-8''...) folded one a line."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value \
            and len(value) <= _PARAM_CHUNK:
        return f' {key}="{value}"'
    encoded = encode_rfc2231(value, "utf-8")  # utf-8''%41...
    chunks = []
    while encoded:
        cut = _PARAM_CHUNK
        if "%" in encoded[cut - 2:cut]:  # never split a %XX escape
            cut = encoded.rindex("%", 0, cut)
        chunks.append(encoded[:cut])
        encoded = encoded[cut:]
    return ";".join(f"\r\n {key}*{i}*={chunk}" for i, chunk in enumerate(chunks))


def _as_multipart(content: bytes, part: Part, parts: list[bytes]) -> list[tuple[int, int, bytes]]:
    """Edits making a message that is a TNEF part itself into multipart/mixed."""
    boundary = b"=_mta_tnef_" + hashlib.sha256(b"".join(parts)).hexdigest()[:24].encode()
    edits = [(start, end, b"") for name, start, end in header_fields(content, part) if name in _REPLACED_FIELDS]
    at = part.header_end
    new_type = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n'
    delimiter = b"--" + boundary
    body = delimiter + b"\r\n" + (b"\r\n" + delimiter + b"\r\n").join(parts) + b"\r\n" + delimiter + b"--\r\n"
    if part.body_start == part.header_end:  # no blank line: add one before the new body
        body = b"\r\n" + body
    edits.append((at, at, new_type))
    edits.append((part.body_start, part.end, body))
    return edits
