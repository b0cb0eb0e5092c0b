"""LmdbCache: TTLs, the entry and space bounds, sharing between processes."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtaqueue.cache_lmdb import _BE64, _BYTES, MIB, LmdbCache, _cost

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_SECONDS = 30.0


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[LmdbCache]:
    c = LmdbCache(str(tmp_path / "cache"), max_size_bytes=4 * MIB, max_entries=100)
    yield c
    c.close()


def test_get_returns_what_put_stored_until_the_ttl_ends(cache: LmdbCache) -> None:
    cache.put("dns", "example.test/MX", {"r": "ok", "d": [[10, "mx.example.test"]]}, 60, now=1000.0)
    assert cache.get("dns", "example.test/MX", now=1000.0) == {"r": "ok", "d": [[10, "mx.example.test"]]}
    assert cache.get("dns", "example.test/MX", now=1059.9) == {"r": "ok", "d": [[10, "mx.example.test"]]}
    assert cache.get("dns", "example.test/MX", now=1060.0) is None
    assert cache.get("dns", "absent/MX", now=1000.0) is None


def test_namespaces_are_separate(cache: LmdbCache) -> None:
    cache.put("dns", "k", 1, 60, now=0.0)
    cache.put("auth", "k", 2, 60, now=0.0)
    assert (cache.get("dns", "k", 1.0), cache.get("auth", "k", 1.0)) == (1, 2)
    cache.delete("dns", "k")
    assert (cache.get("dns", "k", 1.0), cache.get("auth", "k", 1.0)) == (None, 2)
    with pytest.raises(ValueError):
        cache.put("a\0b", "k", 1, 60, now=0.0)


def test_overwrite_replaces_value_and_expiry(cache: LmdbCache) -> None:
    cache.put("dns", "k", "old", 100, now=0.0)
    cache.put("dns", "k", "new", 10, now=0.0)
    assert cache.get("dns", "k", now=5.0) == "new"
    assert cache.get("dns", "k", now=50.0) is None
    assert cache.entries() == 1


def test_zero_ttl_removes_the_entry(cache: LmdbCache) -> None:
    cache.put("dns", "k", "v", 100, now=0.0)
    cache.put("dns", "k", "v2", 0, now=0.0)
    assert cache.get("dns", "k", now=0.0) is None
    assert cache.entries() == 0


def test_long_keys_are_hashed_not_refused(cache: LmdbCache) -> None:
    long_a, long_b = "a" * 2000, "a" * 1999 + "b"
    cache.put("auth", long_a, "A", 60, now=0.0)
    cache.put("auth", long_b, "B", 60, now=0.0)
    assert (cache.get("auth", long_a, 1.0), cache.get("auth", long_b, 1.0)) == ("A", "B")


def test_max_entries_evicts_expired_entries_first(cache: LmdbCache) -> None:
    for i in range(50):
        cache.put("t", f"short{i}", i, 10, now=0.0)  # expired by now=20
    for i in range(50):
        cache.put("t", f"long{i}", i, 1000, now=0.0)
    assert cache.entries() == 100
    for i in range(50):
        cache.put("t", f"new{i}", i, 500, now=20.0)
    assert cache.entries() <= 100
    assert all(cache.get("t", f"long{i}", 20.0) == i for i in range(50))
    assert all(cache.get("t", f"new{i}", 20.0) == i for i in range(50))


def test_max_entries_then_evicts_the_soonest_expiring(cache: LmdbCache) -> None:
    for i in range(100):
        cache.put("t", f"k{i}", i, 100 + i, now=0.0)  # k0 expires first
    cache.put("t", "extra", "x", 1000, now=1.0)
    assert cache.entries() == 100
    assert cache.get("t", "k0", 1.0) is None
    assert cache.get("t", "k1", 1.0) == 1
    assert cache.get("t", "extra", 1.0) == "x"


def test_puts_sweep_expired_entries(cache: LmdbCache) -> None:
    for i in range(40):
        cache.put("t", f"k{i}", i, 1, now=0.0)
    for i in range(3):
        cache.put("t", f"fresh{i}", i, 100, now=10.0)
    assert cache.entries() == 3


def test_a_full_map_never_raises_and_keeps_recent_entries(tmp_path: Path) -> None:
    c = LmdbCache(str(tmp_path / "cache"), max_size_bytes=1 * MIB, max_entries=1_000_000)
    value = "x" * 900
    for i in range(5000):  # ~5 MB of values into a 1 MiB map
        c.put("t", f"key{i}", value, 1000 + i, now=0.0)
    assert c.get("t", "key4999", now=1.0) == value
    assert c.entries() < 1200
    c.put("t", "huge", "y" * (2 * MIB), 1000, now=0.0)  # larger than the map: skipped, no error
    assert c.get("t", "huge", now=1.0) is None
    c.close()


def test_map_full_despite_the_estimate_is_survived(tmp_path: Path) -> None:
    c = LmdbCache(str(tmp_path / "cache"), max_size_bytes=1 * MIB, max_entries=1_000_000)
    c.budget_bytes = 64 * MIB  # pretend the estimate is far off: LMDB itself runs out of map
    for i in range(3000):
        c.put("t", f"key{i}", "x" * 900, 1000 + i, now=0.0)
    assert c.get("t", "key2999", now=1.0) == "x" * 900
    c.close()


def test_cache_survives_reopen(tmp_path: Path) -> None:
    c = LmdbCache(str(tmp_path / "cache"))
    c.put("dns", "k", [1, "two", b"three"], 60, now=0.0)
    c.close()
    c = LmdbCache(str(tmp_path / "cache"))
    assert c.get("dns", "k", now=1.0) == [1, "two", b"three"]
    c.close()


def test_use_after_fork_is_refused(cache: LmdbCache) -> None:
    cache.put("t", "k", b"v", 60.0, 0.0)
    pid = os.fork()
    if pid == 0:  # the child: the parent's handle must refuse, not corrupt
        try:
            cache.get("t", "k", 0.0)
        except RuntimeError as exc:
            os._exit(0 if "after fork" in str(exc) else 2)
        os._exit(1)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child could use the parent's cache"
    assert cache.get("t", "k", 0.0) == b"v"  # the parent still can


def check_invariants(cache: LmdbCache) -> None:
    """One index key per entry and vice versa; meta bytes = the sum of the entries' costs."""
    with cache._env.begin() as txn:
        entries = {bytes(k): bytes(v) for k, v in txn.cursor(db=cache._entry)}
        index = {bytes(k) for k, _ in txn.cursor(db=cache._expiry)}
        stored = _BE64.unpack(txn.get(_BYTES, db=cache._meta) or _BE64.pack(0))[0]
    assert index == {raw[:_BE64.size] + ekey for ekey, raw in entries.items()}
    assert stored == sum(_cost(ekey, raw) for ekey, raw in entries.items())


