"""The scheduler's running queue counts (tally.py) against a walk, after random event sequences.

The Scheduler runs on a real event loop with a memory spool and fake delivery workers
that never answer by themselves: each step is one event (new mail, dispatch, a job's
replies, a session closed, a worker lost, an operator command, a timer, a rescan, a
reload), and after every step check_tally() compares the running counts with a recount.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import pytest
import uvloop

from mta import messages, metrics
from mta.config import Config, DeliveryConfig, QueueConfig
from mtaqueue.backend_memory import MemoryBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from workers.scheduler.dispatch import WorkerLink
from workers.scheduler.main import Scheduler
from workers.scheduler.tally import OTHER, TOP_DESTINATIONS, Tally

DOMAINS = [f"d{n}.test" for n in range(TOP_DESTINATIONS + 6)]
REPLIES = [(250, "2.0.0", "ok")] * 4 + [(450, "4.2.0", "later"), (550, "5.1.1", "gone"), (452, "4.5.3", "too many")]


# --- the pure parts -------------------------------------------------------------------

def test_tally_counts_totals_and_drops_empty_destinations() -> None:
    tally = Tally()
    tally.add("a.test", "ready", 2)
    tally.add("a.test", "held", 1)
    tally.add("a.test", "delivered", 5)  # not in the queue: ignored
    assert tally.totals == {"ready": 2, "active": 0, "deferred": 0, "held": 1}
    assert tally.queued == {"a.test": 2}
    tally.add("a.test", "ready", -2)
    assert tally.queued == {} and tally.by_dest == {"a.test": {"ready": 0, "active": 0, "deferred": 0, "held": 1}}
    tally.add("a.test", "held", -1)
    assert tally.by_dest == {} and tally.totals == dict.fromkeys(tally.totals, 0)


def test_a_missed_state_change_panics() -> None:
    tally = Tally()
    with pytest.raises(AssertionError, match="a.test ready = -1"):
        tally.add("a.test", "ready", -1)


def test_top_destinations_and_other_add_up() -> None:
    tally = Tally()
    for n in range(15):
        tally.add(f"d{n}.test", "ready", n + 1)
        tally.add(f"d{n}.test", "deferred", 1)
    tally.add("held.test", "held", 100)  # held only: not queued for delivery, never in the top
    top, other = tally.top(TOP_DESTINATIONS)
    assert [name for name, _ in top] == [f"d{n}.test" for n in range(14, 4, -1)]
    assert other == {"ready": 1 + 2 + 3 + 4 + 5, "active": 0, "deferred": 5}
    for state in ("ready", "active", "deferred"):
        assert sum(c[state] for _, c in top) + other[state] == tally.totals[state]


def test_a_domain_named_other_is_summed_into_other() -> None:
    tally = Tally()
    tally.add(OTHER, "ready", 50)
    tally.add("a.test", "ready", 1)
    top, other = tally.top(TOP_DESTINATIONS)
    assert [name for name, _ in top] == ["a.test"] and other["ready"] == 50


def test_render_holds_the_top_rows_and_other() -> None:
    text = metrics.render_destinations([["a.test", 3, 1, 2, 1, 5]], [4, 0, 7]).decode()
    assert 'mta_destination_recipients{destination="a.test",state="ready"} 3.0' in text
    assert 'mta_destination_recipients{destination="other",state="deferred"} 7.0' in text
    assert 'mta_destination_connections{destination="a.test"} 1.0' in text
    assert 'mta_destination_connection_limit{destination="a.test"} 5.0' in text
    assert 'mta_destination_connections{destination="other"}' not in text


# --- the scheduler, event by event ------------------------------------------------------

class FakeWriter:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.frames.append(data)


def config(active_limit: int = 20000, active_reserve: int = 2000, **delivery: Any) -> Config:
    # Back-off of milliseconds: deferred recipients come back through the real timer.
    values = {"min_backoff_seconds": 0.002, "max_backoff_seconds": 0.01, "initial_concurrency": 2,
              "concurrency": 3, "max_messages_per_connection": 3, **delivery}
    return Config(delivery=DeliveryConfig(**values),
                  queue=QueueConfig(active_limit=active_limit, active_reserve=active_reserve))


def new_scheduler(cfg: Config) -> Scheduler:
    s = Scheduler(cfg)  # no process around it: start() is not run
    s.backend = MemoryBackend()  # type: ignore[assignment]
    return s


class Driver:
    """Random events against one Scheduler; `step()` runs one and lets the loop turn."""

    def __init__(self, s: Scheduler, rnd: random.Random) -> None:
        self.s, self.rnd = s, rnd
        self.count = 0
        self.pids = iter(range(1000, 10**6))
        self.add_worker()

    def add_worker(self) -> WorkerLink:
        link = WorkerLink(FakeWriter(), self.rnd.randint(1, 6), next(self.pids))  # type: ignore[arg-type]
        self.s.workers.append(link)
        return link

    def commit(self, addresses: list[str] | None = None) -> MessageId:
        """A message in the spool, not notified: `addresses` all ready, else random ones in random states."""
        self.count += 1
        msgid = MessageId(f"{self.count:021X}")
        if addresses is not None:
            rcpts = [Recipient(a) for a in addresses]
        else:
            state = self.rnd.choice(["ready"] * 6 + ["deferred", "held", "delivered"])
            rcpts = [Recipient(f"u{k}@{d}", state=state if k else "ready")
                     for k, d in enumerate(self.rnd.choices(DOMAINS, k=self.rnd.randint(1, 4)))]
        late = self.rnd.random() < 0.5
        now = time.time()
        envelope = Envelope(msgid, self.rnd.choice(["", "s@client.test"]), rcpts, 10, now - self.rnd.random() * 100,
                            now + (0.005 if late else -1))
        self.s.backend.commit([NewMessage(envelope, b"Subject: t\r\n\r\nbody\r\n")])
        return msgid

    def carried_sessions(self) -> list[Any]:
        return [x for x in self.s.sessions.values() if x.job is not None]

    def tracked(self) -> list[MessageId]:
        return list(self.s.messages)

    async def step(self) -> str:
        s, rnd = self.s, self.rnd
        kind = rnd.choice(["new"] * 4 + ["dispatch"] * 3 + ["done"] * 6 + ["closed", "lost", "command", "command",
                                                                             "rescan", "reload", "gauges"])
        if kind == "new":
            s._on_new([self.commit() for _ in range(rnd.randint(1, 3))])
        elif kind == "dispatch":
            s._dispatch()
        elif kind == "done" and (carried := self.carried_sessions()):
            session = rnd.choice(carried)
            # Recipients held since the job was given are skipped, as the delivery worker does.
            job, envelope = session.job, s.messages.get(session.job.msgid)
            skipped = tuple(i for i in job.rcpts if envelope is not None and envelope.recipients[i].state == "held")
            rcpts = [i for i in job.rcpts if i not in skipped and rnd.random() < 0.95]  # sometimes one is not answered
            replies = tuple((i, *rnd.choice(REPLIES)) for i in rcpts)
            s._on_done(messages.Done(session.sid, job.id, replies, "mx.test[127.0.0.9]:25",
                                     failed=rnd.random() < 0.05, skipped=skipped))
        elif kind == "closed" and s.sessions:
            session = rnd.choice(list(s.sessions.values()))
            s._on_closed(session.worker, session.sid, True)
        elif kind == "lost" and s.workers:
            s._lost_worker(rnd.choice(s.workers))
            self.add_worker()
        elif kind == "command" and s.messages:
            op = rnd.choice(["retry", "hold", "release", "delete", "hold", "release"])
            which = rnd.choice([{"ids": tuple(rnd.sample(self.tracked(), min(2, len(s.messages))))},
                                {"domain": rnd.choice(DOMAINS)}, {"all": rnd.random() < 0.1}])
            await s._command(messages.QueueCommand(op, **which))
        elif kind == "rescan":  # committed, the notification lost: the pass from the start finds it
            self.commit()
            s._scan(b"")
        elif kind == "reload":
            s.reload(s.config)  # SIGHUP: workers/process.py read and validated the file
        elif kind == "gauges":
            s._update_gauges(time.time())
            snapshot = s.destination_gauges
            assert len(snapshot["top"]) <= TOP_DESTINATIONS
            if s.writes.flushing or s.writes.update or s.writes.delete:
                return kind  # a flush on the executor's thread may change the spool between two reads
            totals = s.queue_counts().totals
            for k, state in enumerate(("ready", "active", "deferred")):
                assert sum(row[1 + k] for row in snapshot["top"]) + snapshot["other"][k] == totals[state]
        return kind


def walked_counts(s: Scheduler) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The queue's counts by a walk over the whole spool: a tracked message as the
    scheduler sees it, any other as the spool has it."""
    tally = Tally()
    for stored in s.backend.envelopes():
        envelope = s.messages.get(stored.id, stored)
        tally.add_recipients(envelope, range(len(envelope.recipients)), s.carried.get(envelope.id, ()), +1)
    return tally.totals, {d: c for d, c in tally.by_dest.items()}


