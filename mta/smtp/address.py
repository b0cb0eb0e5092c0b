"""RFC 5321 paths: `<>`, `<local@domain>`, source routes, quoted local parts, literals.

`split_path` finds the end of the bracketed path (quotes may hide `>` and spaces);
`parse_path` validates it against the RFC 5321 section 4.1.2 grammar and its length
limits (local part 64, domain 255, path 256 octets) and returns an Address.
Non-ASCII is accepted only when the transaction declared SMTPUTF8 (RFC 6531).

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass

from mta.smtp.quickinit import quick_init

ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
LET_DIG = frozenset(string.ascii_letters + string.digits)
MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_PATH_OCTETS = 256
# The usual paths, accepted by one regular expression instead of a loop per character;
# what they do not match goes through the loops, which accept or say why not.
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LDH_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_USUAL_MAILBOX = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})*)")  # local@domain, both as above


class AddressError(ValueError):
    """The path breaks the grammar; `needs_utf8` marks non-ASCII without SMTPUTF8."""

    def __init__(self, why: str, needs_utf8: bool = False) -> None:
        super().__init__(why)
        self.needs_utf8 = needs_utf8


@quick_init
@dataclass(frozen=True, slots=True)
class Address:
    local: str
    domain: str  # as sent; "" for the null path and for bare <postmaster>

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def text(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local  # null: local is "" too

    @property
    def domain_key(self) -> str:
        """The domain as policy compares it: lower case, no root dot, literals kept."""
        return self.domain.lower().rstrip(".")


NULL_ADDRESS = Address("", "")


def split_path(arg: str) -> tuple[str, str]:
    """'<a@b> SIZE=1' -> ('<a@b>', 'SIZE=1'). Raises AddressError if there is no path."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        raise AddressError("the address must be enclosed in <>")
    if '"' not in arg:  # no quoted part: the first > ends the path
        end = arg.find(">")
        if end < 0:
            raise AddressError("missing closing >")
        rest = arg[end + 1:]
        if rest and not rest.startswith(" "):
            raise AddressError("text after the closing >")
        return arg[: end + 1], rest.strip(" ")
    quoted = escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            rest = arg[i + 1:]
            if rest and not rest.startswith(" "):
                raise AddressError("text after the closing >")
            return arg[: i + 1], rest.strip(" ")
    raise AddressError("missing closing >")


def parse_path(path: str, utf8: bool, allow_postmaster: bool = False) -> Address:
    """Validate a bracketed path; return its Address (source route stripped)."""
    is_ascii = path.isascii()
    if not is_ascii and not utf8:
        raise AddressError("non-ASCII address without SMTPUTF8", needs_utf8=True)
    if (len(path) if is_ascii else len(path.encode("utf-8"))) > MAX_PATH_OCTETS:
        raise AddressError(f"path longer than {MAX_PATH_OCTETS} octets")
    inner = path[1:-1]
    if inner == "":
        return NULL_ADDRESS
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("malformed source route")
            _check_domain(hop[1:])
    if allow_postmaster and inner.lower() == "postmaster":
        return Address(inner, "")
    usual = _USUAL_MAILBOX.fullmatch(inner)  # dot-atom@domain, ASCII: one match, not the checks one by one
    if usual is not None:
        local, domain = usual.groups()
        if len(local) <= MAX_LOCAL_OCTETS and len(domain) <= MAX_DOMAIN_OCTETS:
            return Address(local, domain)
    return _mailbox(inner)


def _mailbox(inner: str) -> Address:
    """Any mailbox, each check saying why not: the reference that parse_path's usual case matches."""
    local, domain = _split_mailbox(inner)
    _check_local(local)
    if domain.startswith("["):
        _check_literal(domain)
    else:
        _check_domain(domain)
    return Address(local, domain)


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    if mailbox.startswith('"'):
        escaped = False
        for i in range(1, len(mailbox)):
            ch = mailbox[i]
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                rest = mailbox[i + 1:]
                if not rest.startswith("@"):
                    raise AddressError("expected @ after the quoted local part")
                return mailbox[: i + 1], rest[1:]
        raise AddressError("unterminated quoted local part")
    local, at, domain = mailbox.rpartition("@")
    if not at:
        raise AddressError("missing @domain")
    return local, domain


def _check_local(local: str) -> None:
    if len(local) <= MAX_LOCAL_OCTETS and _DOT_ATOM.fullmatch(local) is not None:
        return
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise AddressError(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    if local.startswith('"'):
        body = local[1:-1]
        i = 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                if i + 1 >= len(body) or not (32 <= ord(body[i + 1]) <= 126):
                    raise AddressError("bad quoted pair in local part")
                i += 2
                continue
            if ch == '"' or (ord(ch) < 128 and not (32 <= ord(ch) <= 126)):
                raise AddressError("bad character in quoted local part")
            i += 1
        return
    for atom in local.split("."):
        if not atom:
            raise AddressError("empty atom in local part (leading, trailing or double dot)")
        for ch in atom:
            if ch not in ATEXT and ord(ch) < 128:
                raise AddressError("bad character in local part")


def _check_domain(domain: str) -> None:
    if len(domain) <= MAX_DOMAIN_OCTETS and _LDH_DOMAIN.fullmatch(domain) is not None:
        return
    if not domain:
        raise AddressError("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"domain longer than {MAX_DOMAIN_OCTETS} octets")
    for label in domain.split("."):
        if not label:
            raise AddressError("empty label in domain")
        if len(label) > 63:
            raise AddressError("domain label longer than 63 characters")
        if label[0] == "-" or label[-1] == "-":
            raise AddressError("domain label starts or ends with '-'")
        for ch in label:
            if ch not in LET_DIG and ch != "-" and ord(ch) < 128:
                raise AddressError("bad character in domain")


def _check_literal(literal: str) -> None:
    if not literal.endswith("]"):
        raise AddressError("unterminated address literal")
    body = literal[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(body[5:])
        elif ":" in body:
            tag, _, content = body.partition(":")
            _check_domain(tag)  # RFC 5321 General-address-literal: Standardized-tag ":" dcontent
            if not content or any(not (33 <= ord(c) <= 126) or c in "[\\]" for c in content):
                raise AddressError("bad general address literal")
        else:
            ipaddress.IPv4Address(body)
    except ipaddress.AddressValueError:
        raise AddressError("bad IP address literal") from None
