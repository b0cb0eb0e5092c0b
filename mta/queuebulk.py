"""`mta queue retry|hold|release|delete` with no scheduler running: the spool edited in batches.

The rules are mta/queueops.py's, the ones the running scheduler applies. Named ids are
one transaction, as before. --all and --domain D walk the spool's page() (arrival order;
a domain through the spool's by-destination index) BATCH messages at a time: each
batch is read in one transaction and written in one (apply or delete), so the memory
used is one batch's whatever the size of the queue, and a run that stops half-way
(Ctrl-C, a crash) leaves every batch before it applied and the rest untouched; run it
again to finish. The domain is expected normalized (queueops.destination_of, as the CLI
does), since it is a key of the spool's index. `on_progress(done, total)` hears after the first batch and then at most
once a second (total: the messages in the spool for --all, 0 when unknown), the same
shape as the scheduler's CommandProgress.

Named ids go through queueops.select with the spool as lookup; this module does no
clock reads of its own beyond the progress pacing (`now` and `clock` are passed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from mta import queueops
from mta.messages import QueueCommand, QueueOp
from mtaqueue.backend import QueueBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope

BATCH: Final = 1000
PROGRESS_SECONDS: Final = 1.0

Progress = Callable[[int, int], None]  # (messages applied so far, expected in all or 0)

PAST: Final = {"retry": "retried", "hold": "held", "release": "released", "delete": "deleted"}


def progress_line(op: str, done: int, total: int) -> str:
    """What the operator reads on stderr: `held 12000/1000000` (total unknown: `held 12000`)."""
    return f"{PAST.get(op, op)} {done}/{total}" if total else f"{PAST.get(op, op)} {done}"


def apply(spool: QueueBackend, command: QueueCommand, now: float, clock: Callable[[], float],
          on_progress: Progress) -> int:
    """Apply `command` to the spool; the messages it applied to."""
    if not (command.all or command.domain):
        return _apply(spool, command.op, queueops.select(command, {}, spool.envelope), now)
    total = spool.totals()["messages"] if command.all else 0
    done, after, reported = 0, None, None
    while True:
        batch = spool.page(after, BATCH, command.domain)
        done += _apply(spool, command.op, queueops.select(command, {e.id: e for e in batch}), now)
        if len(batch) < BATCH:
            return done
        after = batch[-1].id
        if reported is None or clock() - reported >= PROGRESS_SECONDS:
            on_progress(done, total)
            reported = clock()


def _apply(spool: QueueBackend, op: QueueOp, chosen: Sequence[Envelope], now: float) -> int:
    """One transaction: the chosen messages deleted, or their changed envelopes written."""
    if op == "delete":
        spool.delete([MessageId(e.id) for e in chosen])
    else:
        changed = [e for e in chosen if queueops.change(op, e, now)]
        if changed:
            spool.apply(update=changed)
    return len(chosen)