def check_queue_counts(s: Scheduler) -> None:
    """The gauges' counts equal a walk (exact whenever no write is in flight)."""
    if s.writes.flushing or s.writes.update or s.writes.delete:
        return
    counts = s.queue_counts()
    walked_totals, walked = walked_counts(s)
    assert counts.totals == walked_totals
    assert {d: {k: n for k, n in c.items() if n} for d, c in counts.by_dest.items()} == \
        {d: {k: n for k, n in c.items() if n} for d, c in walked.items()}


@pytest.mark.parametrize("seed", range(8))
def test_running_counts_equal_a_walk_after_random_events(seed: int) -> None:
    """Half the seeds with an active set of 4 (+2 reserve): most of the queue waits in the
    spool, and still every count is exact and every message is delivered."""
    cfg = config(active_limit=4, active_reserve=2) if seed % 2 else config()
    rnd = random.Random(seed)
    seen: set[str] = set()

    async def main() -> None:
        s = new_scheduler(cfg)
        driver = Driver(s, rnd)
        for _ in range(600):
            seen.add(await driver.step())
            s.check_tally()
            check_queue_counts(s)
            assert len(s.messages) <= cfg.queue.active_limit + cfg.queue.active_reserve
            if rnd.random() < 0.3:
                await asyncio.sleep(rnd.choice([0, 0, 0.003]))  # dispatches, flushes, bounces, timers
                s.check_tally()
        # Drain: every job answered 250 until nothing is left but held mail.
        await s._command(messages.QueueCommand("release", all=True))
        for _ in range(2000):
            for dest in s.plan.destinations.values():
                dest.suspended_until = 0.0
            s._dispatch()
            for session in driver.carried_sessions():
                s._on_done(messages.Done(session.sid, session.job.id,
                                         tuple((i, 250, "2.0.0", "ok") for i in session.job.rcpts)))
            for session in [x for x in s.sessions.values() if x.job is None]:
                s._on_closed(session.worker, session.sid, True)
            await asyncio.sleep(0.001)
            s.check_tally()
            if not s.messages and not s.writes.flushing and not s.writes.add and not s.backend.totals()["messages"]:
                break  # (deferred mail waits in the spool, not in memory: the scan brings it back)
        assert s.messages == {} and s.tally.by_dest == {} and s.carried == {}
        assert s.tally.totals == {"ready": 0, "active": 0, "deferred": 0, "held": 0}
        assert list(s.backend.envelopes()) == []  # every message delivered (or bounced, and that delivered)
        await s.writes.flush_now()
        if s._wake is not None:
            s._wake.cancel()

    uvloop.run(main())
    assert {"new", "dispatch", "done", "command", "gauges"} <= seen


