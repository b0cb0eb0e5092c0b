"""RateLimiter against a real LmdbCache: every limit at limit + 1, windows, processes, AUTH lockout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mta.config import AuthConfig, Config, LimitsConfig, RateConfig
from mta.smtp import replies
from mtaqueue.cache_lmdb import LmdbCache
from tests.mta.test_resolver import Clock, cache, clock  # noqa: F401 (fixtures: a real LmdbCache, a fake clock)
from workers.inbound.decision import Decision
from workers.inbound.ratelimit import CONNECTION_RATE, LOCKED_OUT, RateLimiter

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_SECONDS = 30.0
IP = "192.0.2.7"
# open_connection's refusals: the reply and the reason the session logs and counts.
PER_IP_LIMIT = Decision(replies.CONNECTION_LIMIT, "max_connections_per_ip")
RATE_LIMIT = Decision(CONNECTION_RATE, "connection_rate")


def make_config(max_connections_per_ip: int = 50, auth: AuthConfig | None = None, **rate: Any) -> Config:
    return Config(limits=LimitsConfig(max_connections_per_ip=max_connections_per_ip),
                  rate=RateConfig(**rate), auth=auth or AuthConfig())


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(CHILD_TIMEOUT_SECONDS)
    return child.pid


# --- concurrent connections ------------------------------------------------------------------

def test_concurrency_limit_at_limit_plus_one_and_released_on_close(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(max_connections_per_ip=3), cache, clock=clock)
    assert [limiter.open_connection(IP, trusted=False) for _ in range(3)] == [None] * 3
    assert limiter.open_connection(IP, trusted=False) == PER_IP_LIMIT
    assert limiter.open_connection("192.0.2.8", trusted=False) is None  # per IP
    limiter.close_connection(IP)
    assert limiter.open_connection(IP, trusted=False) is None
    assert limiter.open_connection(IP, trusted=True) == PER_IP_LIMIT  # trusted clients too
    assert str(replies.CONNECTION_LIMIT) == "421 4.7.0 Error: too many connections from your address"


def test_closing_every_connection_leaves_no_entry(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(), cache, clock=clock)
    for _ in range(5):
        limiter.open_connection(IP, trusted=False)
    for _ in range(5):
        limiter.close_connection(IP)
    assert limiter.connections(IP) == {}
    limiter.close_connection(IP)  # one close too many: harmless
    assert limiter.connections(IP) == {}


def test_concurrency_adds_up_across_processes(cache: LmdbCache, clock: Clock) -> None:
    config = make_config(max_connections_per_ip=3)
    mine = RateLimiter(config, cache, clock=clock)
    parents = RateLimiter(config, cache, clock=clock, pid=os.getppid())  # another live process
    assert parents.open_connection(IP, trusted=False) is None
    assert parents.open_connection(IP, trusted=False) is None
    assert mine.open_connection(IP, trusted=False) is None
    assert mine.open_connection(IP, trusted=False) == PER_IP_LIMIT
    parents.close_connection(IP)
    assert mine.open_connection(IP, trusted=False) is None
    assert mine.connections(IP) == {os.getpid(): 2, os.getppid(): 1}


def test_a_dead_workers_connections_are_dropped_at_the_limit(cache: LmdbCache, clock: Clock) -> None:
    config = make_config(max_connections_per_ip=2)
    gone = RateLimiter(config, cache, clock=clock, pid=dead_pid())
    assert gone.open_connection(IP, trusted=False) is None
    assert gone.open_connection(IP, trusted=False) is None
    limiter = RateLimiter(config, cache, clock=clock)
    assert limiter.open_connection(IP, trusted=False) is None  # the dead pid's two are forgotten
    assert limiter.connections(IP) == {os.getpid(): 1}


_WORKER = """
import sys
from mta.config import Config, LimitsConfig
from mtaqueue.cache_lmdb import LmdbCache
from workers.inbound.ratelimit import RateLimiter
cache = LmdbCache(sys.argv[1])
limiter = RateLimiter(Config(limits=LimitsConfig(max_connections_per_ip=3)), cache)
print([limiter.open_connection("192.0.2.7", trusted=False) for _ in range(2)], flush=True)
sys.stdin.readline()
"""


def test_a_worker_killed_with_sigkill_does_not_leak_its_connections(tmp_path: Path, clock: Clock) -> None:
    path = str(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "queue")])}
    with subprocess.Popen([sys.executable, "-c", _WORKER, path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as worker:
        assert worker.stdout is not None
        try:
            assert worker.stdout.readline() == "[None, None]\n"  # two connections open in the worker
            cache = LmdbCache(path)
            limiter = RateLimiter(make_config(max_connections_per_ip=3), cache, clock=clock)
            assert limiter.open_connection(IP, trusted=False) is None
            assert limiter.open_connection(IP, trusted=False) == PER_IP_LIMIT  # the worker's two
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(CHILD_TIMEOUT_SECONDS)
    assert limiter.open_connection(IP, trusted=False) is None
    assert limiter.open_connection(IP, trusted=False) is None
    assert limiter.open_connection(IP, trusted=False) == PER_IP_LIMIT
    cache.close()


# --- windows ----------------------------------------------------------------------------------

def test_connection_window_and_its_reset(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(max_connections_per_ip=100, connections_per_window=2, window_seconds=60),
                          cache, clock=clock)
    assert [limiter.open_connection(IP, trusted=False) for _ in range(2)] == [None, None]
    assert limiter.open_connection(IP, trusted=False) == RATE_LIMIT
    assert str(CONNECTION_RATE) == "421 4.7.0 Error: too many connections from your address, try again later"
    # The refused connection gave its concurrency slot back.
    assert limiter.connections(IP) == {os.getpid(): 2}
    clock.now += 59.9
    assert limiter.open_connection(IP, trusted=False) == RATE_LIMIT
    clock.now += 0.1  # now >= window_start + window_seconds: a new window
    assert limiter.open_connection(IP, trusted=False) is None


@pytest.mark.parametrize(("kind", "text"), [("message", "too much mail"), ("recipient", "too many recipients")])
def test_message_and_recipient_limits_per_ip_and_per_user(cache: LmdbCache, clock: Clock, kind: str,
                                                          text: str) -> None:
    config = make_config(window_seconds=10, **{f"{kind}s_per_window": 2, f"user_{kind}s_per_window": 3})
    count = getattr(RateLimiter(config, cache, clock=clock), kind)
    assert [count(IP, None, trusted=False) for _ in range(2)] == [None, None]
    assert str(count(IP, None, trusted=False)) == f"450 4.7.1 Error: {text} from {IP}, try again later"
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):  # one user from three addresses
        assert count(ip, "alice", trusted=False) is None
    refused = count("192.0.2.4", "alice", trusted=False)
    assert str(refused) == f"450 4.7.1 Error: {text} from alice, try again later"
    clock.now += 9.9
    assert count(IP, None, trusted=False) is not None
    clock.now += 0.1  # the window of 10 s is over
    assert count(IP, None, trusted=False) is None
    assert count("192.0.2.4", "alice", trusted=False) is None


def test_a_refused_attempt_consumes_no_budget(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(messages_per_window=3, user_messages_per_window=1), cache, clock=clock)
    assert limiter.message(IP, "carol", trusted=False) is None
    for _ in range(5):  # refused by the user limit: the IP counts taken first are given back
        assert limiter.message(IP, "carol", trusted=False) is not None
    assert limiter.message(IP, None, trusted=False) is None
    assert limiter.message(IP, None, trusted=False) is None
    assert limiter.message(IP, None, trusted=False) is not None


def test_echoed_user_names_are_sanitized(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(user_messages_per_window=1), cache, clock=clock)
    user = "evil\r\n250 ok" + "x" * 100
    limiter.message(IP, user, trusted=False)
    refused = limiter.message(IP, user, trusted=False)
    assert refused is not None and "\r" not in str(refused) and "\n" not in str(refused)
    assert str(refused).startswith("450 4.7.1 Error: too much mail from evil??250 okxxx")


def test_trusted_clients_are_exempt_from_ip_windows_unless_configured(cache: LmdbCache, clock: Clock) -> None:
    limits: dict[str, Any] = dict(connections_per_window=1, messages_per_window=1, recipients_per_window=1)
    limiter = RateLimiter(make_config(**limits), cache, clock=clock)
    for _ in range(3):
        assert limiter.open_connection(IP, trusted=True) is None
        assert limiter.message(IP, None, trusted=True) is None
        assert limiter.recipient(IP, None, trusted=True) is None
    assert cache.entries() == 0 and limiter.connections(IP) == {os.getpid(): 3}  # the concurrency count alone
    strict = RateLimiter(make_config(exempt_mynetworks=False, **limits), cache, clock=clock)
    assert strict.open_connection(IP, trusted=True) is None
    assert strict.open_connection(IP, trusted=True) == RATE_LIMIT
    assert strict.message(IP, None, trusted=True) is None
    assert strict.message(IP, None, trusted=True) is not None


def test_user_limits_apply_to_trusted_clients(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(user_messages_per_window=1), cache, clock=clock)
    assert limiter.message(IP, "dave", trusted=True) is None
    assert limiter.message(IP, "dave", trusted=True) is not None


def test_window_entries_expire_a_window_after_their_last_use(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(messages_per_window=5, window_seconds=30), cache, clock=clock)
    limiter.message(IP, None, trusted=False)
    assert cache.get("rate", f"msg/ip/{IP}", clock()) == [clock.now, 1]
    clock.now += 30
    assert cache.get("rate", f"msg/ip/{IP}", clock()) is None


class NoCache:
    """Any use of the cache fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the cache was used: {name}")


