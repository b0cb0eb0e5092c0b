"""Offline bulk operations (mta/queuebulk.py) on a real LMDB spool: queueops' rules,
a batch per transaction, progress after the first batch and then at most once a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import queuebulk
from mta.messages import QueueCommand
from mtaqueue.backend_lmdb import LmdbBackend
from tests.mta.queuefill import message, msgid, spool

T0 = 1_700_000_000.0
COUNT = 2500


@pytest.fixture
def backend(tmp_path: Path) -> LmdbBackend:
    """Odd messages to x.test (deferred), even ones to y.test (ready); the first is finished."""
    messages = [message(T0 + n, n, [("a@x.test" if n % 2 else "b@Y.test", "deferred" if n % 2 else "ready")])
                for n in range(1, COUNT)]
    messages.insert(0, message(T0, 0, [("c@x.test", "delivered")]))
    b = spool(tmp_path / "q", messages)
    yield b
    b.close()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.3  # each read: 0.3 s later
        return self.t


def states(backend: LmdbBackend) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in backend.envelopes():
        for r in e.recipients:
            out[r.state] = out.get(r.state, 0) + 1
    return out


def test_hold_all_goes_in_batches_with_progress(backend: LmdbBackend) -> None:
    heard: list[tuple[int, int]] = []
    count = queuebulk.apply(backend, QueueCommand("hold", all=True), T0 + 99, Clock(), lambda d, t: heard.append((d, t)))
    assert count == COUNT - 1  # the finished message is no target
    assert states(backend) == {"held": COUNT - 1, "delivered": 1}
    assert backend.totals()["held"] == COUNT - 1
    # after the first batch at once; the second batch came 0.6 s later (two clock reads): not yet
    assert heard == [(999, COUNT)]


def test_release_of_a_domain_reads_only_that_domain(backend: LmdbBackend) -> None:
    queuebulk.apply(backend, QueueCommand("hold", all=True), T0 + 99, Clock(), lambda d, t: None)
    heard: list[tuple[int, int]] = []
    count = queuebulk.apply(backend, QueueCommand("release", domain="y.test"), T0 + 100, Clock(),
                            lambda d, t: heard.append((d, t)))
    assert count == (COUNT - 1) // 2
    assert states(backend) == {"ready": (COUNT - 1) // 2, "held": COUNT // 2, "delivered": 1}
    assert heard == [(1000, 0)]  # a domain's total is not known up front
    released = backend.envelope(msgid(T0 + 2, 2))
    assert released is not None and released.next_attempt == T0 + 100  # due now


def test_delete_all_and_named_ids(backend: LmdbBackend) -> None:
    named = QueueCommand("delete", ids=(msgid(T0 + 1, 1), msgid(T0 + 1, 1), "not-an-id", msgid(T0, 0)))
    assert queuebulk.apply(backend, named, T0, Clock(), lambda d, t: None) == 1  # once; the finished one is no target
    assert queuebulk.apply(backend, QueueCommand("delete", all=True), T0, Clock(), lambda d, t: None) == COUNT - 2
    assert [e.id for e in backend.envelopes()] == [msgid(T0, 0)]


def test_progress_lines() -> None:
    assert queuebulk.progress_line("hold", 12000, 1000000) == "held 12000/1000000"
    assert queuebulk.progress_line("retry", 5, 0) == "retried 5"