def test_gauges_show_active_and_held_as_the_walk_does() -> None:
    async def main() -> None:
        s = new_scheduler(config(concurrency=1, initial_concurrency=1))
        driver = Driver(s, random.Random(0))
        s.workers[0].capacity = 2
        first = driver.commit(["a@one.test", "b@one.test", "c@two.test"])
        s._on_new([first])
        s._dispatch()
        s.check_tally()
        assert s.tally.totals["active"] == 2 + 1  # one session per destination, carrying its job
        await s._command(messages.QueueCommand("hold", (first,)))  # held while being delivered
        s.check_tally()
        assert s.queue_counts().totals == {"ready": 0, "active": 0, "deferred": 0, "held": 3}
        await s._command(messages.QueueCommand("delete", (first,)))
        s.check_tally()
        assert s.tally.totals == {"ready": 0, "active": 0, "deferred": 0, "held": 0}
        for session in driver.carried_sessions():  # the workers answer for a deleted message
            s._on_done(messages.Done(session.sid, session.job.id,
                                     tuple((i, 250, "2.0.0", "ok") for i in session.job.rcpts)))
        s.check_tally()
        assert s.carried == {}
        await s.writes.flush_now()

    uvloop.run(main())


def test_at_most_n_destinations_however_many_come_and_go() -> None:
    """Destinations come and go: the snapshot, and so the scrape, holds at most N + other."""
    async def main() -> None:
        s = new_scheduler(config())
        driver = Driver(s, random.Random(1))
        shown: set[str] = set()
        for wave in range(5):
            ids = [driver.commit([f"u@w{wave}-{n}.test"] * (1 + n % 4)) for n in range(3 * TOP_DESTINATIONS)]
            s._on_new(ids)
            s._update_gauges(0.0)
            snapshot = s.destination_gauges
            text = metrics.render_destinations(snapshot["top"], snapshot["other"]).decode()
            names = set(re.findall(r'destination="([^"]+)"', text))
            assert len(names) == TOP_DESTINATIONS + 1 and OTHER in names
            assert all(name.startswith(f"w{wave}-") for name in names - {OTHER})  # the old ones are gone
            shown |= names
            await s._command(messages.QueueCommand("delete", tuple(ids)))
            s.check_tally()
        assert len(shown) > TOP_DESTINATIONS + 1
        await s.writes.flush_now()

    uvloop.run(main())


