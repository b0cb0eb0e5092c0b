"""`mta queue shape` (mta/queueshape.py): messages by destination and age, from the
spool's by-destination index of a real LMDB spool whose ids carry chosen arrivals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import queueshape
from tests.mta.queuefill import message, spool

NOW = 1_700_000_000.0
MINUTE = 60.0


@pytest.mark.parametrize("minutes, bucket", [(0, 0), (4.99, 0), (5, 1), (9.9, 1), (10, 2), (39, 3), (40, 4), (1279.9, 8),
                                             (1280, 9), (100_000, 9), (-3, 0)])
def test_bucket_bounds_are_qshapes(minutes: float, bucket: int) -> None:
    assert queueshape.bucket(minutes * MINUTE) == bucket


def test_the_table_from_the_spools_index(tmp_path: Path) -> None:
    ages = {  # minutes old -> recipients
        1: [("a@big.test", "deferred"), ("b@big.test", "deferred"), ("c@small.test", "ready")],  # big once
        2: [("a@big.test", "held")],
        7: [("a@big.test", "deferred")],
        30: [("z@small.test", "deferred")],
        3000: [("a@big.test", "deferred"), ("x@gone.test", "delivered")],  # delivered: not queued
        3001: [("a@big.test", "bounced")],  # finished: in no destination
    }
    messages = [message(NOW - m * MINUTE, n, rcpts) for n, (m, rcpts) in enumerate(ages.items())]
    backend = spool(tmp_path / "q", messages)
    try:
        shape = queueshape.count(backend.by_destination(), NOW + 10)  # (a few seconds later: same buckets)
    finally:
        backend.close()
    assert queueshape.table(shape) == [
        "           T 5 10 20 40 80 160 320 640 1280 1280+",
        "     TOTAL 6 3  1  0  1  0   0   0   0    0     1",
        "  big.test 4 2  1  0  0  0   0   0   0    0     1",
        "small.test 2 1  0  0  1  0   0   0   0    0     0",
    ]
    assert queueshape.as_json(shape) == {
        "bucket_minutes": [5, 10, 20, 40, 80, 160, 320, 640, 1280, None],
        "total": {"messages": 6, "buckets": [3, 1, 0, 1, 0, 0, 0, 0, 0, 1]},
        "destinations": [{"destination": "big.test", "messages": 4, "buckets": [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]},
                         {"destination": "small.test", "messages": 2, "buckets": [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]}],
    }


def test_an_empty_queue_has_the_heading_and_a_zero_total() -> None:
    assert queueshape.table(queueshape.count([], NOW)) == [
        "      T 5 10 20 40 80 160 320 640 1280 1280+",
        "TOTAL 0 0  0  0  0  0   0   0   0    0     0",
    ]
