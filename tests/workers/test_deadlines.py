"""Session deadlines: the whole session and the whole transfer, which no byte restarts."""

from mta.config import LimitsConfig
from workers.inbound.deadlines import Deadlines

LIMITS = LimitsConfig(data_total_timeout_seconds=10.0, session_timeout_seconds=100.0)


def test_the_session_deadline_runs_from_the_start_whatever_happens() -> None:
    d = Deadlines.start(LIMITS, now=1000.0)
    assert d.next == 1100.0
    assert d.expired(1099.9) is None
    assert d.expired(1100.0) == "session_timeout"


def test_a_transfer_deadline_runs_from_its_start_to_its_end() -> None:
    d = Deadlines.start(LIMITS, now=0.0)
    d.transfer(True, now=5.0)
    d.transfer(True, now=9.0)  # still the same transfer: the clock does not restart
    assert d.next == 15.0
    assert d.expired(14.9) is None
    assert d.expired(15.0) == "data_total_timeout"
    d.transfer(False, now=14.0)
    assert d.expired(15.0) is None and d.next == 100.0
    d.transfer(True, now=50.0)  # the next message has its own
    assert d.next == 60.0


def test_the_earlier_deadline_wins() -> None:
    d = Deadlines.start(LIMITS, now=0.0)
    d.transfer(True, now=95.0)
    assert d.next == 100.0
    assert d.expired(100.0) == "session_timeout"
    assert d.expired(105.0) == "data_total_timeout"
