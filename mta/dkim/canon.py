"""DKIM relaxed canonicalisation (RFC 6376 3.4.2 header, 3.4.4 body).

Bytes in, bytes out: no decoding, so 8-bit headers and bodies hash as they travel.
WSP is SP and HTAB only (RFC 5234); lines end in CRLF (a bare CR or LF is an ordinary
byte here, as it is to a verifier). The body hash covers the whole body (no l=).
"""

from __future__ import annotations

import re
from typing import Final

_WSP_RUN: Final = re.compile(rb"[ \t]+")
_FOLD: Final = re.compile(rb"\r\n(?=[ \t])")


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """One header field, `name` as written (before the colon) and `value` after it,
    folds included: lower-case name, unfolded, WSP runs to one SP, no WSP at either
    end of the value or around the colon; ends in CRLF."""
    value = _FOLD.sub(b"", value.removesuffix(b"\r\n"))
    value = _WSP_RUN.sub(b" ", value).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The body: no WSP at a line's end, WSP runs to one SP, no empty lines at the end;
    a non-empty body ends in CRLF (an empty one stays empty). A last line without CRLF
    keeps its trailing WSP and gets a CRLF (as dkimpy and OpenDKIM read 3.4.4; SMTP
    content always ends in CRLF anyway)."""
    body = body.replace(b"\t", b" ")
    while b"  " in body:  # bytes.replace (C) beats a regex here; each pass halves every run
        body = body.replace(b"  ", b" ")
    body = body.replace(b" \r\n", b"\r\n")  # runs are single spaces now: one pass
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    body = body[:end]
    return body + b"\r\n" if body else b""
