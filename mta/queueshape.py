"""`mta queue shape`: queued messages by destination and age, Postfix qshape's table.

Counted from the spool's by-destination index alone (by_destination(): destination and
message id, no envelope decoded): a message is counted once per destination where it
has a queued (ready, deferred or held) recipient, and its age is now minus its arrival,
which is the time part of its id (mtaqueue/ids.py). Buckets, in minutes, as qshape's:
0-5, 5-10, 10-20, 20-40, 40-80, 80-160, 160-320, 320-640, 640-1280, older; an age on
a bound goes to the older bucket. A message from the future (the clock stepped back)
counts as 0 minutes old.

Memory: one row of counts per destination, whatever the number of messages.
Pure: pass the pairs and `now`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

BUCKET_MINUTES: Final = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # upper bounds; then older
_BOUNDS_SECONDS: Final = tuple(60.0 * m for m in BUCKET_MINUTES)
HEADINGS: Final = ("T", *map(str, BUCKET_MINUTES), f"{BUCKET_MINUTES[-1]}+")
TOTAL: Final = "TOTAL"


def arrival_of(msgid: str) -> float:
    """The arrival of a message: its id's first 13 hex digits are microseconds since the epoch."""
    return int(msgid[:13], 16) / 1_000_000


def bucket(age_seconds: float) -> int:
    """The bucket of an age: 0 for under 5 minutes ... len(BUCKET_MINUTES) for older."""
    return bisect.bisect_right(_BOUNDS_SECONDS, age_seconds)


@dataclass
class Shape:
    now: float
    rows: dict[str, list[int]] = field(default_factory=dict)  # destination -> messages per bucket
    total: list[int] = field(default_factory=lambda: [0] * (len(BUCKET_MINUTES) + 1))

    def add(self, destination: str, msgid: str) -> None:
        b = bucket(self.now - arrival_of(msgid))
        row = self.rows.get(destination)
        if row is None:
            row = self.rows[destination] = [0] * (len(BUCKET_MINUTES) + 1)
        row[b] += 1
        self.total[b] += 1

    def ordered(self) -> list[tuple[str, list[int]]]:
        """Destinations by messages, most first (then by name), as qshape sorts them."""
        return sorted(self.rows.items(), key=lambda item: (-sum(item[1]), item[0]))


def count(pairs: Iterable[tuple[str, str]], now: float) -> Shape:
    shape = Shape(now)
    for destination, msgid in pairs:
        shape.add(destination, msgid)
    return shape


def table(shape: Shape) -> list[str]:
    """qshape's layout: a heading line, then TOTAL, then one line per destination;
    the first column is the row's total, each column right-aligned to its widest cell."""
    rows = [("", list(HEADINGS)), (TOTAL, _cells(shape.total))]
    rows += [(dest, _cells(counts)) for dest, counts in shape.ordered()]
    name_width = max(len(name) for name, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(HEADINGS))]
    return [" ".join([name.rjust(name_width), *(c.rjust(w) for c, w in zip(cells, widths))]).rstrip()
            for name, cells in rows]


def _cells(counts: list[int]) -> list[str]:
    return [str(sum(counts)), *map(str, counts)]


def as_json(shape: Shape) -> dict[str, Any]:
    return {
        "bucket_minutes": [*BUCKET_MINUTES, None],  # each bucket's upper bound; None: older
        "total": {"messages": sum(shape.total), "buckets": shape.total},
        "destinations": [{"destination": dest, "messages": sum(counts), "buckets": counts}
                         for dest, counts in shape.ordered()],
    }
