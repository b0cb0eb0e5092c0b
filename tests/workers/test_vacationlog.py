"""The vacation record in a mailbox: one reply per (sender, handle) per :days, durable,
locked across processes from the check to the record."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from workers.delivery.vacationlog import FILE_NAME, VacationLog

DAY = 86400.0
NOW = 1_800_000_000.0


def locked(box: Path) -> VacationLog:
    return asyncio.run(VacationLog.acquire(str(box)))


def answered(box: Path, sender: str, handle: str, now: float) -> bool:
    log = locked(box)
    try:
        return log.answered(sender, handle, now)
    finally:
        log.close()


def record(box: Path, sender: str, handle: str, days: int, now: float) -> None:
    log = locked(box)
    try:
        log.record(sender, handle, days, now)
    finally:
        log.close()


def test_answered_within_days_then_again_after(tmp_path: Path) -> None:
    assert not answered(tmp_path, "a@x.test", "h", NOW)
    record(tmp_path, "a@x.test", "h", 1, NOW)
    assert answered(tmp_path, "A@X.test", "h", NOW + DAY - 1)  # the sender's case does not matter
    assert not answered(tmp_path, "a@x.test", "h", NOW + DAY + 1)
    assert not answered(tmp_path, "a@x.test", "other-handle", NOW)
    assert not answered(tmp_path, "b@x.test", "h", NOW)
    assert os.stat(tmp_path / FILE_NAME).st_mode & 0o777 == 0o600
    assert b"a@x.test" not in (tmp_path / FILE_NAME).read_bytes()  # no correspondent named


def test_expired_lines_are_dropped_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    for n in range(40):
        record(tmp_path, f"s{n}@x.test", "h", 1, NOW)
    with open(tmp_path / FILE_NAME, "ab") as f:
        f.write(b"17999")  # a crash in the middle of an append
    record(tmp_path, "next@x.test", "h", 1, NOW)  # not glued to the torn line
    assert answered(tmp_path, "next@x.test", "h", NOW)
    assert not answered(tmp_path, "next@x.test", "h", NOW + 2 * DAY)
    record(tmp_path, "late@x.test", "h", 7, NOW + 2 * DAY)
    assert len((tmp_path / FILE_NAME).read_bytes().splitlines()) == 1
    assert answered(tmp_path, "late@x.test", "h", NOW + 3 * DAY)
    assert not answered(tmp_path, "s1@x.test", "h", NOW + 3 * DAY)


def _claim(box: str, results: "multiprocessing.queues.Queue[bool]") -> None:
    async def claim() -> bool:
        log = await VacationLog.acquire(box)
        try:
            if log.answered("a@x.test", "h", NOW):
                return False
            await asyncio.sleep(0.05)  # the reply's commit
            log.record("a@x.test", "h", 1, NOW)
            return True
        finally:
            log.close()

    results.put(asyncio.run(claim()))


def test_of_concurrent_deliveries_in_separate_processes_one_replies(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=_claim, args=(str(tmp_path), results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(results.get(timeout=5) for _ in procs) == [False, False, False, True]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_the_record_belongs_to_the_mailboxs_owner(tmp_path: Path) -> None:
    """With [local] owner the mailbox is the mail user's (Dovecot's); so is the record in it."""
    os.chown(tmp_path, 65534, 65534)
    locked(tmp_path).close()
    made = (tmp_path / FILE_NAME).stat()
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (65534, 65534, 0o600)