def test_disabled_limits_touch_no_lmdb(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(), cache, clock=clock)  # every [rate] limit 0: the defaults
    for user in (None, "erin"):
        assert limiter.message(IP, user, trusted=False) is None
        assert limiter.recipient(IP, user, trusted=False) is None
    assert cache.entries() == 0
    untouchable = RateLimiter(make_config(), NoCache(), clock=clock)  # type: ignore[arg-type]
    assert untouchable.message(IP, "erin", trusted=False) is None
    assert untouchable.recipient(IP, "erin", trusted=False) is None


def test_limits_survive_a_new_limiter_on_the_same_cache(tmp_path: Path, clock: Clock) -> None:
    config = make_config(messages_per_window=1)
    first = LmdbCache(str(tmp_path / "cache"))
    assert RateLimiter(config, first, clock=clock).message(IP, None, trusted=False) is None
    first.close()
    second = LmdbCache(str(tmp_path / "cache"))  # a restarted worker
    assert RateLimiter(config, second, clock=clock).message(IP, None, trusted=False) is not None
    second.close()


# --- AUTH failures ----------------------------------------------------------------------------

def test_auth_delays_grow_then_lockout_then_it_ends(cache: LmdbCache, clock: Clock) -> None:
    auth = AuthConfig(slow_after_failures=2, failure_delay_seconds=1.5, max_failures=6, lockout_seconds=600)
    limiter = RateLimiter(make_config(auth=auth), cache, clock=clock)
    delays, locked = [limiter.auth_delay(IP)], [limiter.locked_out(IP)]
    for expected in range(1, 7):
        clock.now += 10
        assert limiter.auth_failed(IP) == expected
        delays.append(limiter.auth_delay(IP))
        locked.append(limiter.locked_out(IP))
    assert delays == [0.0, 0.0, 0.0, 1.5, 3.0, 4.5, 5.0]  # capped at 5 s
    assert locked == [False] * 6 + [True]
    assert not limiter.locked_out("192.0.2.99")
    clock.now += 600 - 50 - 0.1  # just before the end of the first failure's window (at +10)
    assert limiter.locked_out(IP)
    clock.now += 0.1
    assert not limiter.locked_out(IP)
    assert limiter.auth_delay(IP) == 0.0
    assert limiter.auth_failed(IP) == 1  # a fresh window
    assert str(LOCKED_OUT) == "421 4.7.0 Error: too many failed authentications from your address, try again later"


