"""The worker's memory budget for message content: [limits] max_worker_buffered_bytes.

Every session reports its `cost`: what its connection holds (ServerConnection.held_bytes:
unread input, DATA content, BDAT chunks, a finished message awaiting its commit),
message content counted twice, since the end of data and the commit each copy it (the
commit with our Received header in front) while the original is still held; the sum
is `held`, so it bounds the peaks too. Beyond the budget the worker refuses rather than
spills to disk: a body goes into LMDB from memory anyway, so a spill file would only
move the peak to the commit.

- MAIL gets 452 4.3.1 when the budget is spent, or cannot take the SIZE the client
  declared (RFC 1870: a temporary lack of room);
- a transfer whose next bytes would take `held` past the budget is refused: the core
  reads the rest of it, keeps none, and answers 451 4.3.1 at its end, so the session
  stays in step and its memory is freed at once.

A finished message is never refused. Memory is bounded by the budget plus one read
(at most 256 KiB) per session, plus the spool writer's copy of the messages it is
writing (LMDB's dirty pages, for the few milliseconds of a commit).

Invariant: held == sum of the sessions' last reports (each session reports 0 when it ends).
"""

from __future__ import annotations

from mta.smtp import replies
from mta.smtp.replies import Reply
from mta.smtp.server import Message, ServerConnection


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0

    @staticmethod
    def cost(conn: ServerConnection) -> int:
        """What a session counts: its held bytes, twice while they are message content."""
        held = conn.held_bytes
        if not held:  # the most frequent, between commands: nothing more to ask the core
            return 0
        return 2 * held if conn.in_transfer or isinstance(conn.pending, Message) else held

    def report(self, before: int, now: int) -> int:
        """A session held `before` and holds `now`: returns `now`, to keep as its next `before`."""
        self.held += now - before
        return now

    def check_mail(self, size: int | None) -> Reply | None:
        """None, or 452 4.3.1 when the budget cannot take a message of the declared SIZE."""
        if self.held >= self.limit or (size is not None and self.held + 2 * size > self.limit):
            return replies.MEMORY_BUSY
        return None

    def admit(self, conn: ServerConnection, reported: int) -> bool:
        """After new input: False when it takes the worker past the budget and a transfer of
        this session was refused for it now (451 4.3.1 at its end). `reported`: the session's
        last report."""
        if not conn.in_transfer or self.held - reported + self.cost(conn) <= self.limit:
            return True
        return not conn.refuse_content(replies.MEMORY_DISCARDED)
