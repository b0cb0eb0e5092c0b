"""[[footer]]: a footer appended to the first text/plain part (and the first text/html part).

    add_footer(content, "Sent via example.net", "<p>Sent via example.net</p>") -> bytes | None

MIME-aware: the first text/plain part that is not an attachment, found through nested
multiparts (mixed, alternative, related; never inside a forwarded message/rfc822, nor
in a signed or encrypted message, whose signature it would break), gets the text at
its end; with `html`, the first text/html part gets it before its last </body> (at the
end when there is none). The part's body is decoded (7bit, 8bit, binary,
base64, quoted-printable) and re-encoded in the same transfer encoding with its charset
kept; a charset that cannot encode the footer makes the part UTF-8 (its Content-Type
charset updated), and a 7bit part that is no longer ASCII becomes quoted-printable.
A part whose body does not decode in its charset is left alone. Only the touched parts'
bodies (and, when they change, their Content-Type / Content-Transfer-Encoding fields)
change; every other byte stays as it was.

The marker `X-MTA-Footer: added`, put at the top of the header, keeps a footer from being
added twice: None when it is there already, or when there is no part to add to.
Pure: no I/O; never raises.
"""

from __future__ import annotations

import codecs
from email.message import Message

from mta.content.mime import Part, decoded_body, encode_body, header_fields, parse_parts, splice

MARKER = b"X-MTA-Footer: added\r\n"
# A footer inside these would break the sender's S/MIME or OpenPGP signature (or is
# not readable at all): such a message gets none.
_SEALED = frozenset({"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                     "application/x-pkcs7-mime"})
_CODECS = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"})


def add_footer(content: bytes, text: str, html: str | None = None) -> bytes | None:
    root = parse_parts(content)
    if root.headers.get("x-mta-footer") is not None:
        return None
    edits: list[tuple[int, int, bytes]] = []
    for subtype, addition in (("plain", text), ("html", html)):
        part = _first_text_part(root, subtype) if addition is not None else None
        if part is not None:
            edits += _append(content, part, addition, subtype == "html")
    if not edits:
        return None
    return splice(content, [(0, 0, MARKER), *edits])


def _first_text_part(part: Part, subtype: str) -> Part | None:
    if part.content_type in _SEALED:
        return None
    if part.content_type.startswith("multipart/"):
        for child in part.children:
            found = _first_text_part(child, subtype)
            if found is not None:
                return found
        return None
    if part.content_type != "text/" + subtype or _is_attachment(part.headers):
        return None
    return part


def _is_attachment(headers: Message) -> bool:
    return str(headers.get("content-disposition", "")).strip().lower().startswith("attachment")


def _append(content: bytes, part: Part, addition: str, html: bool) -> list[tuple[int, int, bytes]]:
    """Edits that append `addition` to the part; [] when the part cannot take it."""
    encoding = part.transfer_encoding
    raw = decoded_body(content, part) if encoding in _CODECS else None
    if raw is None:
        return []
    try:
        charset = str(part.headers.get_content_charset("us-ascii"))
        if not codecs.lookup(charset)._is_text_encoding:  # e.g. charset=base64
            return []
        body = raw.decode(charset)
    except (LookupError, UnicodeError, ValueError):
        return []
    new_body = _with_footer(body, "\r\n".join(addition.splitlines()), html)
    try:
        data = new_body.encode(charset)
    except UnicodeEncodeError:
        data, charset = new_body.encode("utf-8"), "utf-8"
    edits = []
    if charset != str(part.headers.get_content_charset("us-ascii")):
        edits += _set_field(content, part, "content-type", _with_charset(part.headers, charset))
    if encoding == "7bit" and not data.isascii():
        encoding = "quoted-printable"
        edits += _set_field(content, part, "content-transfer-encoding", encoding)
    encoded = encode_body(data, encoding)
    if encoding == "base64" and not content[part.body_start:part.end].endswith(b"\n"):
        encoded = encoded.removesuffix(b"\r\n")  # the line end before a delimiter is the delimiter's
    if part.body_start == part.header_end:  # no blank line: the part was all header
        header = content[part.start:part.header_end]
        encoded = (b"\r\n" if not header or header.endswith(b"\n") else b"\r\n\r\n") + encoded
    edits.append((part.body_start, part.end, encoded))
    return edits


def _with_footer(body: str, footer: str, html: bool) -> str:
    if html:
        at = body.lower().rfind("</body")
        if at >= 0:
            return body[:at] + footer + "\r\n" + body[at:]
    if body and not body.endswith("\n"):
        body += "\r\n"
    return body + footer + "\r\n"


def _with_charset(headers: Message, charset: str) -> str:
    field = Message()
    field["Content-Type"] = str(headers.get("content-type", "text/plain"))
    field.set_param("charset", charset)
    return str(field["Content-Type"])


def _set_field(content: bytes, part: Part, name: str, value: str) -> list[tuple[int, int, bytes]]:
    """Edits that replace every `name` field of the part's header with one, or add it."""
    new = f"{name.title()}: {value}\r\n".encode("utf-8", "surrogateescape")
    spans = [(s, e) for n, s, e in header_fields(content, part) if n == name]
    if not spans:
        return [(part.header_end, part.header_end, new)]
    return [(spans[0][0], spans[0][1], new)] + [(s, e, b"") for s, e in spans[1:]]
