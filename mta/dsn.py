"""Delivery status notifications: RFC 3464 reports, RFC 3461 NOTIFY rules.

`build_dsn` returns one complete RFC 5322 message (CRLF line ends): multipart/report
with a text/plain explanation, a message/delivery-status part (one block per
recipient) and the original message or its header section. `should_notify` says
whether a recipient's NOTIFY asks for a DSN about a given action.

Invariants: no output line exceeds 998 octets; the output depends only on the
arguments (boundary and Message-ID are derived from them), so the same inputs give
the same bytes. Pure: no I/O, no clock reads (pass `now`).

SMTPUTF8: addresses and replies are written as UTF-8 when they are not ASCII. Such a
DSN can only travel over SMTPUTF8; RFC 6533 (message/global-delivery-status) would be
the complete answer and is not implemented.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

ACTIONS: Final = ("failed", "delayed", "delivered", "relayed", "expanded")
SUCCESS_ACTIONS: Final = frozenset({"delivered", "relayed", "expanded"})
MAX_LINE_OCTETS: Final = 998
FOLD_AT: Final = 78  # RFC 5322 2.1.1: SHOULD stay within 78 characters

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NOTIFY_FOR_ACTION: Final = {
    "failed": "FAILURE", "delayed": "DELAY",
    "delivered": "SUCCESS", "relayed": "SUCCESS", "expanded": "SUCCESS",
}
_SUBJECTS: Final = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delivery Status Notification (Delay)",
    "success": "Delivery Status Notification (Success)",
}
_VERDICTS: Final = {
    "failed": "delivery failed",
    "delayed": "delivery delayed, still trying",
    "delivered": "delivered",
    "relayed": "relayed to a system that sends no further notifications",
    "expanded": "delivered to an alias or list, which forwarded it",
}


@dataclass(frozen=True)
class DsnRecipient:
    address: str  # final recipient (rfc822;address)
    action: str  # "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    status: str  # "5.1.1"
    orcpt: str | None = None  # DSN ORCPT "addr-type;address", xtext-decoded -> Original-Recipient
    remote_mta: str | None = None  # "mx.example.net" -> Remote-MTA: dns; mx.example.net
    diagnostic: str | None = None  # the remote reply -> Diagnostic-Code: smtp; <reply>
    last_attempt: float | None = None  # unix seconds
    will_retry_until: float | None = None  # unix seconds; "delayed" only (RFC 3464 2.3.9)


def should_notify(notify: tuple[str, ...] | None, action: str) -> bool:
    """RFC 3461 5.2: does this recipient's NOTIFY ask for a DSN about `action`?

    No NOTIFY: failures yes (5.2.6c), delays yes (5.2.5b, our choice of MAY),
    success never (5.2.3c). NEVER: nothing. Otherwise the keyword must be listed;
    "relayed" and "expanded" are success reports (5.2.2b, 5.2.7).
    """
    if action not in _NOTIFY_FOR_ACTION:
        raise ValueError(f"unknown DSN action {action!r}")
    if notify is None:
        return action in ("failed", "delayed")
    words = {word.upper() for word in notify}
    if "NEVER" in words:
        return False
    return _NOTIFY_FOR_ACTION[action] in words


def build_dsn(*, reporting_mta: str, original_sender: str, recipients: Sequence[DsnRecipient],
              original: bytes, arrival: float, now: float, envid: str | None = None,
              ret: str | None = None, queue_id: str | None = None,
              max_original_bytes: int = 100 * 1024) -> bytes:
    """One multipart/report DSN about `recipients` of the message `original`.

    The third part is the full original (message/rfc822) when some recipient failed
    and RET=FULL, or RET is absent and the original is at most `max_original_bytes`;
    otherwise only its header section (text/rfc822-headers): RET=HDRS, too large, no
    failure in this report (RFC 3461 6.2), or a line the original carries beyond 998
    octets (which no 8bit part may hold).
    """
    _check_arguments(reporting_mta, original_sender, recipients, ret)
    digest = _digest(reporting_mta, original_sender, recipients, arrival, now, envid, queue_id)
    failed = any(r.action == "failed" for r in recipients)

    returned_type, returned = _returned_part(original, ret, max_original_bytes, failed)
    text = _human_part(reporting_mta, recipients, returned_type == "message/rfc822")
    report = _report_part(reporting_mta, recipients, arrival, envid, queue_id)
    parts = [
        _part("text/plain; charset=" + ("us-ascii" if text.isascii() else "utf-8"),
              "Notification", text),
        _part("message/delivery-status", "Delivery report", report),
        _part(returned_type, "Undelivered message" if failed else "Original message", returned),
    ]
    boundary = _boundary(digest, parts)

    kind = "failed" if failed else "delayed" if any(r.action == "delayed" for r in recipients) else "success"
    mta = _one_line(reporting_mta)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        _field("To", f"<{_one_line(original_sender)}>"),
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{_compact_time(now)}.{digest[:16]}@{mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f"\tboundary=\"{boundary}\"",
    ]
    if not all(part.isascii() for part in parts):
        headers.append("Content-Transfer-Encoding: 8bit")
    out = ["\r\n".join(headers).encode("utf-8"), b"\r\n\r\n",
           b"This is a MIME-encapsulated delivery status notification (RFC 3464).\r\n"]
    for part in parts:
        out += [b"\r\n--", boundary.encode("ascii"), b"\r\n", part]
    out += [b"\r\n--", boundary.encode("ascii"), b"--\r\n"]
    return b"".join(out)


def _check_arguments(reporting_mta: str, sender: str, recipients: Sequence[DsnRecipient],
                     ret: str | None) -> None:
    # A DSN for the null sender would be a bounce of a bounce (RFC 3461 5.2): the
    # caller must never ask for one. Bad arguments are our bug: fail loudly.
    if not sender:
        raise ValueError("a DSN is never sent to the null sender")
    if not reporting_mta:
        raise ValueError("reporting_mta is empty")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if ret not in (None, "FULL", "HDRS"):
        raise ValueError(f"RET must be FULL, HDRS or None, not {ret!r}")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r} for {r.address}")
        if not _STATUS.fullmatch(r.status):
            raise ValueError(f"bad status {r.status!r} for {r.address}")
        if r.will_retry_until is not None and r.action != "delayed":
            raise ValueError(f"Will-Retry-Until is for a delayed recipient, not {r.action} ({r.address})")


def _digest(reporting_mta: str, sender: str, recipients: Sequence[DsnRecipient], arrival: float,
            now: float, envid: str | None, queue_id: str | None) -> str:
    """Seed of the Message-ID and boundary: a different report gives a different digest."""
    fields = [reporting_mta, sender, repr(arrival), repr(now), envid or "", queue_id or ""]
    for r in recipients:
        fields += [r.address, r.action, r.status]
    return hashlib.sha256("\0".join(fields).encode("utf-8", "surrogatepass")).hexdigest()


def _human_part(reporting_mta: str, recipients: Sequence[DsnRecipient], full: bool) -> bytes:
    actions = {r.action for r in recipients}
    paragraphs = [f"This is the mail system at host {_one_line(reporting_mta)}."]
    if "failed" in actions:
        paragraphs.append("Your message could not be delivered to one or more recipients. "
                          + ("It is attached below." if full else "Its header section is attached below."))
    if "delayed" in actions:
        paragraphs.append("Your message has not yet been delivered to one or more recipients. "
                          "The mail system will keep trying; you do not need to send it again. "
                          "You will be told if delivery finally fails.")
    if actions & SUCCESS_ACTIONS:
        paragraphs.append("Your message was delivered to or passed on for the recipients "
                          "listed below.")
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += textwrap.wrap(paragraph, 76, break_on_hyphens=False) + [""]
    for r in recipients:
        lines.append(f"<{_one_line(r.address)}>: {_VERDICTS[r.action]} ({r.status})")
        if r.diagnostic:
            who = f"{_one_line(r.remote_mta)} said:" if r.remote_mta else "The reply was:"
            lines += textwrap.wrap(who, 72, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False)
            for reply_line in _reply_lines(r.diagnostic):
                lines += textwrap.wrap(reply_line, 72, initial_indent="      ",
                                       subsequent_indent="      ", break_on_hyphens=False)
        lines.append("")
    return "\r\n".join(lines).encode("utf-8")


def _report_part(reporting_mta: str, recipients: Sequence[DsnRecipient], arrival: float,
                 envid: str | None, queue_id: str | None) -> bytes:
    fields = [_field("Reporting-MTA", f"dns; {reporting_mta}")]
    if envid is not None:
        fields.append(_field("Original-Envelope-Id", _graphic(envid)))  # decoded (RFC 3461 6.3a)
    if queue_id is not None:
        fields.append(_field("X-Queue-ID", queue_id))
    fields.append(f"Arrival-Date: {_date(arrival)}")
    blocks = ["".join(f + "\r\n" for f in fields)]
    for r in recipients:
        fields = []
        if r.orcpt is not None:
            fields.append(_field("Original-Recipient", _graphic(r.orcpt)))
        fields.append(_field("Final-Recipient", f"rfc822; {r.address}"))
        fields.append(f"Action: {r.action}")
        fields.append(f"Status: {r.status}")
        if r.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {r.remote_mta}"))
        if r.diagnostic:
            # RFC 3461 9.2: an exact transcription; each line of a multi-line reply
            # continues the field after a space.
            fields.append(_field("Diagnostic-Code", "smtp; " + "\r\n".join(_reply_lines(r.diagnostic))))
        if r.last_attempt is not None:
            fields.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.will_retry_until is not None:
            fields.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
        blocks.append("".join(f + "\r\n" for f in fields))
    return "\r\n".join(blocks).encode("utf-8")


def _returned_part(original: bytes, ret: str | None, max_bytes: int, failed: bool) -> tuple[str, bytes]:
    data = _LINE_BREAK_BYTES.sub(b"\r\n", original)
    full = failed and (ret == "FULL" or (ret is None and len(original) <= max_bytes))
    if full and _fits_8bit(data):
        return "message/rfc822", data
    return "text/rfc822-headers", _header_section(data)


def _fits_8bit(data: bytes) -> bool:
    """RFC 2045 2.8: 8bit data has no NUL and no line over 998 octets."""
    return b"\0" not in data and all(len(line) <= MAX_LINE_OCTETS for line in data.split(b"\r\n"))


def _header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    if data.startswith(b"\r\n"):
        return b""
    head = data if end < 0 else data[:end + 2]
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    head = head.replace(b"\0", b"?")
    lines = []
    for line in head.split(b"\r\n"):
        # An over-long header line is broken with a fold: wrong, but still parseable.
        while len(line) > MAX_LINE_OCTETS:
            lines.append(line[:MAX_LINE_OCTETS - 1])
            line = b" " + line[MAX_LINE_OCTETS - 1:]
        lines.append(line)
    return b"\r\n".join(lines)


def _part(content_type: str, description: str, content: bytes) -> bytes:
    headers = [f"Content-Type: {content_type}", f"Content-Description: {description}"]
    if not content.isascii():
        headers.append("Content-Transfer-Encoding: 8bit")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + content


def _boundary(digest: str, parts: list[bytes]) -> str:
    # "=_" never occurs in base64 or valid quoted-printable; the loop settles the rest.
    for attempt in range(1000):
        boundary = f"=_dsn_{digest[16:48]}" + (f"_{attempt}" if attempt else "")
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary
    raise AssertionError("no free MIME boundary after 1000 attempts")


def _field(name: str, value: str) -> str:
    """`Name: value`, folded before spaces near 78 octets and always within 998.

    Line breaks in `value` become folds, so unfolding (RFC 5322 2.2.3) gives back
    the value with each line break turned into the folding space. A word too long
    for one line is broken, adding a space.
    """
    segments = [s.strip(" \t") for s in _LINE_BREAK.split(_CONTROL.sub("?", value))]
    lines: list[str] = []
    current = f"{name}:"
    for index, segment in enumerate(s for s in segments if s):
        if index:
            lines.append(current)
            current = ""
        for chunk in re.findall(r"[ \t]*[^ \t]+", " " + segment):
            if _octets(current) + _octets(chunk) > FOLD_AT and current.strip() and current != f"{name}:":
                lines.append(current)
                current = ""
            current += chunk
            while _octets(current) > MAX_LINE_OCTETS:
                head, current = _split_octets(current, MAX_LINE_OCTETS)
                lines.append(head)
                current = " " + current
    lines.append(current)
    return "\r\n".join(lines)


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _split_octets(text: str, limit: int) -> tuple[str, str]:
    size = 0
    for index, char in enumerate(text):
        size += _octets(char)
        if size > limit:
            return text[:index], text[index:]
    return text, ""


def _reply_lines(reply: str) -> list[str]:
    return [line for line in (_CONTROL.sub("?", part).strip(" \t") for part in _LINE_BREAK.split(reply)) if line]


def _one_line(text: str) -> str:
    """No line breaks or controls in a value we paste into a header or sentence."""
    return _CONTROL.sub("?", _LINE_BREAK.sub(" ", text))


def _graphic(text: str) -> str:
    """Decoded ENVID/ORCPT text may hold any octet: controls go back to xtext (+XX)."""
    return "".join(f"+{ord(c):02X}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)


def _date(when: float) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(int(when), datetime.UTC))


def _compact_time(when: float) -> str:
    return datetime.datetime.fromtimestamp(int(when), datetime.UTC).strftime("%Y%m%d%H%M%S")