# --- update: read-modify-write in one transaction ------------------------------------------

def increment(value: int | None) -> int:
    return (value or 0) + 1


def test_update_stores_and_returns_what_fn_made_of_the_current_value(cache: LmdbCache) -> None:
    seen: list[object] = []

    def append(value: list[int] | None) -> list[int]:
        seen.append(value)
        return [*(value or []), len(seen)]

    assert cache.update("rate", "k", append, 60, now=0.0) == [1]
    assert cache.update("rate", "k", append, 60, now=1.0) == [1, 2]
    assert seen == [None, [1]]
    assert cache.get("rate", "k", now=2.0) == [1, 2]
    check_invariants(cache)


def test_update_sees_an_expired_entry_as_absent_and_moves_the_expiry(cache: LmdbCache) -> None:
    cache.put("rate", "k", 41, 10, now=0.0)
    assert cache.update("rate", "k", increment, 10, now=10.0) == 1  # 41 expired at 10.0
    assert cache.update("rate", "k", increment, 10, now=15.0) == 2  # expiry moved to 25.0
    assert cache.get("rate", "k", now=24.9) == 2
    assert cache.get("rate", "k", now=25.0) is None
    assert cache.entries() == 1
    check_invariants(cache)


def test_update_returning_none_removes_the_entry(cache: LmdbCache) -> None:
    cache.put("rate", "k", 1, 60, now=0.0)
    cache.put("rate", "other", 2, 60, now=0.0)
    assert cache.update("rate", "k", lambda value: None, 60, now=1.0) is None
    assert cache.update("rate", "absent", lambda value: None, 60, now=1.0) is None
    assert (cache.get("rate", "k", 1.0), cache.get("rate", "other", 1.0), cache.entries()) == (None, 2, 1)
    check_invariants(cache)


def test_update_with_a_ttl_of_zero_returns_without_storing(cache: LmdbCache) -> None:
    cache.put("rate", "k", 1, 60, now=0.0)
    assert cache.update("rate", "k", increment, 0, now=1.0) == 2
    assert cache.entries() == 0
    check_invariants(cache)


def test_update_raising_changes_nothing(cache: LmdbCache) -> None:
    cache.put("rate", "k", 1, 60, now=0.0)

    def broken(value: int | None) -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        cache.update("rate", "k", broken, 60, now=1.0)
    assert cache.get("rate", "k", now=1.0) == 1
    check_invariants(cache)


def test_update_respects_max_entries(cache: LmdbCache) -> None:
    for i in range(150):
        cache.update("rate", f"k{i}", increment, 100 + i, now=0.0)
    assert cache.entries() == 100
    assert cache.get("rate", "k149", now=1.0) == 1
    assert cache.get("rate", "k0", now=1.0) is None  # the soonest expiring went first
    check_invariants(cache)


