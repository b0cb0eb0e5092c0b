"""The worker's memory budget for message content: [limits] max_worker_buffered_bytes.

Every session reports what its connection holds (ServerConnection.held_bytes: unread
input, DATA content, BDAT chunks, a finished message awaiting its commit); the sum is
`held`. Beyond the budget the worker refuses rather than spills to disk: a body goes
into LMDB from memory anyway, so a spill file would only move the peak to the commit.

- MAIL gets 452 4.3.1 when the budget is spent, or cannot take the SIZE the client
  declared (RFC 1870: a temporary lack of room);
- a transfer whose next bytes would take `held` past the budget is refused: the core
  reads the rest of it, keeps none, and answers 451 4.3.1 at its end, so the session
  stays in step and its memory is freed at once.

A finished message is never refused. Memory is bounded by the budget plus one read
(at most 256 KiB) per session.

Invariant: held == sum of the sessions' last reports (each session reports 0 when it ends).
"""

from __future__ import annotations

from mta.smtp import replies
from mta.smtp.replies import Reply
from mta.smtp.server import ServerConnection


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0

    def report(self, before: int, now: int) -> int:
        """A session held `before` and holds `now`: returns `now`, to keep as its next `before`."""
        self.held += now - before
        return now

    def check_mail(self, size: int | None) -> Reply | None:
        """None, or 452 4.3.1 when the budget cannot take a message of the declared SIZE."""
        if self.held >= self.limit or (size is not None and self.held + size > self.limit):
            return replies.MEMORY_BUSY
        return None

    def admit(self, conn: ServerConnection, reported: int) -> bool:
        """After new input: False when it takes the worker past the budget and a transfer of
        this session was refused for it now (451 4.3.1 at its end). `reported`: the session's
        last report."""
        if self.held - reported + conn.held_bytes <= self.limit:
            return True
        return not conn.refuse_content(replies.MEMORY_DISCARDED)
