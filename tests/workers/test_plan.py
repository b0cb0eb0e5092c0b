"""The delivery plan (pure): priorities, fairness, windows, rate limits."""

import pytest

from mtaqueue.ids import MessageId
from workers.scheduler.plan import SUSPEND_SECONDS, Destination, Job, Limits, Plan

LIMITS = Limits(concurrency=3, initial_concurrency=5, max_messages_per_connection=100, max_messages_per_second=0)


def job(n: int, dest: str, priority: int = 0, arrival: float = 0.0) -> Job:
    return Job(n, MessageId(f"M{n}"), dest, (0,), priority, arrival or float(n))


def test_higher_priority_first_then_arrival() -> None:
    plan = Plan()
    for n in range(5):
        plan.add(job(n, "a.test"), LIMITS)
    plan.add(job(99, "a.test", priority=10, arrival=100.0), LIMITS)
    dest = plan.destinations["a.test"]
    assert [dest.pop().id for _ in range(6)] == [99, 0, 1, 2, 3, 4]


def test_window_starts_at_min_of_initial_and_limit_and_caps_sessions() -> None:
    plan = Plan()
    for n in range(10):
        plan.add(job(n, "a.test"), LIMITS)
    dest = plan.destinations["a.test"]
    assert dest.limit == 3
    opened = 0
    while (d := plan.next_destination(now=0.0)) is not None:
        d.pop()
        d.open_session(0.0)
        opened += 1
    assert opened == 3


def test_failures_halve_the_window_then_suspend_and_success_grows_it() -> None:
    plan = Plan()
    limits = Limits(concurrency=8, initial_concurrency=8, max_messages_per_connection=1, max_messages_per_second=0)
    plan.add(job(1, "b.test"), limits)
    dest = plan.destinations["b.test"]
    dest.on_session_failed(now=0.0)
    assert dest.limit == 4
    for _ in range(2):
        dest.on_session_failed(now=0.0)
    assert dest.limit == 1 and dest.suspended_until == 0.0
    dest.on_session_failed(now=10.0)
    assert dest.suspended_until == 10.0 + SUSPEND_SECONDS
    assert plan.next_destination(now=11.0) is None
    assert plan.next_destination(now=10.0 + SUSPEND_SECONDS) is dest
    dest.on_session_ok()
    assert dest.limit == 2


def test_a_small_domain_is_not_starved_by_a_large_one() -> None:
    plan = Plan()
    for n in range(1000):
        plan.add(job(n, "big.test"), LIMITS)
    plan.add(job(5000, "small.test", arrival=5000.0), LIMITS)
    served = []
    for step in range(4):
        d = plan.next_destination(now=1.0 + step)
        assert d is not None
        served.append(d.name)
        d.pop()
        d.last_served = 1.0 + step
    assert "small.test" in served[:2]


def test_rate_limit_tokens() -> None:
    plan = Plan()
    limits = Limits(concurrency=5, initial_concurrency=5, max_messages_per_connection=100, max_messages_per_second=2)
    plan.add(job(1, "r.test"), limits)
    dest = plan.destinations["r.test"]
    dest.tokens_at = 0.0
    assert dest.take_token(0.0) and dest.take_token(0.0)
    assert not dest.take_token(0.0)
    assert 0 < dest.token_wait(0.0) <= 0.5
    assert dest.take_token(0.6)


def test_a_destination_counts_its_own_sessions_and_panics_on_a_close_too_many() -> None:
    plan = Plan()
    plan.add(job(1, "c.test"), LIMITS)
    dest = plan.destinations["c.test"]
    dest.open_session(5.0)
    assert dest.in_flight == 1 and dest.last_served == 5.0
    dest.close_session()
    assert dest.in_flight == 0
    with pytest.raises(AssertionError, match="c.test: a session closed with none open"):
        dest.close_session()


def test_a_cluster_lease_caps_sessions_and_says_when_only_it_holds_them_back() -> None:
    plan = Plan()
    plan.shared_start = 0  # [cluster] redis: no session before a lease
    for n in range(10):
        plan.add(job(n, "a.test"), LIMITS)
    dest = plan.destinations["a.test"]
    assert plan.next_destination(now=0.0) is None and plan.short_of_lease
    assert dest.short_of_lease(0.0)
    dest.shared = 2  # the lease grew: two sessions, not the window's three
    opened = 0
    while (d := plan.next_destination(now=0.0)) is not None:
        d.pop()
        d.open_session(0.0)
        opened += 1
    assert opened == 2 and dest.short_of_lease(0.0)
    dest.shared = None  # Redis down, on_redis_down = "local": the node's own window
    assert plan.next_destination(now=0.0) is dest and not dest.short_of_lease(0.0)
    dest.close_session()
    dest.close_session()
    dest.remove(lambda j: True)
    plan.forget_idle()
    assert "a.test" not in plan.destinations
    plan.add(job(20, "a.test"), LIMITS)
    plan.destinations["a.test"].shared = 1
    plan.destinations["a.test"].pop()
    plan.forget_idle()
    assert "a.test" in plan.destinations  # idle, but its lease is given back before it goes


def cluster_destination(rate: float, shared: int) -> tuple[Plan, Destination]:
    """A.test with a cluster lease of `shared` slots and a cluster-wide message rate."""
    plan = Plan()
    plan.shared_start = 0
    limits = Limits(concurrency=3, initial_concurrency=3, max_messages_per_connection=100, max_messages_per_second=rate)
    plan.add(job(1, "a.test"), limits)
    dest = plan.destinations["a.test"]
    dest.shared = shared
    return plan, dest


def test_with_a_cluster_lease_rate_tokens_come_only_from_the_cluster() -> None:
    _plan, dest = cluster_destination(5, 1)
    assert not dest.take_token(100.0) and dest.wants_tokens  # no local burst, and time refills nothing
    assert not dest.take_token(200.0)
    dest.tokens += 2  # a batch from Redis (leases.py)
    assert dest.take_token(200.0) and dest.take_token(200.0) and not dest.take_token(200.0)
    dest.shared = None  # Redis down, on_redis_down = "local": the node's own bucket refills
    assert dest.take_token(300.0)


def test_waiting_for_the_clusters_rate_tokens_sets_no_timer_and_the_batch_reopens_it() -> None:
    # The answer from Redis dispatches (leases.py); a short timer here instead woke the
    # scheduler thousands of times a second, each a spool scan, while the batch was on its way.
    plan, dest = cluster_destination(5000, 2)
    assert not dest.take_token(10.0)
    assert dest.wait_for_token(10.0) is None and dest.suspended_until == 0.0
    assert plan.next_destination(60.0) is None and dest.short_of_lease(60.0)  # not picked, however late
    dest.tokens, dest.wants_tokens = 3.0, False  # the batch (leases.py _got_tokens)
    assert plan.next_destination(60.0) is dest and dest.take_token(60.0)
