"""The inbound worker's output, once per turn of its event loop: the turn's metric counts,
the waiting log lines, then each session's replies, then the half-closes that wait for them.

A session with replies ready (or a half-close to do after them) marks itself (`mark`);
the event log schedules the same callback for its first waiting line (`schedule`, given
to logs.write_each_turn). That one callback per turn writes every waiting log line in
one write, then each marked session's replies in one transport.write each, each
followed by the half-close that waited for it (`Output.write_turn`). The sessions' hot
counters (connections, messages, bytes, active sessions) are added up here (`count`) and
written to their metric once per turn, before the lines: one write to the metrics' mmap
per metric and turn, not one per session and event (each takes a lock and packs a value).

Invariants: a log line never follows the reply it records (the line is made before its
reply is, and the lines leave first); nor does a count (a client that read its 250 finds
the message counted); a close never loses its reply (it follows the write); a crash loses
at most one turn's counts. A session that must write before it acts writes at once
instead, its waiting counts and lines first (`before_replies`): our 220 to STARTTLS before the handshake, a 221
whose socket closes at once, the replies waiting when the client's EOF closes the
transport (protocol.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from mta import logs


class Output(Protocol):
    def write_turn(self) -> None:
        """Write what waits (replies, then a half-close), once; it may mark itself again later."""


class TurnWriter:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._ready: list[Output] = []
        self._scheduled = False
        # The worker's loop, given: asyncio.get_running_loop() costs a getpid. None: looked
        # up once, from inside the loop (tests). (A line logged first from another thread
        # reaches schedule() on the loop's thread: logs.write_each_turn.)
        self._loop = loop
        self._counts: dict[Any, float] = {}  # metric (a Counter's or Gauge's child) -> amount this turn

    def mark(self, output: Output) -> None:
        """`output` writes at the end of this turn; the caller marks it once until then."""
        self._ready.append(output)
        if not self._scheduled:
            self.schedule()

    def schedule(self) -> None:
        """The turn's callback runs once at its end, whoever asks first (a session, a log line)."""
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._write)

    def count(self, metric: Any, amount: float = 1) -> None:
        """metric.inc(amount) at the end of this turn (a Gauge's amount may be negative)."""
        counts = self._counts
        counts[metric] = counts.get(metric, 0) + amount
        if self._loop is None:  # a writer not given the worker's loop (unit tests): at once
            self._write_counts()
        elif not self._scheduled:
            self.schedule()

    def before_replies(self) -> None:
        """What a reply written now must follow, written now: the counts, then the waiting lines.
        Also at the worker's close (nothing counted is lost)."""
        self._write_counts()
        logs.write_waiting()

    def _write_counts(self) -> None:
        if self._counts:
            counts, self._counts = self._counts, {}
            for metric, amount in counts.items():
                if amount:  # a session that came and went in one turn leaves the gauge as it was
                    metric.inc(amount)

    def _write(self) -> None:
        self._scheduled = False
        ready, self._ready = self._ready, []
        try:
            self.before_replies()
        finally:  # a log that cannot be written (disk full, reader gone) loses its lines, not the replies
            for output in ready:
                output.write_turn()
