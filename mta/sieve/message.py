"""The message as Sieve tests see it (RFC 5228 2.4.2.2, 5.1): header fields by name, all
occurrences, unfolded, RFC 2047 encoded words decoded; the addresses in a header; the
parts of an address.

Header bytes are read as UTF-8 (RFC 6532), anything else replaced. Only the header section
is parsed. Pure.
"""

from __future__ import annotations

import re
from email.header import decode_header, make_header
from email.utils import getaddresses


class MessageView:
    def __init__(self, message: bytes) -> None:
        self.size = len(message)
        self._fields: dict[str, list[str]] = {}
        for name, value in _fields(_header_section(message)):
            self._fields.setdefault(name.lower(), []).append(value)

    def has(self, name: str) -> bool:
        return name.lower() in self._fields

    def raw(self, name: str) -> list[str]:
        """Every value of the field, unfolded and stripped, not decoded."""
        return self._fields.get(name.lower(), [])

    def values(self, name: str) -> list[str]:
        """Every value of the field, decoded (RFC 2047)."""
        return [decode_words(v) for v in self.raw(name)]

    def addresses(self, name: str) -> list[str]:
        """The addr-specs in every value of an address field (groups flattened)."""
        return [addr for _, addr in getaddresses(self.raw(name)) if addr]


def decode_words(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError):  # an unknown charset or a broken word: as written
        return value


def address_part(address: str, part: str) -> str | None:
    """:all, :localpart or :domain of an addr-spec (RFC 5228 2.7.4); None for the local part
    or domain of an address without an @, which those parts never match."""
    if part == "all":
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        return None
    if part == "domain":
        return domain
    if len(local) >= 2 and local[0] == local[-1] == '"':  # "a b"@x: the local part is a b
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def _header_section(message: bytes) -> str:
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    head = message[:min(ends)] if ends else message
    if message.startswith((b"\r\n", b"\n")):
        head = b""
    return head.decode("utf-8", "replace")


def _fields(head: str) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    name: str | None = None
    value: list[str] = []
    for line in head.split("\n"):
        line = line.removesuffix("\r")
        if line[:1] in (" ", "\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            fields.append((name, "".join(value).strip()))
        field, colon, rest = line.partition(":")
        name, value = (field.strip(), [rest]) if colon and field.strip() else (None, [])
    if name is not None:
        fields.append((name, "".join(value).strip()))
    return fields