def test_auth_checks_in_progress_share_the_failure_budget(cache: LmdbCache, clock: Clock) -> None:
    limiter = RateLimiter(make_config(auth=AuthConfig(max_failures=3, lockout_seconds=600)), cache, clock=clock)
    other = RateLimiter(make_config(auth=AuthConfig(max_failures=3, lockout_seconds=600)), cache, clock=clock,
                        pid=os.getppid())
    assert [limiter.auth_begin(IP), other.auth_begin(IP), limiter.auth_begin(IP)] == ["ok"] * 3
    assert other.auth_begin(IP) == "busy"  # three checks in flight: the budget is used
    assert limiter.auth_begin("192.0.2.99") == "ok"  # another address has its own
    assert limiter.auth_end(IP, failed=False) == 0  # a success frees its slot, counts nothing
    assert other.auth_begin(IP) == "ok"
    assert limiter.auth_end(IP, failed=True) == 1
    assert limiter.auth_end(IP, failed=True) == 2
    assert not limiter.locked_out(IP)
    assert limiter.auth_begin(IP) == "busy"  # 2 failures + 1 in flight
    assert limiter.auth_end(IP, failed=True) == 3
    assert limiter.locked_out(IP) and other.auth_begin(IP) == "locked"
    clock.now += 600
    assert limiter.auth_begin(IP) == "ok" and not limiter.locked_out(IP)  # a fresh window


def test_auth_failures_count_for_trusted_clients_and_across_limiters(cache: LmdbCache, clock: Clock) -> None:
    config = make_config(auth=AuthConfig(max_failures=2))
    one, other = RateLimiter(config, cache, clock=clock), RateLimiter(config, cache, clock=clock, pid=os.getppid())
    one.auth_failed("127.0.0.1")  # auth accounting takes no `trusted`: loopback counts like anyone
    other.auth_failed("127.0.0.1")
    assert one.locked_out("127.0.0.1") and other.locked_out("127.0.0.1")


def test_a_dead_workers_connections_are_purged_when_a_worker_starts(cache: LmdbCache, clock: Clock) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    RateLimiter(make_config(), cache, clock=clock, pid=dead.pid).open_connection(IP, trusted=False)
    mine = RateLimiter(make_config(), cache, clock=clock, pid=os.getpid())  # a worker starting
    mine.open_connection(IP, trusted=False)
    assert mine.connections(IP) == {os.getpid(): 1}


def test_checks_of_a_worker_killed_mid_check_are_dropped(cache: LmdbCache, clock: Clock) -> None:
    config = make_config(auth=AuthConfig(max_failures=2, lockout_seconds=600))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = RateLimiter(config, cache, clock=clock, pid=dead.pid)
    assert [killed.auth_begin(IP), killed.auth_begin(IP)] == ["ok", "ok"]  # then it died: no auth_end
    live = RateLimiter(config, cache, clock=clock)
    assert live.auth_begin(IP) == "ok"  # the dead worker's two checks no longer hold the budget
    assert live.auth_begin(IP) == "ok"
    assert live.auth_begin(IP) == "busy"  # but the live worker's own two do
