"""The scheduler's per-outcome shortcuts: the envelope copy a flush writes (flush.snapshot),
the tally's one-step move between ready and active, and what it keeps between outcomes
(the back-off rules, a destination's limits and priority) following a reload."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time

import pytest
import uvloop

from mta import messages
from mta.config import DomainConfig
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from tests.workers.test_scheduler_tally import FakeWriter, config, new_scheduler
from workers.scheduler.dispatch import WorkerLink
from workers.scheduler.flush import snapshot
from workers.scheduler.main import Scheduler
from workers.scheduler.tally import Tally


def full_envelope() -> Envelope:
    """Every field away from its default, and a client value that is not a scalar."""
    return Envelope(
        MessageId("0" * 21), "s@client.test",
        [Recipient("a@x.test", ("SUCCESS", "DELAY"), "rfc822;a@x.test", "deferred", 3, "451 4.3.0 later"),
         Recipient("b@y.test")],
        1234, 1000.5, 2000.25, priority=7, attempts=3, ret="HDRS", envid="env-1", body_type="8BITMIME",
        smtputf8=True, client={"ip": "192.0.2.1", "port": 2525, "tls": {"version": "TLSv1.3"}}, warned=True)


def test_snapshot_equals_a_deep_copy_that_later_changes_do_not_reach() -> None:
    original = full_envelope()
    copied = snapshot(original)
    assert copied == copy.deepcopy(original)
    assert [f.name for f in dataclasses.fields(Envelope)] and all(  # every field, none left at its default
        getattr(copied, f.name) == getattr(original, f.name) for f in dataclasses.fields(Envelope))
    original.recipients[0].state, original.recipients[0].attempts = "delivered", 4
    original.recipients[1].last_reply = "250 2.0.0 ok"
    original.recipients.append(Recipient("c@z.test"))
    original.attempts, original.next_attempt, original.warned = 4, 3000.0, False
    original.client["tls"]["version"] = "TLSv1.2"
    original.client["ip"] = "192.0.2.2"
    assert copied == full_envelope()  # as it was at the outcome: what the flush writes


def test_snapshot_of_a_scalar_client_is_its_own_dict() -> None:
    original = full_envelope()
    original.client = {"ip": "192.0.2.1", "port": 25, "helo": None}
    copied = snapshot(original)
    assert copied.client == original.client and copied.client is not original.client


def test_tally_move_keeps_the_row_and_queued_sums() -> None:
    tally = Tally()
    tally.add("a.test", "ready", 2)
    tally.move("a.test", "ready", "active")
    assert tally.by_dest == {"a.test": {"ready": 1, "active": 1, "deferred": 0, "held": 0}}
    assert tally.totals == {"ready": 1, "active": 1, "deferred": 0, "held": 0} and tally.queued == {"a.test": 2}
    tally.move("a.test", "active", "ready")
    assert tally == Tally.of({"a.test": {"ready": 2}})


def test_a_move_from_an_empty_state_panics() -> None:
    tally = Tally()
    with pytest.raises(AssertionError, match="a.test active = None - 1"):
        tally.move("a.test", "active", "ready")
    tally.add("a.test", "ready", 1)
    with pytest.raises(AssertionError, match="a.test active = 0 - 1"):
        tally.move("a.test", "active", "ready")


IDS = itertools.count(1)


def deliver_once(s: Scheduler, address: str, reply: tuple[int, str, str]) -> tuple[Envelope, int]:
    """A message to `address` committed, dispatched and answered `reply`: the envelope as
    the scheduler holds it after the outcome, and the priority its job had."""
    msgid = MessageId(f"{next(IDS):021X}")
    now = time.time()
    s.backend.commit([NewMessage(Envelope(msgid, "s@client.test", [Recipient(address)], 10, now, now - 1), b"x")])
    s._on_new([msgid])
    s._dispatch()
    session = next(x for x in s.sessions.values() if x.job is not None and x.job.msgid == msgid)
    priority = session.job.priority
    s._on_done(messages.Done(session.sid, session.job.id, ((0, *reply),), "mx.test[127.0.0.9]:25"))
    return s.messages[msgid], priority


def test_a_reload_changes_the_backoff_and_the_destination_rules_of_the_next_outcomes() -> None:
    later = (451, "4.3.0", "later")

    async def main() -> None:
        s = new_scheduler(config(min_backoff_seconds=60.0, max_backoff_seconds=600.0))
        s.workers.append(WorkerLink(FakeWriter(), 10, 1))  # type: ignore[arg-type]
        first, priority = deliver_once(s, "u@a.test", later)
        assert 59 < first.next_attempt - time.time() <= 60 and priority == 0
        cfg = config(min_backoff_seconds=300.0, max_backoff_seconds=600.0)
        s.reload(dataclasses.replace(cfg, domains={"a.test": DomainConfig(priority=5, max_messages_per_connection=1)}))
        second, priority = deliver_once(s, "v@a.test", later)
        assert 299 < second.next_attempt - time.time() <= 300 and priority == 5
        assert s.plan.destinations["a.test"].limits.max_messages_per_connection == 1
        s.check_tally()
        await s.writes.flush_all()
        if s._wake is not None:
            s._wake.cancel()

    uvloop.run(main())
