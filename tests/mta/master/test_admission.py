"""Session caps from the fd limit, and the accept back-off."""

from __future__ import annotations

from mta.config import LimitsConfig
from mta.master.admission import AcceptBackoff, session_caps


def test_caps_derive_from_the_fd_limit_unless_configured() -> None:
    derived = session_caps(LimitsConfig(), inbound_workers=2, fds=256)
    assert (derived.per_worker, derived.total) == ((256 - 64) // 2, 2 * 96)
    assert session_caps(LimitsConfig(max_sessions_per_worker=10), 3, 256).total == 30
    assert session_caps(LimitsConfig(max_sessions=7), 3, 1 << 20).total == 7
    assert session_caps(LimitsConfig(), 1, 20).per_worker == 1  # never 0


def test_accept_pauses_double_to_one_second_and_end_when_an_fd_is_freed() -> None:
    backoff = AcceptBackoff()
    pauses = []
    for now in range(7):
        backoff.failed(float(now))
        pauses.append(backoff.pause_seconds)
        assert backoff.paused(now + backoff.pause_seconds - 0.01) and not backoff.paused(now + backoff.pause_seconds)
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert backoff.fd_freed() and not backoff.paused(6.0) and not backoff.fd_freed()
    backoff.accepted()
    backoff.failed(10.0)
    assert backoff.pause_seconds == 0.1
