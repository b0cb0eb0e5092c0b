"""The "encoded-character" extension (RFC 5228 2.4.2.4): `${hex:...}` and `${unicode:...}`
in strings, replaced after escapes and dot-unstuffing. A sequence that does not follow the
grammar stays as written; a well-formed Unicode value outside the scalar range is an error
(ValueError). Hex octets are read as UTF-8 (anything else replaced). Pure.
"""

from __future__ import annotations

import re
from typing import Final

_SEQUENCE: Final = re.compile(r"\$\{(hex|unicode):([ \t\r\n0-9A-Fa-f]*)\}", re.IGNORECASE)


def decode_encoded(text: str) -> str:
    return _SEQUENCE.sub(_replace, text) if "${" in text else text


def _replace(match: re.Match[str]) -> str:
    kind, items = match.group(1).lower(), match.group(2).split()
    if not items:
        return match.group(0)
    if kind == "hex":
        if any(len(item) > 2 for item in items):
            return match.group(0)
        return bytes(int(item, 16) for item in items).decode("utf-8", "replace")
    values = [int(item, 16) if len(item) <= 8 else 0x110000 for item in items]
    bad = [v for v in values if v > 0x10FFFF or 0xD800 <= v <= 0xDFFF]
    if bad:
        raise ValueError(f"${{unicode:{bad[0]:X}}} is not a Unicode character")
    return "".join(chr(v) for v in values)
