"""The header fields a mailing list adds to its copy (RFC 2369, RFC 2919), and its loop check.

  List-Id: <team.example.com>                                  RFC 2919 (the address, @ as a dot)
  List-Post: <mailto:team@example.com>                         RFC 2369 (and the three below)
  List-Owner: <mailto:team-owner@example.com>
  List-Unsubscribe: <mailto:team-owner@example.com?subject=unsubscribe>   the owner unsubscribes
  Precedence: list                                             auto-responders stay quiet

Fields of these names already in the message (another list's, on a nested list) are
replaced, so each occurs once; the new ones go at the end of the header section, the
body's bytes stay as they were. Pure: bytes in, bytes out (CRLF line ends, as stored).
"""

from __future__ import annotations

import re
from typing import Final, Protocol

REPLACED: Final = frozenset({b"list-id", b"list-post", b"list-owner", b"list-unsubscribe", b"precedence"})
_ANGLE: Final = re.compile(rb"<([^<>]*)>")


class ListNames(Protocol):
    """What the fields name (mta/lists.MailingList)."""

    @property
    def address(self) -> str: ...

    @property
    def owner_alias(self) -> str: ...

    @property
    def list_id(self) -> str: ...


def list_fields(lst: ListNames) -> bytes:
    return (f"List-Id: <{lst.list_id}>\r\n"
            f"List-Post: <mailto:{lst.address}>\r\n"
            f"List-Owner: <mailto:{lst.owner_alias}>\r\n"
            f"List-Unsubscribe: <mailto:{lst.owner_alias}?subject=unsubscribe>\r\n"
            "Precedence: list\r\n").encode()


def add_list_fields(content: bytes, lst: ListNames) -> bytes:
    """`content` with the list's fields in place of any of their names it had."""
    fields, end = header_fields(content)
    kept = [content[s:e] for name, s, e in fields if name not in REPLACED]
    head = b"".join(kept)
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"  # a header section that ended the message without a line end
    return head + list_fields(lst) + content[end:]


def carries_list_id(content: bytes, list_id: str) -> bool:
    """The message already has a List-Id naming `list_id`: it went through this list before."""
    fields, _ = header_fields(content)
    wanted = list_id.lower().encode()
    for name, start, end in fields:
        if name == b"list-id":
            match = _ANGLE.search(content, start, end)
            if match is not None and match.group(1).strip().lower() == wanted:
                return True
    return False


def header_fields(content: bytes) -> tuple[list[tuple[bytes, int, int]], int]:
    """((lower-case name, start, end) of each field, folds and CRLF included; where the header
    section ends: at its empty line, which stays with the body). Lines without a colon
    that are not folds count as fields named by their whole text (kept as they are)."""
    if content.startswith(b"\r\n"):
        return [], 0
    blank = content.find(b"\r\n\r\n")
    end = len(content) if blank < 0 else blank + 2
    fields: list[tuple[bytes, int, int]] = []
    at = 0
    while at < end:
        line_end = content.find(b"\r\n", at, end)
        line_end = end if line_end < 0 else line_end + 2
        if content[at:at + 1] in (b" ", b"\t") and fields:
            name, start, _ = fields[-1]
            fields[-1] = (name, start, line_end)
        else:
            fields.append((content[at:line_end].partition(b":")[0].strip().lower(), at, line_end))
        at = line_end
    return fields, end
