"""mailq's layout, checked against listings captured from Postfix 3.7.11's `postqueue -p`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mta.mailq import lines

REFUSED = "connect to 127.0.0.1[127.0.0.1]:9: Connection refused"

# postqueue -p of a private Postfix 3.7.11 relaying to a closed port: two messages deferred.
POSTFIX_DEFERRED = """\
-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------
C651421118E     293 Mon Dec  7 03:15:51  alice@example.com
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                         bob@e2e.test
                                         carol@e2e.test

C8D8521118F    3308 Mon Dec  7 03:15:51  MAILER-DAEMON
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                         dave@e2e.test

-- 3 Kbytes in 2 Requests.
"""

# The same after `postsuper -h ALL` and one more (deferred) message: held ones are marked "!".
POSTFIX_HELD = """\
-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------
B668C210253   30375 Mon Dec  7 03:16:11  xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx@example.com
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                         eve@e2e.test

B0FF62115A5!     293 Mon Dec  7 03:16:07  alice@example.com
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                         bob@e2e.test
                                         carol@e2e.test

B1C622115A6!    3308 Mon Dec  7 03:16:07  MAILER-DAEMON
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                         dave@e2e.test

-- 33 Kbytes in 3 Requests.
"""


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The captures were made with TZ=UTC; mailq prints local time."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def entry(msgid: str, size: int, arrival: str, sender: str, *recipients: tuple[str, str, str | None]) -> dict[str, Any]:
    return {"id": msgid, "size": size, "arrival": f"2026-12-07T{arrival}.250Z", "sender": sender,
            "recipients": [{"address": a, "state": s, "last_reply": why} for a, s, why in recipients]}


def test_deferred_messages_look_exactly_as_postfix_lists_them() -> None:
    got = lines((), [
        entry("C651421118E", 293, "03:15:51", "alice@example.com",
              ("bob@e2e.test", "deferred", REFUSED), ("carol@e2e.test", "deferred", REFUSED)),
        entry("C8D8521118F", 3308, "03:15:51", "", ("dave@e2e.test", "deferred", REFUSED)),
    ])
    assert "\n".join(got) + "\n" == POSTFIX_DEFERRED


def test_held_messages_are_marked_as_postfix_marks_them() -> None:
    got = lines((), [
        entry("B668C210253", 30375, "03:16:11", "x" * 30 + "@example.com", ("eve@e2e.test", "deferred", REFUSED)),
        entry("B0FF62115A5", 293, "03:16:07", "alice@example.com",
              ("bob@e2e.test", "held", REFUSED), ("carol@e2e.test", "held", REFUSED)),
        entry("B1C622115A6", 3308, "03:16:07", "", ("dave@e2e.test", "held", REFUSED)),
    ])
    assert "\n".join(got) + "\n" == POSTFIX_HELD


def test_our_longer_ids_push_the_columns_as_postfix_long_ids_do_and_active_ones_get_a_star() -> None:
    got = list(lines([("0123456789abcdef0123456789abcdef", 1500, 1796613451.0, 1000)], [
        entry("66202A7D6D3CBBCD9465E", 263, "03:16:45", "root@mx.test", ("a@x.test", "active", None),
              ("b@x.test", "delivered", None), ("c@x.test", "ready", None),
              ("d@y.test", "deferred", "451 4.3.0 try later"), ("e@y.test", "deferred", "451 4.3.0 try later")),
    ]))
    assert got == [
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------",
        "0123456789abcdef0123456789abcdef    1500 Mon Dec  7 03:17:31  (maildrop queue, sender UID 1000)",
        "",
        "66202A7D6D3CBBCD9465E*     263 Mon Dec  7 03:16:45  root@mx.test",
        f"{'(451 4.3.0 try later)':>78}",
        " " * 41 + "d@y.test",
        " " * 41 + "e@y.test",
        " " * 41 + "a@x.test",
        " " * 41 + "c@x.test",
        "",
        "-- 1 Kbytes in 2 Requests.",
    ]


def test_an_empty_queue_says_so_and_a_long_reason_starts_at_the_margin() -> None:
    assert list(lines((), [])) == ["Mail queue is empty"]
    reason = "5" * 80
    got = list(lines((), [entry("X" * 21, 1, "00:00:00", "a@x.test", ("b@x.test", "deferred", reason))]))
    assert got[2] == f"({reason})" and got[-1] == "-- 0 Kbytes in 1 Request."
