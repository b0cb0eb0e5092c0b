"""The operator's queue operations (hold, release, retry, delete): which messages, which change.

One implementation for both callers: the scheduler applies a QueueCommand to the messages
it tracks (workers/scheduler/operations.py), and `mta queue <op>` applies it to the
spool itself when no scheduler runs (mta/cli.py). The callers do the bookkeeping around
it (the scheduler's plan and counts, the spool write); the rules live here.

  select   the command's messages: named ids (valid ones only), every message with a
           recipient at --domain, or --all. A finished message (every recipient
           delivered or bounced) is never a target: the scheduler deletes it.
  change   hold: ready/deferred -> held; release: held -> ready; retry: deferred -> ready.
           A message released or retried is due now. Delete is the caller's (a removal,
           not a change of states).

Pure: no I/O, no clock reads (pass `now`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from mta.messages import QueueCommand, QueueOp
from mtaqueue.ids import MessageId, is_id
from mtaqueue.records import Envelope, destination_of

__all__ = ["CHANGES", "FINAL_STATES", "REQUEUE", "change", "destination_of", "finished", "select"]

FINAL_STATES: Final = frozenset({"delivered", "bounced"})

# op -> (states it changes, the state they become)
CHANGES: Final[dict[QueueOp, tuple[frozenset[str], str]]] = {
    "hold": (frozenset({"ready", "deferred"}), "held"),
    "release": (frozenset({"held"}), "ready"),
    "retry": (frozenset({"deferred"}), "ready"),
}
REQUEUE: Final = frozenset({"release", "retry"})  # ops after which a changed message is due now


def finished(envelope: Envelope) -> bool:
    return all(r.state in FINAL_STATES for r in envelope.recipients)


def select(command: QueueCommand, messages: Mapping[MessageId, Envelope],
           lookup: Callable[[MessageId], Envelope | None] = lambda msgid: None) -> list[Envelope]:
    """The messages `command` names among `messages`; a named id not among them is looked
    up with `lookup` (the scheduler: a message committed but not notified yet)."""
    if command.all:
        return [e for e in messages.values() if not finished(e)]
    if command.domain:
        domain = command.domain.lower()
        return [e for e in messages.values()
                if not finished(e) and any(destination_of(r.address) == domain for r in e.recipients)]
    chosen = []
    for raw in dict.fromkeys(command.ids):  # each once
        if not is_id(raw):
            continue  # never a key LMDB refuses (an empty or overlong id)
        msgid = MessageId(raw)
        envelope = messages.get(msgid) or lookup(msgid)
        if envelope is not None and not finished(envelope):
            chosen.append(envelope)
    return chosen


def change(op: QueueOp, envelope: Envelope, now: float) -> bool:
    """Apply `op` (not delete) to the recipients of `envelope`, in place: True if any changed."""
    states, new = CHANGES[op]
    changed = False
    for r in envelope.recipients:
        if r.state in states:
            r.state, changed = new, True
    if changed and op in REQUEUE:
        envelope.next_attempt = now
    return changed