def test_update_survives_a_full_map(tmp_path: Path) -> None:
    c = LmdbCache(str(tmp_path / "cache"), max_size_bytes=1 * MIB, max_entries=1_000_000)
    c.budget_bytes = 64 * MIB  # pretend the estimate is far off: LMDB itself runs out of map
    for i in range(3000):
        assert c.update("t", f"key{i}", lambda value: "x" * 900, 1000 + i, now=0.0) == "x" * 900
    assert c.get("t", "key2999", now=1.0) == "x" * 900
    huge = "y" * (2 * MIB)  # larger than the map: returned, never stored
    assert c.update("t", "huge", lambda value: huge, 1000, now=0.0) == huge
    assert c.get("t", "huge", now=1.0) is None
    check_invariants(c)
    c.close()


def _increment_many(path: str, count: int, start: multiprocessing.synchronize.Event) -> None:
    cache = LmdbCache(path, max_size_bytes=4 * MIB, max_entries=10_000)  # opened after the fork
    start.wait(CHILD_TIMEOUT_SECONDS)
    for _ in range(count):
        cache.update("rate", "counter", increment, 600, time.time())
    cache.close()


def test_concurrent_updates_from_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    children = [context.Process(target=_increment_many, args=(path, 500, start)) for _ in range(4)]
    for child in children:
        child.start()
    start.set()  # all four increment at once
    for child in children:
        child.join(CHILD_TIMEOUT_SECONDS)
    assert [c.exitcode for c in children] == [0, 0, 0, 0]
    cache = LmdbCache(path, max_size_bytes=4 * MIB, max_entries=10_000)
    assert cache.get("rate", "counter", time.time()) == 2000
    check_invariants(cache)
    cache.close()


_CHILD = textwrap.dedent("""
    import sys, time
    from mtaqueue.cache_lmdb import LmdbCache
    path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = LmdbCache(path, max_size_bytes=4 * 1024 * 1024, max_entries=10_000)
    print(repr(cache.get("t", "from-parent", time.time())), flush=True)
    for i in range(count):
        cache.put("t", f"{name}-{i}", i, 600, time.time())
    cache.close()
""")


def _child(path: Path, name: str, count: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "queue")])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), name, str(count)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_processes_see_each_others_entries(tmp_path: Path) -> None:
    import time
    path = tmp_path / "cache"
    parent = LmdbCache(str(path), max_size_bytes=4 * MIB, max_entries=10_000)
    parent.put("t", "from-parent", "hello", 600, time.time())
    children = [_child(path, name, 300) for name in ("a", "b")]  # two writers at once
    outputs = [c.communicate(timeout=CHILD_TIMEOUT_SECONDS)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0]
    assert outputs == ["'hello'\n", "'hello'\n"]
    now = time.time()
    assert all(parent.get("t", f"{name}-{i}", now) == i for name in ("a", "b") for i in range(300))
    assert parent.entries() == 601
    parent.close()


# --- property: never a wrong or stale value, always within bounds ------------------------

_ops = st.lists(
    st.tuples(st.sampled_from(["put", "update", "get", "delete", "tick"]), st.integers(0, 15), st.integers(0, 30)),
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(_ops)
def test_model(ops: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        c = LmdbCache(tmp, max_size_bytes=MIB, max_entries=8)
        model: dict[str, tuple[int, float]] = {}  # key -> (value, expiry)
        now = 0.0
        for serial, (op, k, n) in enumerate(ops):
            key = f"k{k}"
            if op == "put":
                c.put("t", key, serial, n, now)
                if n > 0:
                    model[key] = (serial, now + n)
                else:
                    model.pop(key, None)
            elif op == "update":  # removes the entry on every third key
                def fn(old: int | None) -> int | None:
                    value, expiry = model.get(key, (None, 0.0))
                    assert old in ((value, None) if expiry > now else (None,))
                    return None if k % 3 == 0 else serial

                c.update("t", key, fn, n, now)
                if n > 0 and k % 3:
                    model[key] = (serial, now + n)
                else:
                    model.pop(key, None)
            elif op == "delete":
                c.delete("t", key)
                model.pop(key, None)
            elif op == "tick":
                now += n / 3
            got = c.get("t", key, now)
            value, expiry = model.get(key, (None, 0.0))
            if expiry <= now:
                assert got is None  # expired or absent: never returned
            else:
                assert got in (value, None)  # present, or evicted; never another value
            assert c.entries() <= 8
        check_invariants(c)
        c.close()


def test_lmdb_is_opened_without_sync_and_with_writemap(tmp_path: Path) -> None:
    c = LmdbCache(str(tmp_path / "cache"))
    flags = c._env.flags()
    c.close()
    assert flags["sync"] is False and flags["metasync"] is False and flags["writemap"] is True
    assert lmdb.version()  # the binding is the real one
