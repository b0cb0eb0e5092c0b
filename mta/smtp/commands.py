"""SMTP command lines -> Command values, or the Reply that says why not.

Parses verbs, paths and ESMTP parameters: SIZE and BODY (RFC 1870, 6152), SMTPUTF8
(RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461, xtext decoded), BDAT (RFC 3030),
STARTTLS (RFC 3207), AUTH and MAIL FROM's AUTH= (RFC 4954; the latter accepted and
ignored, as we trust no other server's claim about who submitted a message).
Parsing depends on no session state except whether the transaction is SMTPUTF8.

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mta.smtp import replies
from mta.smtp.address import Address, AddressError, parse_path, split_path
from mta.smtp.quickinit import quick_init
from mta.smtp.replies import Reply


@quick_init
@dataclass(frozen=True, slots=True)
class Helo:
    name: str


@quick_init
@dataclass(frozen=True, slots=True)
class Ehlo:
    name: str


@quick_init
@dataclass(frozen=True, slots=True)
class MailFrom:
    address: Address
    size: int | None = None
    body: str | None = None  # "7BIT" | "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" | "HDRS"
    envid: str | None = None  # xtext-decoded


@quick_init
@dataclass(frozen=True, slots=True)
class RcptTo:
    address: Address
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # "addr-type;address", xtext-decoded


@dataclass(frozen=True, slots=True)
class Data:
    pass


@dataclass(frozen=True, slots=True)
class Bdat:
    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Vrfy:
    argument: str


@dataclass(frozen=True, slots=True)
class Expn:
    argument: str


@dataclass(frozen=True, slots=True)
class StartTls:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str  # upper case
    initial: str | None  # the initial response as sent (base64, or "=" for empty); None: absent


Command = Helo | Ehlo | MailFrom | RcptTo | Data | Bdat | Rset | Noop | Quit | Help | Vrfy | Expn | StartTls | Auth

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_MAX_SIZE_DIGITS = 20
_MAX_ENVID = 100
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_command(line: str, utf8: bool = False) -> Command | Reply:
    """One command line (no CRLF) -> Command, or the error Reply to send."""
    verb, _, arg = line.partition(" ")
    verb = verb.upper()
    parser = _PARSERS.get(verb)
    if parser is None:
        return replies.UNRECOGNIZED
    return parser(arg, utf8)


def _no_args(command: Command):  # type: ignore[no-untyped-def]
    def parse(arg: str, utf8: bool) -> Command | Reply:
        return command if not arg.strip(" ") else replies.NO_PARAMETERS
    return parse


def _helo(arg: str, utf8: bool) -> Command | Reply:
    name = arg.strip(" ")
    if not name or " " in name:
        return replies.syntax("HELO hostname")
    return Helo(name)


def _ehlo(arg: str, utf8: bool) -> Command | Reply:
    name = arg.strip(" ")
    if not name or " " in name:
        return replies.syntax("EHLO hostname")
    return Ehlo(name)


def _mail(arg: str, utf8: bool) -> Command | Reply:
    if arg[:5].upper() != "FROM:":
        return replies.syntax("MAIL FROM:<address>")
    try:
        path, rest = split_path(arg[5:])
    except AddressError as exc:
        return replies.bad_sender(str(exc))
    params = _params(rest)
    if isinstance(params, Reply):
        return params
    fields: dict[str, object] = {}
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > _MAX_SIZE_DIGITS:
                return replies.bad_parameter("SIZE takes a number of octets")
            fields["size"] = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return replies.bad_parameter("BODY takes 7BIT or 8BITMIME")
            fields["body"] = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                return replies.bad_parameter("SMTPUTF8 takes no value")
            fields["smtputf8"] = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return replies.bad_parameter("RET takes FULL or HDRS")
            fields["ret"] = value.upper()
        elif key == "ENVID":
            envid = _xtext(value)
            if envid is None or len(value or "") > _MAX_ENVID:
                return replies.bad_parameter("ENVID takes xtext of at most 100 characters")
            fields["envid"] = envid
        elif key == "AUTH":
            if value != "<>" and _xtext(value) is None:
                return replies.bad_parameter("AUTH takes <> or xtext")
        else:
            return replies.unknown_parameter(key)
    try:
        address = parse_path(path, utf8=bool(fields.get("smtputf8")))
    except AddressError as exc:
        return replies.UTF8_NEEDS_SMTPUTF8 if exc.needs_utf8 else replies.bad_sender(str(exc))
    return MailFrom(address, **fields)  # type: ignore[arg-type]


def _rcpt(arg: str, utf8: bool) -> Command | Reply:
    if arg[:3].upper() != "TO:":
        return replies.syntax("RCPT TO:<address>")
    try:
        path, rest = split_path(arg[3:])
    except AddressError as exc:
        return replies.bad_recipient(str(exc))
    params = _params(rest)
    if isinstance(params, Reply):
        return params
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for key, value in params.items():
        if key == "NOTIFY":
            words = tuple((value or "").upper().split(","))
            if words != ("NEVER",) and not (set(words) <= _NOTIFY_VALUES and len(set(words)) == len(words)):
                return replies.bad_parameter("NOTIFY takes NEVER or SUCCESS,FAILURE,DELAY")
            notify = words
        elif key == "ORCPT":
            addr_type, semi, xtext = (value or "").partition(";")
            decoded = _xtext(xtext)
            if not semi or not addr_type.isascii() or not addr_type.replace("-", "").isalnum() or not decoded:
                return replies.bad_parameter("ORCPT takes addr-type;xtext")
            orcpt = f"{addr_type.lower()};{decoded}"
        else:
            return replies.unknown_parameter(key)
    try:
        address = parse_path(path, utf8=utf8, allow_postmaster=True)
    except AddressError as exc:
        return replies.UTF8_NEEDS_SMTPUTF8 if exc.needs_utf8 else replies.bad_recipient(str(exc))
    if address.is_null:
        return replies.bad_recipient("the null path is not a recipient")
    return RcptTo(address, notify, orcpt)


def _bdat(arg: str, utf8: bool) -> Command | Reply:
    words = arg.split(" ")
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > _MAX_SIZE_DIGITS:
        return replies.syntax("BDAT chunk-size [LAST]")
    if len(words) == 2 and words[1].upper() != "LAST":
        return replies.syntax("BDAT chunk-size [LAST]")
    return Bdat(int(words[0]), len(words) == 2)


def _vrfy(arg: str, utf8: bool) -> Command | Reply:
    return Vrfy(arg.strip(" ")) if arg.strip(" ") else replies.syntax("VRFY address")


def _expn(arg: str, utf8: bool) -> Command | Reply:
    return Expn(arg.strip(" ")) if arg.strip(" ") else replies.syntax("EXPN list")


def _auth(arg: str, utf8: bool) -> Command | Reply:
    words = arg.strip(" ").split(" ")
    if not words[0] or len(words) > 2 or not words[0].isascii():
        return replies.syntax("AUTH mechanism [initial-response]")
    return Auth(words[0].upper(), words[1] if len(words) == 2 else None)


def _params(text: str) -> dict[str, str | None] | Reply:
    """'SIZE=10 SMTPUTF8' -> {'SIZE': '10', 'SMTPUTF8': None}; duplicates are errors."""
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        key = key.upper()
        if not key or not key.isascii() or not key.replace("-", "").isalnum():
            return replies.bad_parameter("malformed parameter")
        if key in params:
            return replies.bad_parameter(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def _xtext(value: str | None) -> str | None:
    """RFC 3461 xtext -> text; None when malformed."""
    if not value:
        return None
    if any(not (33 <= ord(c) <= 126) or c == "=" for c in value):
        return None
    if value.count("+") != len(_XTEXT_HEX.findall(value)):
        return None
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


_PARSERS = {
    "HELO": _helo,
    "EHLO": _ehlo,
    "MAIL": _mail,
    "RCPT": _rcpt,
    "DATA": _no_args(Data()),
    "BDAT": _bdat,
    "RSET": _no_args(Rset()),
    "NOOP": lambda arg, utf8: Noop(),
    "QUIT": _no_args(Quit()),
    "HELP": lambda arg, utf8: Help(),
    "VRFY": _vrfy,
    "EXPN": _expn,
    "STARTTLS": _no_args(StartTls()),
    "AUTH": _auth,
}
