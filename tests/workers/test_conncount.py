"""The node's open connections per address in shared memory (conncount.py), on a real file:
counts against a model through another worker's reads, dead workers, a full table, the file."""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mta import logs
from workers.inbound import conncount
from workers.inbound.conncount import FILE_BYTES, FILE_NAME, MAX_USED, SLOTS, ConnectionCounts

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_SECONDS = 30.0


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(CHILD_TIMEOUT_SECONDS)
    return child.pid


def test_counts_match_a_model_through_another_workers_reads(tmp_path: Path) -> None:
    """Thousands of takes and give-backs over colliding addresses: every address's count,
    as another slot's owner reads it, is what was taken less what was given back."""
    rng = random.Random(21)
    mine = ConnectionCounts(str(tmp_path), os.getpid())
    reader = ConnectionCounts(str(tmp_path), os.getppid())  # another live worker
    addresses = [f"198.51.{n // 256}.{n % 256}" for n in range(3000)] + [f"2001:db8::{n:x}" for n in range(1000)]
    model: dict[str, int] = {}
    for step in range(30_000):
        ip = rng.choice(addresses[:400] if step % 3 else addresses)  # a hot set: long probe runs
        if model.get(ip) and rng.random() < 0.5:
            mine.give_back(ip)
            model[ip] -= 1
        else:
            assert mine.take(ip, 1_000)
            model[ip] = model.get(ip, 0) + 1
        if step % 97 == 0:
            for probe in rng.sample(addresses, 40):
                assert reader.counts(probe) == ({os.getpid(): model[probe]} if model.get(probe) else {})
    for ip, n in model.items():
        assert reader.counts(ip) == ({os.getpid(): n} if n else {}), ip
        for _ in range(n):
            mine.give_back(ip)
    assert all(reader.counts(ip) == {} for ip in addresses)


def test_the_limit_holds_across_slots_and_per_address(tmp_path: Path) -> None:
    one = ConnectionCounts(str(tmp_path), os.getpid())
    two = ConnectionCounts(str(tmp_path), os.getppid())
    assert one.take("192.0.2.1", 3) and two.take("192.0.2.1", 3) and one.take("192.0.2.1", 3)
    assert not two.take("192.0.2.1", 3) and not one.take("192.0.2.1", 3)
    assert two.take("192.0.2.10", 3)  # another address: its own count (a prefix of the text is not it)
    assert one.counts("192.0.2.1") == {os.getpid(): 2, os.getppid(): 1}  # a refusal counts nothing
    two.give_back("192.0.2.1")
    assert one.take("192.0.2.1", 3)


def test_a_dead_workers_slot_is_left_out_at_the_limit_and_freed_at_the_next_claim(tmp_path: Path) -> None:
    live = ConnectionCounts(str(tmp_path), os.getppid())
    gone = ConnectionCounts(str(tmp_path), dead_pid())  # a worker killed holding two connections
    assert gone.take("192.0.2.1", 5) and gone.take("192.0.2.1", 5)
    assert live.counts("192.0.2.1") == {gone.pid: 2}
    assert live.take("192.0.2.1", 2)  # 3 > 2: the dead slot is checked and left out
    assert live.take("192.0.2.1", 2) and not live.take("192.0.2.1", 2)
    ConnectionCounts(str(tmp_path), os.getpid())  # a worker starting frees the dead slot
    assert live.counts("192.0.2.1") == {os.getppid(): 2}


def test_a_slot_given_up_stops_counting_and_is_claimed_again_empty(tmp_path: Path) -> None:
    first = ConnectionCounts(str(tmp_path), os.getpid())
    assert first.take("192.0.2.1", 1)
    first.close()
    assert first.take("192.0.2.1", 1)  # closed: admits, uncounted
    second = ConnectionCounts(str(tmp_path), os.getpid())
    assert second.counts("192.0.2.1") == {}
    assert second.take("192.0.2.1", 1) and not second.take("192.0.2.1", 1)


def test_a_full_table_fails_open_and_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs, "_stream", log)
    counts = ConnectionCounts(str(tmp_path), os.getpid())
    for n in range(MAX_USED):
        assert counts.take(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 1)
    assert counts.take("192.0.2.1", 1) and counts.take("192.0.2.1", 1)  # uncounted: no limit
    assert counts.counts("192.0.2.1") == {}
    assert not counts.take("10.0.0.0", 1)  # the addresses counted still are
    counts.give_back("10.0.0.1")  # one place free again: a new address is counted
    assert counts.take("192.0.2.2", 1) and not counts.take("192.0.2.2", 1)
    full = [line for line in log.getvalue().splitlines() if "event=connection_table_full" in line]
    assert len(full) == 1 and f"{MAX_USED} addresses" in full[0]


def test_no_free_slot_fails_open_and_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs, "_stream", log)
    workers = [ConnectionCounts(str(tmp_path), os.getpid()) for _ in range(SLOTS)]
    assert workers[0].take("192.0.2.1", 1)
    extra = ConnectionCounts(str(tmp_path), os.getpid())
    assert extra.take("192.0.2.1", 1) and extra.take("192.0.2.1", 1)
    full = [line for line in log.getvalue().splitlines() if "event=connection_table_full" in line]
    assert len(full) == 1 and f"all {SLOTS} worker slots" in full[0]


_CLAIM = """
import sys, time
from workers.inbound.conncount import ConnectionCounts
time.sleep(float(sys.argv[2]) - time.time())  # all at once
counts = ConnectionCounts(sys.argv[1], 1)  # pid 1: alive, so no claimer frees another's slot
print(counts._slot, flush=True)
"""


def test_workers_starting_at_once_claim_distinct_slots(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "queue")])}
    start = f"{time.time() + 1.5}"
    workers = [subprocess.Popen([sys.executable, "-c", _CLAIM, str(tmp_path), start], stdout=subprocess.PIPE,
                                text=True, env=env) for _ in range(8)]
    slots = [int(w.communicate(timeout=CHILD_TIMEOUT_SECONDS)[0]) for w in workers]
    assert sorted(slots) == list(range(8))


def test_the_file_is_private_and_another_layout_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    old_umask = os.umask(0)
    try:
        counts = ConnectionCounts(str(tmp_path), os.getpid())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == FILE_BYTES
    assert counts.take("192.0.2.1", 1)
    path.unlink()
    path.write_bytes(b"another build's layout")
    path.chmod(0o644)
    again = ConnectionCounts(str(tmp_path), os.getpid())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == FILE_BYTES
    assert again.take("192.0.2.1", 1) and not again.take("192.0.2.1", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]


def test_keys_longer_than_an_entry_are_digests(tmp_path: Path) -> None:
    counts = ConnectionCounts(str(tmp_path), os.getpid())
    long_a, long_b = "x" * 100 + "a", "x" * 100 + "b"
    assert counts.take(long_a, 1) and counts.take(long_b, 1) and not counts.take(long_a, 1)
    assert conncount._key(long_a)[0] != conncount._key(long_b)[0]
