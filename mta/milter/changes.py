"""A message as milters see it, and the milters' modifications applied to it.

Message holds the envelope (sender, ESMTP arguments, recipients) and the content
split into headers and body. `apply_modifications` is pure: the old Message in, a
new one out, with libmilter's (sendmail's) rules for header indexes:
- ChangeHeader index is 1-based among the headers of that name (case-insensitive);
  an empty value deletes that occurrence; past the last occurrence, a non-empty
  value is added at the end (smfi_chgheader).
- InsertHeader index is a 0-based position among all headers; past the end it
  appends (smfi_insheader).
- ReplaceBody pieces are joined in order and replace the whole body.
- Recipients compare without angle brackets and case-insensitively; adding one
  already present changes nothing.

Header values are kept as they follow the colon, without its one leading space, with
folding as CRLF; milters see and send folding as LF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from mta.milter.protocol import (
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    ReplaceBody,
)


@dataclass(frozen=True, slots=True)
class Message:
    sender: str  # without angle brackets; "" for the null sender
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes  # CRLF line ends, as received
    sender_args: tuple[str, ...] = ()  # ESMTP MAIL parameters, "KEY=value"
    quarantine: str | None = None  # the reason, once a milter quarantined it

    @classmethod
    def parse(cls, content: bytes, sender: str, recipients: Sequence[str],
              sender_args: tuple[str, ...] = ()) -> Message:
        """Split RFC 5322 content (CRLF line ends) into headers and body."""
        head, sep, body = content.partition(b"\r\n\r\n")
        if not sep:
            head, body = (content, b"") if b":" in content.split(b"\r\n", 1)[0] else (b"", content)
        headers: list[tuple[str, str]] = []
        for line in head.decode("utf-8", "surrogateescape").split("\r\n") if head else ():
            if line[:1] in (" ", "\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + "\r\n" + line)
            elif ":" in line:
                name, _, value = line.partition(":")
                headers.append((name, value.removeprefix(" ")))
        return cls(sender, tuple(recipients), tuple(headers), body, sender_args)

    def content(self) -> bytes:
        """The message as RFC 5322 content again."""
        head = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + self.body


def _bare(address: str) -> str:
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def _from_milter(value: str) -> str:
    """A header value from a milter: LF folding becomes CRLF, no leading space kept."""
    return value.replace("\r\n", "\n").replace("\n", "\r\n").lstrip(" ")


def apply_modifications(message: Message, mods: Sequence[Modification]) -> Message:
    headers = list(message.headers)
    recipients = list(message.recipients)
    sender, sender_args = message.sender, message.sender_args
    new_body: list[bytes] | None = None
    quarantine = message.quarantine
    for mod in mods:
        if isinstance(mod, AddHeader):
            headers.append((mod.name, _from_milter(mod.value)))
        elif isinstance(mod, InsertHeader):
            headers.insert(min(mod.index, len(headers)), (mod.name, _from_milter(mod.value)))
        elif isinstance(mod, ChangeHeader):
            _change_header(headers, mod)
        elif isinstance(mod, ReplaceBody):
            new_body = (new_body or []) + [mod.chunk]
        elif isinstance(mod, ChangeFrom):
            sender, sender_args = _bare(mod.sender), tuple(mod.args.split())
        elif isinstance(mod, AddRecipient):
            rcpt = _bare(mod.recipient)
            if rcpt.casefold() not in (r.casefold() for r in recipients):
                recipients.append(rcpt)
        elif isinstance(mod, DeleteRecipient):
            gone = _bare(mod.recipient).casefold()
            recipients = [r for r in recipients if r.casefold() != gone]
        elif isinstance(mod, Quarantine):
            quarantine = mod.reason
    body = message.body if new_body is None else b"".join(new_body)
    return replace(message, sender=sender, sender_args=sender_args, recipients=tuple(recipients),
                   headers=tuple(headers), body=body, quarantine=quarantine)


def _change_header(headers: list[tuple[str, str]], mod: ChangeHeader) -> None:
    name = mod.name.casefold()
    seen = 0
    for position, (existing, _) in enumerate(headers):
        if existing.casefold() == name:
            seen += 1
            if seen == max(mod.index, 1):
                if mod.value:
                    headers[position] = (existing, _from_milter(mod.value))
                else:
                    del headers[position]
                return
    if mod.value:
        headers.append((mod.name, _from_milter(mod.value)))
