"""LmdbBackend.add_new, what `mta queue import` commits through: a message whose id the
spool holds, or ever added through add_new, is skipped, even once it has been delivered
and deleted; what it adds is counted and indexed as a commit is."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtaqueue.backend import QueueFull
from mtaqueue.backend_lmdb import LmdbBackend
from tests.mta.queuefill import message
from tests.mtaqueue import spoolindex


def test_add_new_adds_each_id_once_ever(tmp_path: Path) -> None:
    spool = LmdbBackend(str(tmp_path / "spool"), 1 << 26)
    try:
        first = [message(1000.0 + n, n, [("a@x.test", "ready"), ("b@y.test", "deferred")]) for n in range(3)]
        other = message(2000.0, 9, [("c@z.test", "held")])
        spool.commit([other])  # received, not imported: skipped too
        assert spool.add_new(first + [other]) == [m.envelope.id for m in first]
        assert spool.add_new(first) == []
        spool.delete([first[0].envelope.id])  # delivered and gone
        assert spool.add_new(first + [first[1]]) == []
        again = message(3000.0, 7, [("d@x.test", "ready")])
        assert spool.add_new([again, again]) == [again.envelope.id]  # twice in one file: once
        assert spool.totals() == {"ready": 3, "deferred": 2, "held": 1, "messages": 4}
    finally:
        spool.close()
    stored, expected, _meta = spoolindex.read(str(tmp_path / "spool"))
    assert stored == expected


def test_add_new_keeps_the_size_limit(tmp_path: Path) -> None:
    spool = LmdbBackend(str(tmp_path / "spool"), 1000)
    try:
        big = [message(1000.0 + n, n, [("a@x.test", "ready")]) for n in range(40)]
        with pytest.raises(QueueFull):
            spool.add_new(big)
        assert spool.totals()["messages"] == 0
        assert spool.add_new(big[:2]) == [m.envelope.id for m in big[:2]]  # nothing of the refused one was kept
    finally:
        spool.close()