def test_a_rescan_before_the_delete_is_committed_does_not_deliver_again() -> None:
    """Found by bench/soak.py: a message delivered and forgotten, its spool delete not yet
    committed, was found by the periodic rescan and delivered a second time."""
    async def main() -> None:
        s = new_scheduler(config())
        driver = Driver(s, random.Random(0))
        msgid = driver.commit(["a@one.test"])
        s._on_new([msgid])
        s._dispatch()
        [session] = driver.carried_sessions()
        s._on_done(messages.Done(session.sid, session.job.id, ((0, 250, "2.0.0", "ok"),)))
        assert msgid not in s.messages and msgid in s.backend.due(time.time() + 1, 10)  # not deleted yet
        s._scan(b"")  # the pass from the start
        assert msgid not in s.messages and not driver.carried_sessions()
        await s.writes.flush_now()
        assert s.backend.envelope(msgid) is None
        if s._wake is not None:
            s._wake.cancel()

    uvloop.run(main())


def test_the_scan_reads_only_what_came_due_since_the_last_pass() -> None:
    """Incremental: a pass reads due entries from its mark on, never the deferred future,
    and a second pass with nothing new due reads nothing."""
    async def main() -> None:
        s = new_scheduler(config(active_limit=4, active_reserve=0))
        Driver(s, random.Random(0))  # a delivery worker
        now = time.time()

        def commit(msgid: str, state: str, next_attempt: float) -> MessageId:
            s.backend.commit([NewMessage(Envelope(MessageId(msgid), "s@client.test", [Recipient(
                f"{msgid}@d.test", state=state, attempts=int(state == "deferred"))], 10, now - 60, next_attempt),
                b"x\r\n")])
            return MessageId(msgid)
        for n in range(40):  # deferred an hour ahead: the future part of the due index
            commit(f"F{n:020X}", "deferred", now + 3600)
        due = [commit(f"D{n:020X}", "ready", now - 1) for n in range(6)]  # due now, more than the set holds
        read: list[str] = []
        real = s.backend.due_from

        def counting(start: bytes, until: float, limit: int) -> list[tuple[bytes, MessageId]]:
            entries = real(start, until, limit)
            read.extend(msgid for _, msgid in entries)
            return entries
        s.backend.due_from = counting  # type: ignore[method-assign]
        assert s._scan(b"") == 4 and s.backlog  # the set is full: the scan stops at the 5th
        assert not any(m.startswith("F") for m in read)  # the deferred future is never read
        read.clear()
        assert s._scan() == 0 and read == due[4:]  # from the mark (the first without room): not the tracked ones
        read.clear()
        await s._command(messages.QueueCommand("delete", tuple(due[:2])))  # room for two: a scan follows
        assert set(due[4:]) <= set(s.messages) and read == due[4:]
        read.clear()
        assert s._scan() == 0 and read == []  # nothing new came due: nothing read
        await s.writes.flush_all()
        if s._wake is not None:
            s._wake.cancel()

    uvloop.run(main())
