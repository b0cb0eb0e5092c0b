"""The spool's indexes and counts stay exact under any sequence of writes (hypothesis).

A model (id -> envelope) follows every commit, apply, delete and quarantine; after each
step totals() and destination_counts() must equal a recount of the model, and on LMDB
the due, counts and bydest tables must hold exactly the keys the envelopes call for
(tests/mtaqueue/spoolindex.py works them out from the rules, not from indexes.py). A
record that stops decoding is the one exception the design allows: its counts stay
until the next read-write open recounts, and the test checks that this open does.
"""

from __future__ import annotations

import copy
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.backend_memory import MemoryBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from tests.mtaqueue import spoolindex

MIB = 1024 * 1024
DOMAINS = ["a.test", "A.Test.", "b.test", "b.test.x", "", "ünï.test"]
STATES = ["ready", "deferred", "held", "delivered", "bounced", "active"]

recipient = st.builds(lambda local, dom, state: (f"{local}@{dom}", state),
                      st.sampled_from(["u", "v", "w"]), st.sampled_from(DOMAINS), st.sampled_from(STATES))


class SpoolMachine(RuleBasedStateMachine):
    backend_kind = "lmdb"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="mta-indexes-")
        self.backend = self._open()
        self.model: dict[MessageId, Envelope] = {}
        self.serial = 0
        self.stale = False  # a record stopped decoding: counts wait for the next open

    def _open(self) -> LmdbBackend | MemoryBackend:
        if self.backend_kind == "memory":
            return MemoryBackend(max_bytes=64 * MIB)
        return LmdbBackend(self.dir, 64 * MIB)

    def teardown(self) -> None:
        self.backend.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _new(self, rcpts: list[tuple[str, str]], when: float) -> NewMessage:
        self.serial += 1
        msgid = MessageId(f"{1_700_000_000_000_000 + self.serial:013X}{self.serial:08X}")
        envelope = Envelope(msgid, "s@c.test", [Recipient(a, None, None, s) for a, s in rcpts], 1, when, when)
        return NewMessage(envelope, b"x")

    def _pick(self, data: st.DataObject, most: int) -> list[MessageId]:
        ids = sorted(self.model)
        return data.draw(st.lists(st.sampled_from(ids), max_size=most, unique=True)) if ids else []

    @rule(batch=st.lists(st.tuples(st.lists(recipient, min_size=1, max_size=5),
                                   st.floats(1000, 2000, allow_nan=False)), min_size=1, max_size=4))
    def commit(self, batch: list[tuple[list[tuple[str, str]], float]]) -> None:
        messages = [self._new(rcpts, when) for rcpts, when in batch]
        self.backend.commit(messages)
        self.model.update({m.envelope.id: copy.deepcopy(m.envelope) for m in messages})

    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        changed = []
        for msgid in self._pick(data, 4):
            envelope = copy.deepcopy(self.model[msgid])
            for r in envelope.recipients:
                r.state = data.draw(st.sampled_from([r.state, *STATES]))
            envelope.next_attempt = data.draw(st.sampled_from([envelope.next_attempt, envelope.next_attempt + 60.5]))
            changed.append(envelope)
        gone = self._pick(data, 2)
        bounces = [self._new(data.draw(st.lists(recipient, min_size=1, max_size=2)), 3000.0)
                   for _ in range(data.draw(st.integers(0, 1)))]
        self.backend.apply(update=changed, delete=gone, add=bounces)
        for envelope in changed:  # updates first, then deletes, then adds: the backends' order
            self.model[envelope.id] = envelope
        for msgid in gone:
            self.model.pop(msgid, None)
        self.model.update({m.envelope.id: m.envelope for m in bounces})

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        gone = self._pick(data, 3) + [MessageId("0" * 21)]
        assert self.backend.delete(gone) == len(gone) - 1
        for msgid in gone:
            self.model.pop(msgid, None)

    @precondition(lambda self: self.backend_kind == "lmdb" and self.model)
    @rule(data=st.data(), overwrite=st.booleans())
    def damage(self, data: st.DataObject, overwrite: bool) -> None:
        """A stored envelope stops decoding; then it is read (moved aside) or overwritten by
        the scheduler's copy (apply over an undecodable record)."""
        msgid = data.draw(st.sampled_from(sorted(self.model)))
        with self.backend._env.begin(write=True) as txn:  # garbage written through LMDB: the file stays sound
            txn.put(msgid.encode(), b"\xc1garbage", db=self.backend._envelope)
        self.stale = True
        if overwrite:
            self.backend.apply(update=[self.model[msgid]])
        else:
            assert self.backend.envelope(msgid) is None
            del self.model[msgid]

    @precondition(lambda self: self.backend_kind == "lmdb")
    @rule()
    def reopen(self) -> None:
        self.backend.close()
        self.backend = self._open()
        self.stale = False

    @invariant()
    def counts_are_a_recount(self) -> None:
        want = spoolindex.expected(self.model.values())
        totals = {s: want.counts.get(b"\0" + s.encode(), 0) for s in ("ready", "deferred", "held")}
        per_dest: dict[str, dict[str, int]] = {}
        for key, n in want.counts.items():
            dest, _, state = key.rpartition(b"\0")
            if dest:
                per_dest.setdefault(dest.decode(), dict.fromkeys(("ready", "deferred", "held"), 0))[state.decode()] = n
        assert self.backend.totals() == {**totals, "messages": len(self.model)} or self.stale
        assert self.backend.destination_counts() == per_dest or self.stale
        if self.backend_kind != "lmdb":
            return
        with self.backend._env.begin() as txn:
            found = spoolindex.stored(self.backend._env, txn)
            recount = txn.get(b"recount", db=self.backend._meta)
        assert found.due == want.due  # kept exact even for a record that does not decode
        if self.stale:
            assert recount is not None  # the next open recounts
        else:
            assert (found.counts, found.bydest) == (want.counts, want.bydest)

    @invariant()
    def views_agree_with_the_model(self) -> None:
        for domain in ("a.test", "b.test", "localhost"):
            want = sorted(i for i, e in self.model.items()
                          if any(spoolindex.destination(r.address) == domain and r.state in spoolindex.STATES
                                 for r in e.recipients))
            assert self.backend.ids(None, 1000, domain=domain) == want
        assert [e.id for e in self.backend.page(None, 1000)] == sorted(self.model)


class MemoryMachine(SpoolMachine):
    backend_kind = "memory"


TestLmdbIndexes = SpoolMachine.TestCase
TestLmdbIndexes.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestMemoryIndexes = MemoryMachine.TestCase
TestMemoryIndexes.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)

