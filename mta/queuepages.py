"""Pages of the queue listing: the messages `mta queue list` and GET /api/queue select,
in arrival order, a bounded batch at a time.

A Selection holds a listing's filters. On the message: `sender` (a substring of the
sender address, any case). On one recipient, all at once: `domain` (its destination, by
queueops.destination_of's rule), `state` (ready | deferred | held | active, after the
scheduler's in-flight overlay: queueview.mark_active), `recipient` (a substring of its
address, any case). A message is listed whole when one of its recipients passes every
recipient filter.

read_page reads the spool's page() from a position (ids grow with arrival; with a
domain, through the spool's by-destination index, so other domains are never read) and
stops at `limit` matches or after `max_scan` messages read: one request costs a bounded
time whatever its filters, and its `after` is where the next page starts (None: the
end). State `active` reads only the messages of the scheduler's in-flight map (bounded
by its active set). A cursor is that position with the filters, base64url: opaque to
the client, refused when it does not decode.

Invariants: at most max(limit, max_scan) + SPOOL_BATCH envelopes in memory; pages in
order, none repeated or skipped (a message that arrives meanwhile has a larger id: it
comes later). No clock reads; I/O only through the spool given.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from mta import queueops, queueview
from mtaqueue.backend import QueueBackend
from mtaqueue.ids import MessageId, is_id
from mtaqueue.records import Envelope, Recipient

STATES: Final = ("ready", "deferred", "held", "active")
SPOOL_BATCH: Final = 500  # envelopes per read transaction
MAX_FILTER_CHARS: Final = 320
CURSOR_FORM: Final = "q1"  # the first item of every cursor; another form is not one of ours

Active = Mapping[str, Sequence[int]]  # messages.ActiveJobs.active: id -> recipient indices in a session


class SelectionError(ValueError):
    """A filter or a cursor the operator must fix; the message says how."""


@dataclass(frozen=True, slots=True)
class Selection:
    domain: str | None = None
    state: str | None = None
    sender: str | None = None  # lowercase
    recipient: str | None = None  # lowercase

    @classmethod
    def of(cls, domain: str | None = None, state: str | None = None, sender: str | None = None,
           recipient: str | None = None) -> Selection:
        """The filters as given by an operator, checked and normalized (SelectionError)."""
        if state is not None and state not in STATES:
            raise SelectionError(f"state must be one of {', '.join(STATES)}, not {state[:40]!r}")
        for name, value in (("domain", domain), ("sender", sender), ("recipient", recipient)):
            if value is not None and not 0 < len(value) <= MAX_FILTER_CHARS:
                raise SelectionError(f"{name} must be 1 to {MAX_FILTER_CHARS} characters")
        return cls(queueops.destination_of("@" + domain) if domain is not None else None, state,
                   sender.lower() if sender is not None else None,
                   recipient.lower() if recipient is not None else None)

    @property
    def filters(self) -> dict[str, str]:
        """The filters that are set, by name (the admin API's query parameters)."""
        named = {"domain": self.domain, "state": self.state, "sender": self.sender, "recipient": self.recipient}
        return {name: value for name, value in named.items() if value is not None}

    def matches(self, e: Envelope) -> bool:
        if self.sender is not None and self.sender not in e.sender.lower():
            return False
        if self.domain is None and self.state is None and self.recipient is None:
            return True
        return any(self._takes(r) for r in e.recipients)

    def _takes(self, r: Recipient) -> bool:
        return ((self.state is None or r.state == self.state)
                and (self.domain is None or queueops.destination_of(r.address) == self.domain)
                and (self.recipient is None or self.recipient in r.address.lower()))


@dataclass(frozen=True, slots=True)
class Page:
    envelopes: list[Envelope]  # in arrival order, in-flight recipients marked "active"
    after: MessageId | None  # the next page starts after this id; None: nothing is left


def read_page(spool: QueueBackend, selection: Selection, active: Active, after: MessageId | None,
              limit: int, max_scan: int) -> Page:
    """Up to `limit` messages of `selection` with ids above `after`, reading at most
    max(limit, max_scan) messages of the spool."""
    if selection.state == "active":
        return _active_page(spool, selection, active, after, limit)
    max_scan = max(max_scan, limit)
    found: list[Envelope] = []
    scanned, position = 0, after
    while scanned < max_scan:
        want = min(SPOOL_BATCH, max_scan - scanned)
        batch = spool.page(position, want, selection.domain)
        for e in batch:
            scanned, position = scanned + 1, e.id
            queueview.mark_active((e,), active)
            if selection.matches(e):
                found.append(e)
                if len(found) == limit:
                    more = spool.ids(position, 1, selection.domain)
                    return Page(found, position if more else None)
        if len(batch) < want:
            return Page(found, None)
    return Page(found, position)


def _active_page(spool: QueueBackend, selection: Selection, active: Active, after: MessageId | None,
                 limit: int) -> Page:
    """State `active`: only the scheduler knows, and its in-flight map is small."""
    candidates = sorted(msgid for msgid in active if after is None or msgid > after)
    found: list[Envelope] = []
    for n, msgid in enumerate(candidates):
        e = spool.envelope(MessageId(msgid))
        if e is None:  # delivered and deleted since the scheduler answered
            continue
        queueview.mark_active((e,), active)
        if selection.matches(e):
            found.append(e)
            if len(found) == limit:
                return Page(found, e.id if n + 1 < len(candidates) else None)
    return Page(found, None)


def batches(spool: QueueBackend, selection: Selection, active: Active,
            after: MessageId | None = None) -> Iterator[list[Envelope]]:
    """Every message of `selection` (with an id above `after`), a non-empty batch at a
    time (at most SPOOL_BATCH)."""
    while True:
        page = read_page(spool, selection, active, after, SPOOL_BATCH, SPOOL_BATCH)
        if page.envelopes:
            yield page.envelopes
        if page.after is None:
            return
        after = page.after


def encode_cursor(selection: Selection, after: MessageId) -> str:
    raw = json.dumps([CURSOR_FORM, after, selection.domain, selection.state, selection.sender,
                      selection.recipient], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str) -> tuple[Selection, MessageId]:
    """The filters and the position of a cursor encode_cursor made (SelectionError if not one)."""
    refused = SelectionError("not a cursor of this listing: use the next_cursor of the previous page, "
                             "or start again without one")
    try:
        form, after, *filters = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, binascii.Error):  # (JSON and UTF-8 errors are ValueErrors)
        raise refused from None
    if (form != CURSOR_FORM or type(after) is not str or not is_id(after) or len(filters) != 4
            or not all(f is None or type(f) is str for f in filters)):
        raise refused
    return Selection.of(*filters), MessageId(after)
