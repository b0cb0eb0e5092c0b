"""Running queue counts: recipients per destination and state.

The scheduler adds and subtracts at every recipient state change, so the queue gauges
cost O(destinations) every GAUGE_SECONDS instead of a walk over every recipient.
Counted states: ready, active (ready and in a job a session carries), deferred, held;
delivered and bounced recipients have left the queue.

`recount` is the walk the running counts replace: tests compare the two after random
operation sequences; production code never calls it.

Invariants: every count >= 0 (a negative one raises: a state change was missed);
totals[state] == the sum over destinations; a destination whose counts are all 0 has
no entry. Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping
from operator import itemgetter

from mta.queueops import destination_of
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope

COUNTED = ("ready", "active", "deferred", "held")
PER_DESTINATION = ("ready", "active", "deferred")  # held recipients are not broken down
TOP_DESTINATIONS = 10  # per-destination gauges: this many rows + "other" (docs/metrics.md)
OTHER = "other"


def counted_state(state: str, carried: bool) -> str:
    """The gauge state of a recipient: a ready one in a session's job is active."""
    return "active" if carried and state == "ready" else state


class Tally:
    def __init__(self) -> None:
        self.totals: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self.by_dest: dict[str, dict[str, int]] = {}

    @classmethod
    def of(cls, by_dest: Mapping[str, Mapping[str, int]]) -> Tally:
        """A tally of counts summed elsewhere (the gauges: the spool's counts with the
        scheduler's view): rows taken as given, totals derived from them. No invariant
        check: while a write is in flight a row may be off by its messages."""
        tally = cls()
        for dest, counts in by_dest.items():
            row = {state: counts.get(state, 0) for state in COUNTED}
            if not any(row.values()):
                continue
            tally.by_dest[dest] = row
            for state, n in row.items():
                tally.totals[state] += n
        return tally

    @property
    def queued(self) -> dict[str, int]:
        """Ready + active + deferred per destination, destinations with any only: made when
        asked (top(), every GAUGE_SECONDS), not kept in step at every add()."""
        return {dest: queued for dest, counts in self.by_dest.items()
                if (queued := counts["ready"] + counts["active"] + counts["deferred"])}

    def add(self, dest: str, state: str, n: int) -> None:
        if state not in self.totals:
            return  # delivered, bounced
        counts = self.by_dest.get(dest)
        if counts is None:
            counts = self.by_dest[dest] = dict.fromkeys(COUNTED, 0)
        counts[state] = count = counts[state] + n
        self.totals[state] += n
        if count < 0:
            raise AssertionError(f"queue tally: {dest} {state} = {count} (a state change was not counted)")
        if not count and not any(counts.values()):  # (only a count at 0 can leave the row empty)
            del self.by_dest[dest]

    def move(self, dest: str, old: str, new: str) -> None:
        """One recipient of `dest` goes from counted state `old` to `new`, both of
        PER_DESTINATION (ready <-> active): its row and `queued` keep their sums."""
        counts = self.by_dest.get(dest)
        if counts is None or counts[old] <= 0:
            raise AssertionError(f"queue tally: {dest} {old} = {counts and counts[old]} - 1 (a state change was not counted)")
        counts[old] -= 1
        counts[new] += 1
        self.totals[old] -= 1
        self.totals[new] += 1

    def add_recipients(self, envelope: Envelope, indices: Iterable[int], carried: Collection[int],
                       sign: int) -> None:
        """Count (+1) or uncount (-1) these recipients of `envelope`; `carried`: indices in a session's job."""
        recipients, totals = envelope.recipients, self.totals
        for i in indices:
            r = recipients[i]
            state = r.state
            if state not in totals:
                continue  # delivered, bounced: not counted (as add() would say)
            self.add(destination_of(r.address), counted_state(state, i in carried), sign)

    def states(self, envelope: Envelope, indices: Iterable[int], carried: Collection[int]) -> list[str]:
        """The counted states of these recipients now (for `changed`, after they change)."""
        return [counted_state(envelope.recipients[i].state, i in carried) for i in indices]

    def changed(self, envelope: Envelope, indices: Iterable[int], before: list[str],
                carried: Collection[int]) -> None:
        """These recipients were counted in the states `before`: count them as they are now
        (only those whose counted state changed are touched)."""
        for i, old in zip(indices, before):
            r = envelope.recipients[i]
            new = counted_state(r.state, i in carried)
            if new != old:
                dest = destination_of(r.address)
                self.add(dest, old, -1)
                self.add(dest, new, +1)

    def top(self, n: int) -> tuple[list[tuple[str, dict[str, int]]], dict[str, int]]:
        """The n destinations with the most queued (ready + active + deferred) recipients,
        most first, and the sums of every other destination. O(destinations); at the cut,
        among equals, the destination counted first wins. A domain named "other" is always
        in the sums: a row of its own would repeat the series of the sums."""
        chosen = heapq.nlargest(n, (item for item in self.queued.items() if item[0] != OTHER), key=itemgetter(1))
        best = [(d, self.by_dest[d]) for d, _ in sorted(chosen, key=lambda item: (-item[1], item[0]))]
        other = {s: self.totals[s] - sum(c[s] for _, c in best) for s in PER_DESTINATION}
        return best, other

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tally) and (self.totals, self.by_dest) == (other.totals, other.by_dest)

    def __repr__(self) -> str:
        return f"Tally(totals={self.totals}, by_dest={self.by_dest}, queued={self.queued})"


def recount(messages: Mapping[MessageId, Envelope], carried: Mapping[MessageId, Collection[int]]) -> Tally:
    """The counts by walking every recipient (tests only: O(recipients))."""
    tally = Tally()
    for envelope in messages.values():
        tally.add_recipients(envelope, range(len(envelope.recipients)), carried.get(envelope.id, ()), +1)
    return tally
