"""Whether a Sieve vacation action (RFC 5230) answers a message, and the reply it sends.

No reply (check_vacation says why): to the null sender or one that is a list or daemon
(MAILER-DAEMON, LISTSERV, majordomo, owner-*, *-request; RFC 5230 4.6), to mail that is
Auto-Submitted (anything but "no"; RFC 3834 5), that carries List-* fields or Precedence
bulk/list/junk, that comes from the mailbox itself, or whose To/Cc/Bcc (and Resent-*) name
none of the user's addresses (envelope recipient, the mailbox's addresses, :addresses;
RFC 5230 4.5). "Once per sender per :days" is the caller's record, keyed by Reply.handle
and Reply.to.

The reply (RFC 5230 5, RFC 3834 3): to the envelope sender, From :from or the envelope
recipient, Subject :subject or "Auto: " and the original subject, In-Reply-To and
References from the original Message-ID, Auto-Submitted: auto-replied, a Date and a
Message-ID; the reason as a UTF-8 text/plain body, or as the whole MIME entity with :mime.
The caller sends it with the null envelope sender <>. Pure: `now` and `hostname` are given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from email import quoprimime
from email.header import Header
from email.utils import formataddr, formatdate, getaddresses, parseaddr
from typing import Final

from mta.sieve.actions import Vacation
from mta.sieve.message import MessageView

DAEMON_LOCALPARTS: Final = frozenset({"mailer-daemon", "listserv", "majordomo"})
BULK_PRECEDENCE: Final = frozenset({"bulk", "list", "junk"})
RECIPIENT_FIELDS: Final = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
LIST_FIELDS: Final = ("list-id", "list-help", "list-subscribe", "list-unsubscribe", "list-post",
                      "list-owner", "list-archive")


@dataclass(frozen=True, slots=True)
class Reply:
    to: str          # the envelope recipient of the reply: the original envelope sender
    handle: str      # :handle, else derived from reason, :subject, :from (RFC 5230 4.2)
    days: int        # at most one reply to `to` for this handle in this many days
    content: bytes   # the whole reply message, CRLF


def check_vacation(action: Vacation, envelope_from: str, envelope_to: str, mailbox_addresses: tuple[str, ...],
                   message: bytes) -> str | None:
    """Why no reply may be sent, or None when one may."""
    sender = _bare(envelope_from).lower()
    if not sender:
        return "the sender is <>"
    local = sender.rpartition("@")[0] or sender
    if local in DAEMON_LOCALPARTS or local.startswith("owner-") or local.endswith("-request"):
        return f"the sender {sender} is a list or a daemon"
    view = MessageView(message)
    auto = [v.split(";")[0].strip().lower() for v in view.raw("auto-submitted")]
    if any(v != "no" for v in auto):
        return "the message is Auto-Submitted"
    if any(view.has(name) for name in LIST_FIELDS):
        return "the message comes from a mailing list (List-* fields)"
    if any(v.strip().lower() in BULK_PRECEDENCE for v in view.raw("precedence")):
        return "the message has Precedence bulk, list or junk"
    own = {_bare(a).lower() for a in (envelope_to, *mailbox_addresses, *action.addresses)} - {""}
    if sender in own:
        return "the message comes from the mailbox itself"
    named = {a.lower() for f in RECIPIENT_FIELDS for a in view.addresses(f)}
    if not own & named:
        return "none of the mailbox's addresses is in To, Cc or Bcc"
    return None


def vacation_reply(action: Vacation, envelope_from: str, envelope_to: str, mailbox_addresses: tuple[str, ...],
                   message: bytes, hostname: str, now: float) -> Reply | None:
    """The reply to send, or None when RFC 5230 and RFC 3834 say not to reply."""
    if check_vacation(action, envelope_from, envelope_to, mailbox_addresses, message) is not None:
        return None
    sender = _bare(envelope_from)
    handle = vacation_handle(action)
    view = MessageView(message)
    subject = action.subject if action.subject is not None else _auto_subject(view)
    message_id = hashlib.sha256(f"{handle}\0{sender}\0{now!r}".encode()).hexdigest()[:32]
    fields = [
        ("From", _encode_address(action.from_) if action.from_ else _bare(envelope_to)),
        ("To", sender),
        ("Subject", _encode("Subject", subject)),
        ("Date", formatdate(now, usegmt=True)),
        ("Message-ID", f"<{message_id}.vacation@{hostname}>"),
        ("Auto-Submitted", "auto-replied"),
    ]
    original = (view.raw("message-id") or [""])[0]
    if original:
        previous = (view.raw("references") or view.raw("in-reply-to") or [""])[0]
        fields += [("In-Reply-To", original), ("References", f"{previous} {original}".strip())]
    fields.append(("MIME-Version", "1.0"))
    if action.mime:
        entity_fields, body = _entity(action.reason)
        fields += entity_fields
    else:
        fields += [("Content-Type", "text/plain; charset=utf-8")]
        cte, body = _text_body(action.reason)
        fields.append(("Content-Transfer-Encoding", cte))
    head = "".join(_field(name, _one_line(value)) for name, value in fields)
    return Reply(sender, handle, action.days, (head + "\r\n" + body).encode("utf-8"))


def vacation_handle(action: Vacation) -> str:
    if action.handle is not None:
        return action.handle
    key = "\0".join((action.reason, action.subject or "", action.from_ or "", str(action.mime)))
    return "auto-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _bare(address: str) -> str:
    """The addr-spec of an envelope address or an RFC 5322 address ("" for <>)."""
    address = address.strip()
    if not address or address == "<>":
        return ""
    pairs = getaddresses([address])
    return pairs[0][1] if pairs and pairs[0][1] else address.strip("<>")


def _auto_subject(view: MessageView) -> str:
    original = (view.values("subject") or [""])[0].strip()
    return f"Auto: {original}" if original else "Automated reply"


def _encode(name: str, text: str) -> str:
    text = _one_line(text)
    return text if text.isascii() else Header(text, "utf-8", header_name=name).encode(linesep=" ")


def _encode_address(text: str) -> str:
    """A :from as a From field: a non-ASCII display name RFC 2047 encoded."""
    name, addr = parseaddr(_one_line(text))
    return formataddr((name, addr), charset="utf-8") if name else addr


def _field(name: str, value: str) -> str:
    """One header field, folded at spaces to lines of about 78 characters (a long
    References chain would otherwise pass RFC 5322's 998)."""
    if len(name) + 2 + len(value) <= 78:
        return f"{name}: {value}\r\n"
    lines = [f"{name}:"]
    for word in value.split():
        if len(lines[-1]) + 1 + len(word) > 78 and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += " " + word
    return "\r\n".join(lines) + "\r\n"


def _one_line(value: str) -> str:
    """No CR or LF from a script or a header may start a new field in the reply."""
    return " ".join(value.replace("\r", "\n").split("\n"))


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


def _text_body(reason: str) -> tuple[str, str]:
    text = _crlf(reason)
    if not text.endswith("\r\n"):
        text += "\r\n"
    if text.isascii():
        return "7bit", text
    raw = text.replace("\r\n", "\n").encode("utf-8").decode("latin-1")
    return "quoted-printable", _crlf(quoprimime.body_encode(raw))


def _entity(reason: str) -> tuple[list[tuple[str, str]], str]:
    """A :mime reason: its Content-* fields (unfolded) and its body."""
    text = _crlf(reason).lstrip("\r\n")
    head, sep, body = text.partition("\r\n\r\n")
    if not sep:  # no blank line: all fields, or a body that forgot its fields
        head, body = (text, "") if ":" in text.split("\r\n")[0] else ("", text)
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    fields = [(n, v) for n, v in fields if n.lower().startswith("content-")]  # never From, To, ...
    if not any(n.lower() == "content-type" for n, _ in fields):
        fields.append(("Content-Type", "text/plain; charset=utf-8"))
    return fields, body if body.endswith("\r\n") or not body else body + "\r\n"
