"""A message's header fields as DKIM reads them, which of them a signature covers, and
the From: domain that decides whether we sign.

Fields are split from the content bytes (CRLF line ends) as written: the name before
the colon, the value after it with its folds, so canonicalisation sees what travels.
Selection (RFC 6376 5.4.2): for each name in the signed list, every instance, taken
bottom-up, is listed in h= once; From is listed once more than it occurs, so a second
From added on the way breaks the signature (oversigning, OpenDKIM's OversignHeaders).

The From: address is read by our own small RFC 5322 reader, not email.utils.getaddresses,
whose answers differ between Python 3.11 releases (a malformed list is dropped by one,
cut to a fragment by another); here it decides which domain's key signs.
"""

from __future__ import annotations

from typing import Final, NamedTuple

# OpenDKIM's default signed list (its dkim_should_signhdrs), in its order, plus
# List-Unsubscribe-Post, which RFC 8058 4 says MUST be signed (one-click unsubscribe, as
# the large mailbox providers ask of bulk senders).
DEFAULT_HEADERS: Final[tuple[str, ...]] = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Resent-Date", "Resent-From", "Resent-To",
    "Resent-Cc", "In-Reply-To", "References", "List-Id", "List-Help", "List-Unsubscribe",
    "List-Unsubscribe-Post", "List-Subscribe", "List-Post", "List-Owner", "List-Archive", "Message-ID", "Content-Type",
    "Content-Transfer-Encoding", "MIME-Version",
)
OVERSIGNED: Final = ("from",)


def check_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` when each is a header field name that can stand in h= (printable ASCII, no
    colon, no semicolon, no space: RFC 5322 ftext less what breaks a tag list), else
    ValueError naming the first that cannot: for the configuration's `headers`."""
    for name in names:
        if not name or not all(33 <= ord(c) <= 126 and c not in ":;" for c in name):
            raise ValueError(f"{name!r} is not a header field name")
    return names


class Field(NamedTuple):
    name: bytes   # as written, before the colon
    value: bytes  # after the colon, folds and the final CRLF included


def split_message(content: bytes) -> tuple[list[Field], bytes]:
    """The header fields and the body (after the empty line; b"" without one). A line in
    the header section with no colon is not a field and is left out (nothing can sign it)."""
    if content.startswith(b"\r\n"):
        return [], content[2:]
    head, sep, body = content.partition(b"\r\n\r\n")
    lines = (head + b"\r\n").split(b"\r\n")[:-1]
    fields: list[Field] = []
    current: list[bytes] | None = None
    for line in lines:
        if line[:1] in (b" ", b"\t") and current is not None:
            current.append(line)
            continue
        if current is not None:
            fields.append(_field(current))
        current = [line] if b":" in line else None
    if current is not None:
        fields.append(_field(current))
    return fields, body if sep else b""


def _field(lines: list[bytes]) -> Field:
    name, _, first = lines[0].partition(b":")
    return Field(name, b"\r\n".join([first, *lines[1:]]) + b"\r\n")


def select(fields: list[Field], names: tuple[str, ...]) -> tuple[list[str], list[Field]]:
    """The h= names and the fields they sign, in h= order. Each name of `names` (any
    case, first mention wins) is listed once per field of that name, bottom-up; an
    oversigned name once more (it matches no field: a verifier hashes nothing for it)."""
    by_name: dict[str, list[Field]] = {}
    for f in fields:
        by_name.setdefault(f.name.rstrip(b" \t").decode("ascii", "replace").lower(), []).append(f)
    h: list[str] = []
    signed: list[Field] = []
    for name in dict.fromkeys(n.lower() for n in names):
        found = by_name.get(name, [])
        for f in reversed(found):
            h.append(name)
            signed.append(f)
        if name in OVERSIGNED:
            h.append(name)
    return h, signed


def from_domain(content: bytes) -> str | None:
    """The domain of the message's From: address, lower case, or None when there is no
    single answer: no From, two From fields, no address, or addresses in two domains."""
    fields, _ = split_message(content)
    found = [f for f in fields if f.name.rstrip(b" \t").lower() == b"from"]
    if len(found) != 1:
        return None
    domains = {_domain(a) for a in _addresses(found[0].value.decode("utf-8", "surrogateescape"))}
    domains.discard(None)
    return domains.pop() if len(domains) == 1 else None


def _domain(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not local or not domain or domain.startswith("[") or any(c in domain for c in " \t\"<>()"):
        return None
    return domain


def _addresses(value: str) -> list[str]:
    """The addr-specs of an RFC 5322 address list, as text: comments dropped, quoted
    strings (display names, quoted local parts) kept whole, `<...>` preferred to the
    text around it, a group's name (`name: ...;`) left out."""
    addresses = []
    for piece in _split_outside(_drop_comments(value.replace("\r\n", "")), ","):
        piece = piece.strip().removesuffix(";")
        if len(group := _split_outside(piece, ":")) > 1:
            piece = group[-1]
        within = _split_outside(piece, "<")
        if len(within) > 1:
            piece = within[-1].partition(">")[0]
        if piece := "".join(piece.split()):
            addresses.append(piece)
    return addresses


def _drop_comments(value: str) -> str:
    kept: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            continue
        elif ch == '"':
            quoted = not quoted
        elif ch == "(" and not quoted:
            depth = 1
            kept.append(" ")
            continue
        if not depth:
            kept.append(ch)
    return "".join(kept)


def _split_outside(value: str, sep: str) -> list[str]:
    """`value` split at `sep` where it stands outside quoted strings and `<...>`."""
    pieces, current = [], []
    quoted = escaped = False
    angle = 0
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == sep and (angle == 0 or sep == "<"):
            pieces.append("".join(current))
            current = []
            angle += sep == "<"
            continue
        elif not quoted and ch in "<>":
            angle = max(0, angle + (1 if ch == "<" else -1))
        current.append(ch)
    pieces.append("".join(current))
    return pieces
