"""Messages another node moved here with `mta queue transfer`: recognised, the field
removed, and a second copy of one logged as a duplicate.

The sending node puts `X-Mta-Transfer: id=<its queue id>; from=<its hostname>` on top of
the stored content (mta/queuetransfer.py). `strip` removes that field from what we store
(session.py build), so it never reaches a recipient, a bounce or a next node: what we
store is our Received field on the content the other node had stored, as it was
(signatures on it still verify). Removed at receipt rather than at final delivery: the
stored copy is what every path sends (SMTP, local mailboxes, DSNs quoting it, a transfer
onwards), and the stored size stays the size sent. `origin` reads the field from the
data as received. After our commit we remember each such id in
the shared cache (namespace `transfer`, REMEMBER_SECONDS, every inbound worker sees it)
and log `event=transferred_in msgid= origin_id= origin=`; an id seen before is logged
`event=transfer_duplicate` instead and counted: the sender was killed between our 250
and its delete, and sent the message again. The copy is kept and delivered (the
operator decides; at most one per interrupted transfer): nothing is dropped on a header
any client can write. The cache may evict an entry under pressure: detection is then
missed, never wrong.
"""

from __future__ import annotations

import re
import time
from typing import Final

from mtaqueue.cache_lmdb import LmdbCache

from mta import logs, metrics

HEADER: Final = b"X-Mta-Transfer"
REMEMBER_SECONDS: Final = 7 * 86400.0
HEAD_BYTES: Final = 65536  # the header is near the top: the next hop's Received only precedes it
_FIELD: Final = re.compile(rb"^X-Mta-Transfer:[ \t]*id=([0-9A-Z]{1,64});[ \t]*from=([^\r\n;]{1,255})\r?$",
                           re.IGNORECASE | re.MULTILINE)
_NAME: Final = HEADER.lower() + b":"  # in every _FIELD match, as bytes.lower() (ASCII, as IGNORECASE on bytes) has it


def _find(body: bytes) -> re.Match[bytes] | None:
    """The topmost X-Mta-Transfer field in the header of `body`."""
    head = body[:HEAD_BYTES]
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[:end + 2]
    if _NAME not in head.lower():  # the usual message: no regular expression over its header
        return None
    return _FIELD.search(head)


def origin(body: bytes) -> tuple[str, str] | None:
    """(origin id, origin host) of the topmost X-Mta-Transfer field of the header, or None."""
    found = _find(body)
    return (found.group(1).decode("ascii"), found.group(2).decode("utf-8", "replace").strip()) if found else None


def strip(data: bytes) -> bytes:
    """`data` without X-Mta-Transfer fields in its header (the one `origin` reads, and any
    other: one that came with the message from a client); as it was when there is none."""
    while (found := _find(data)) is not None:
        data = _without(data, found)
    return data


def _without(data: bytes, found: re.Match[bytes]) -> bytes:
    """`data` without the field `found` and its folded lines."""
    end = found.end()
    while True:  # the line break, then continuation lines (starting with a space or tab)
        newline = data.find(b"\n", end)
        if newline < 0:
            return data[:found.start()]
        end = newline + 1
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[:found.start()] + data[end:]


def note(cache: LmdbCache, body: bytes, msgid: str) -> None:
    """After the commit of `msgid`: log a transferred message, or its duplicate."""
    seen = origin(body)
    if seen is None:
        return
    origin_id, origin_host = seen
    key = f"{origin_host} {origin_id}"
    copies = cache.update("transfer", key, lambda old: (old or 0) + 1, REMEMBER_SECONDS, time.time())
    if copies and copies > 1:
        metrics.INBOUND_TRANSFER_DUPLICATES.inc()
        logs.event("transfer_duplicate", msgid=msgid, origin_id=origin_id, origin=origin_host, copies=copies)
    else:
        logs.event("transferred_in", msgid=msgid, origin_id=origin_id, origin=origin_host)
