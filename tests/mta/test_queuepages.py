"""Listing pages (mta/queuepages.py) over a real LMDB spool: the filters, arrival order,
cursors that neither repeat nor skip, and the bound on what one page reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import queuepages
from mta.queuepages import Selection, SelectionError
from mtaqueue.backend_lmdb import LmdbBackend
from tests.mta.queuefill import message, msgid, spool

T0 = 1_700_000_000.0


@pytest.fixture
def mixed(tmp_path: Path) -> LmdbBackend:
    """1,200 messages: every third to x.test (ready), the others y.test (deferred) and
    Z.Test. (held), one sender in ten from Boss@corp.test; message 1199 is also at rare.test."""
    messages = []
    for n in range(1200):
        rcpts = [("a@x.test", "ready")] if n % 3 == 0 else [("b@y.test", "deferred"), (f"c{n}@Z.Test.", "held")]
        if n == 1199:
            rcpts.append(("d@rare.test", "deferred"))
        messages.append(message(T0 + n, n, rcpts, sender="Boss@Corp.test" if n % 10 == 0 else "s@client.test"))
    backend = spool(tmp_path / "q", messages)
    yield backend
    backend.close()


def all_pages(backend: LmdbBackend, selection: Selection, limit: int, max_scan: int,
              active: dict[str, tuple[int, ...]] | None = None) -> tuple[list[str], int]:
    """The ids of every page in turn, and how many pages it took."""
    ids: list[str] = []
    after, pages = None, 0
    while True:
        page = queuepages.read_page(backend, selection, active or {}, after, limit, max_scan)
        pages += 1
        assert len(page.envelopes) <= limit
        ids += [e.id for e in page.envelopes]
        if page.after is None:
            return ids, pages
        after = page.after


def test_pages_follow_arrival_order_without_repeats_or_gaps(mixed: LmdbBackend) -> None:
    ids, pages = all_pages(mixed, Selection(), limit=100, max_scan=100)
    assert ids == [msgid(T0 + n, n) for n in range(1200)]
    assert pages == 12  # the last full page knows it is the last: next_cursor null, no empty page after


def test_recipient_filters_hold_for_one_recipient(mixed: LmdbBackend) -> None:
    held_at_z = Selection.of(domain="z.test", state="held")
    assert len(all_pages(mixed, held_at_z, 50, 50)[0]) == 800
    assert all_pages(mixed, Selection.of(domain="z.test.", state="deferred"), 50, 50)[0] == []  # no recipient is both
    assert all_pages(mixed, Selection.of(domain="RARE.test"), 50, 50)[0] == [msgid(T0 + 1199, 1199)]
    c11 = [msgid(T0 + n, n) for n in range(1200) if n % 3 and str(n).startswith("11")]  # c11@, c110@...
    assert all_pages(mixed, Selection.of(recipient="C11"), 50, 50)[0] == c11
    assert len(all_pages(mixed, Selection.of(sender="boss@CORP"), 50, 50)[0]) == 120
    both = all_pages(mixed, Selection.of(sender="boss", state="ready"), 50, 50)[0]
    assert both == [msgid(T0 + n, n) for n in range(0, 1200, 30)]


def test_a_page_reads_at_most_max_scan_messages_and_says_where_to_go_on(mixed: LmdbBackend) -> None:
    only_last = Selection.of(recipient="d@rare")
    first = queuepages.read_page(mixed, only_last, {}, None, limit=10, max_scan=500)
    assert first.envelopes == [] and first.after == msgid(T0 + 499, 499)
    ids, pages = all_pages(mixed, only_last, limit=10, max_scan=500)
    assert ids == [msgid(T0 + 1199, 1199)] and pages == 3


def test_state_active_reads_only_the_schedulers_in_flight_messages(mixed: LmdbBackend) -> None:
    active = {msgid(T0 + 3, 3): (0,), msgid(T0 + 6, 6): (0,), msgid(T0 + 1, 1): (0,), "0" * 21: (0,)}
    # message 1's recipient 0 is deferred: in a session's job, yet not "active" (only ready ones are)
    ids, _ = all_pages(mixed, Selection.of(state="active"), 1, 1, active)
    assert ids == [msgid(T0 + 3, 3), msgid(T0 + 6, 6)]  # and an id no longer in the spool is left out
    page = queuepages.read_page(mixed, Selection.of(state="ready"), active, None, 2, 10)
    assert [e.id for e in page.envelopes] == [msgid(T0, 0), msgid(T0 + 9, 9)]  # 3 and 6 are active now
    assert page.envelopes[0].recipients[0].state == "ready"


def test_batches_give_every_match_a_bounded_batch_at_a_time(mixed: LmdbBackend) -> None:
    seen = []
    for batch in queuepages.batches(mixed, Selection.of(domain="y.test"), {}):
        assert 0 < len(batch) <= queuepages.SPOOL_BATCH
        seen += [e.id for e in batch]
    assert seen == [msgid(T0 + n, n) for n in range(1200) if n % 3]
    after = msgid(T0 + 1000, 1000)
    rest = [e.id for b in queuepages.batches(mixed, Selection(), {}, after) for e in b]
    assert rest == [msgid(T0 + n, n) for n in range(1001, 1200)]


def test_a_cursor_carries_the_position_and_the_filters() -> None:
    selection = Selection.of(domain="X.Test", state="held", sender="Boss", recipient=None)
    cursor = queuepages.encode_cursor(selection, msgid(T0, 7))
    assert cursor.replace("-", "").replace("_", "").isalnum()  # base64url: safe in a query string as is
    assert queuepages.decode_cursor(cursor) == (selection, msgid(T0, 7))
    assert selection.filters == {"domain": "x.test", "state": "held", "sender": "boss"}


@pytest.mark.parametrize("text", ["", "garbage!", "WyJxMSJd", "eyJhIjogMX0", "WyJxOSIsIjAwMDAwMDAwMDAwMDAwMDAwMDAwMCIsbnVsbCxudWxsLG51bGwsbnVsbF0"])
def test_a_cursor_not_made_here_is_refused(text: str) -> None:
    with pytest.raises(SelectionError, match="not a cursor"):
        queuepages.decode_cursor(text)


@pytest.mark.parametrize("kwargs, error", [({"state": "frozen"}, "state must be one of"),
                                           ({"domain": ""}, "domain must be 1 to"),
                                           ({"sender": "x" * 321}, "sender must be 1 to")])
def test_bad_filters_say_what_to_change(kwargs: dict[str, str], error: str) -> None:
    with pytest.raises(SelectionError, match=error):
        Selection.of(**kwargs)
