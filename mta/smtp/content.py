"""Message content line ends: the one check and the one repair both SMTP sides share.

    has_bare_newline(b"a\r\nb\n")   -> True     (a LF without CR, or a CR without LF)
    crlf_line_ends(b"a\nb\rc\r\n")  -> b"a\r\nb\r\nc\r\n"

On the wire every line ends with CRLF (RFC 5321 2.3.8). The check runs over every
message in both directions, so it is written for speed: two byte counts and one
search for a CR that is not followed by LF (C loops over the buffer, no copy), about
a third cheaper than counting CR, LF and CRLF (the CRLF count is the slow one).

Pure: no I/O.
"""

from __future__ import annotations

import re

_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


def has_bare_newline(data: bytes) -> bool:
    """A CR not followed by LF, or a LF not preceded by CR, anywhere in `data`.

    Without a bare CR every CR pairs with the LF right after it, so the counts of CR
    and LF are equal exactly when every LF is paired too."""
    crs = data.count(b"\r")
    return crs != data.count(b"\n") or (crs > 0 and _BARE_CR.search(data) is not None)


def crlf_line_ends(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF as CRLF."""
    return _ANY_NEWLINE.sub(b"\r\n", data)
