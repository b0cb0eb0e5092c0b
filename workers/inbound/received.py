"""The Received header we prepend to every accepted message (RFC 5321 4.4, RFC 5322 3.6.7).

    Received: from client.example ([192.0.2.1])
            (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
            by mx.example (mta) with ESMTPS id 18C2B3A4F5E6D7A8B9C0D1E2F;
            Sun, 29 Nov 2026 06:43:03 +0000

Mail a local program left in the maildrop (workers/inbound/pickup.py) says who submitted
it, by the uid that owns its file, as Postfix's pickup does:

    Received: by mx.example (mta, from local uid 1000)
            id 18C2B3A4F5E6D7A8B9C0D1E2F; Sun, 29 Nov 2026 06:43:03 +0000

`for <rcpt>` is added only for a single recipient, so a copy never discloses the
others. The HELO name is the client's claim: sanitised, never trusted. The TLS
comment keeps its balanced parentheses (RFC 5322 3.2.2: comments nest); anything
else that could end the comment or the field (an unmatched parenthesis, a backslash,
a control character, `<>;"`) becomes "?".
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import time
import re

from mtaqueue.ids import MessageId

_date_cache: tuple[int, str] = (0, "")


def received_header(*, helo: str | None, client_ip: str, hostname: str, protocol: str,
                    msgid: MessageId, recipients: list[str], tls: str = "") -> bytes:
    claimed = _clean(helo or "unknown")
    for_clause = f"\r\n\tfor <{_clean(recipients[0])}>" if len(recipients) == 1 else ""
    tls_comment = f"\r\n\t(using {_comment_text(tls)})" if tls else ""
    return (
        f"Received: from {claimed} ([{client_ip}]){tls_comment}\r\n"
        f"\tby {hostname} (mta) with {protocol} id {msgid}{for_clause};\r\n"
        f"\t{_rfc5322_now()}\r\n"
    ).encode("utf-8")


def local_received_header(*, uid: int, hostname: str, msgid: MessageId, recipients: list[str]) -> bytes:
    for_clause = f"\r\n\tfor <{_clean(recipients[0])}>" if len(recipients) == 1 else ""
    return (
        f"Received: by {hostname} (mta, from local uid {uid})\r\n"
        f"\tid {msgid}{for_clause};\r\n"
        f"\t{_rfc5322_now()}\r\n"
    ).encode("utf-8")


_UNSAFE = re.compile(r'[()<>;\\"]')


def _clean(text: str) -> str:
    text = text[:255]
    if text.isprintable() and _UNSAFE.search(text) is None:
        return text  # the usual HELO name, as is: no per-character pass
    return "".join(c if c.isprintable() and c not in "()<>;\\\"" else "?" for c in text)


@functools.lru_cache(maxsize=64)  # one per cipher suite: the same few strings all day
def _comment_text(text: str) -> str:
    """`text` cleaned for inside a comment: the parentheses that pair up are kept."""
    text = text[:255]
    opened: list[int] = []
    paired: set[int] = set()
    for i, c in enumerate(text):
        if c == "(":
            opened.append(i)
        elif c == ")" and opened:
            paired.update((opened.pop(), i))
    return "".join(c if i in paired else _clean(c) for i, c in enumerate(text))


def _rfc5322_now() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC)))
    return _date_cache[1]
