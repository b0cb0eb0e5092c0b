"""The DKIM-Signature header for a message (RFC 6376 3.5, 3.7, 5): relaxed/relaxed, whole body.

sign() is pure apart from the clock (pass `now` to fix t=): the content in, the header
to prepend out. Tags, in this order: v=1; a=; c=relaxed/relaxed; d=; s=; t=; h=; bh=; b=.
The header is folded so that no line reaches 78 characters (only a d= or s= too long
for any line stays whole, over it); folds sit between tags, after a colon of h= and
inside the base64 of b= (FWS is allowed there, and a relaxed verifier unfolds it). b=
comes last: what is hashed is the header with an empty b=, exactly as written, folds
included.

Cost (bench/dkimsign.py): the body is canonicalised in C-speed passes, about 6 µs per
KiB, plus one signature (RSA-2048 some 0.3 ms, Ed25519 0.03 ms); a caller signing very
large messages on an event loop may want a thread.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Final

from mta.dkim.canon import relaxed_body, relaxed_header
from mta.dkim.fields import DEFAULT_HEADERS, check_names, select, split_message
from mta.dkim.keys import DkimKey

NAME: Final = b"DKIM-Signature"
MAX_LINE: Final = 77  # characters before CRLF: lines "under 78"


def sign(content: bytes, key: DkimKey, headers: tuple[str, ...] | None = None, now: int | None = None) -> bytes:
    """b"DKIM-Signature: ...\\r\\n" for `content` (the whole message, CRLF line ends),
    signing the fields named in `headers` (default: DEFAULT_HEADERS) that the message
    has; From is always signed, and oversigned. ValueError for a name that is not a
    header field name (fields.check_names: validate the configuration with it)."""
    names = check_names(headers) if headers is not None else DEFAULT_HEADERS
    if "from" not in (n.lower() for n in names):
        names = ("From", *names)
    fields, body = split_message(content)
    h, signed = select(fields, names)
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")
    stamp = int(time.time()) if now is None else now
    unsigned = _fold([(" ", "v=1;"), (" ", f"a={key.algorithm};"), (" ", "c=relaxed/relaxed;"),
                      (" ", f"d={key.domain};"), (" ", f"s={key.selector};"), (" ", f"t={stamp};"),
                      *_h_atoms(h), (" ", f"bh={body_hash};"), (" ", "b=")])
    data = b"".join(relaxed_header(f.name, f.value) for f in signed)
    data += relaxed_header(NAME, unsigned.encode("ascii")).removesuffix(b"\r\n")
    b = base64.b64encode(key.sign(data)).decode("ascii")
    return NAME + b":" + (unsigned + _fold_b64(unsigned, b) + "\r\n").encode("ascii")


def _h_atoms(h: list[str]) -> list[tuple[str, str]]:
    """h= as atoms a fold may go between: after each colon."""
    last = len(h) - 1
    return [(" " if i == 0 else "", ("h=" if i == 0 else "") + name + (";" if i == last else ":"))
            for i, name in enumerate(h)]


def _fold(atoms: list[tuple[str, str]]) -> str:
    """The header value after "DKIM-Signature:": each atom joined by its glue, or by a
    fold (CRLF SP) where the line would reach MAX_LINE."""
    out = ""
    line = len(NAME) + 1
    for glue, text in atoms:
        if line + len(glue) + len(text) > MAX_LINE:
            out += "\r\n "
            line = 1
        else:
            out += glue
            line += len(glue)
        out += text
        line += len(text)
    return out


def _fold_b64(unsigned: str, b: str) -> str:
    """The b= value, continuing the last line of `unsigned` (which ends in "b=")."""
    last = unsigned.rsplit("\r\n", 1)
    line = len(last[-1]) + (0 if len(last) > 1 else len(NAME) + 1)
    out = ""
    while b:
        room = MAX_LINE - line
        if room < 8:
            out += "\r\n "
            line = 1
            continue
        out += b[:room]
        b = b[room:]
        line += room
    return out
