"""The pickup's steps on real maildrop files: claim, read as untrusted input, set aside, settle."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mta import maildrop
from mta.maildrop import Drop, DropError, DropRecipient
from mtaqueue.ids import is_id
from workers.inbound.pickupfiles import ABANDONED_SECONDS, Files, claimed_at, settle_at_start

DROP = Drop("a@x.test", (DropRecipient("b@y.test"),))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    maildrop.prepare(str(tmp_path / "md"))
    return Files(str(tmp_path / "md"), 1000)


def test_claim_names_each_file_by_a_fresh_queue_id_and_leaves_unfinished_ones(files: Files) -> None:
    names = {maildrop.write(files.maildrop, DROP, b"m%d\r\n" % n) for n in range(3)}
    unfinished = Path(files.new) / f"{maildrop.TMP_PREFIX}0123"
    unfinished.write_bytes(b"half a fi")
    before = time.time()
    claimed = files.claim(2, time.time())
    assert len(claimed) == 2 and all(is_id(m) and claimed_at(m) >= before - 0.001 for m in claimed)
    assert sorted(os.listdir(files.pickup)) == sorted(claimed)
    claimed += files.claim(10, time.time())
    assert len(claimed) == 3 and os.listdir(files.new) == [unfinished.name]
    assert {files.read(m).message for m in claimed} == {b"m0\r\n", b"m1\r\n", b"m2\r\n"}
    assert len(names) == 3


def test_a_temporary_file_older_than_a_day_is_removed(files: Files) -> None:
    old = Path(files.new) / f"{maildrop.TMP_PREFIX}dead"
    old.write_bytes(b"its writer died")
    os.utime(old, (time.time() - ABANDONED_SECONDS - 10,) * 2)
    assert files.claim(10, time.time()) == [] and not old.exists()


def test_read_gives_the_owner_as_the_submitting_uid(files: Files) -> None:
    maildrop.write(files.maildrop, DROP, b"body\r\n")
    [msgid] = files.claim(10, time.time())
    os.chown(Path(files.pickup) / msgid, 4242, -1)
    got = files.read(msgid)
    assert (got.msgid, got.uid, got.drop, got.message) == (msgid, 4242, DROP, b"body\r\n")


def claim_raw(files: Files, make: object) -> str:
    path = Path(files.new) / "0123456789abcdef0123456789abcdef"
    make(path)  # type: ignore[operator]
    [msgid] = files.claim(10, time.time())
    return msgid


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_bytes(b"garbage"), "not a maildrop file"),
    (lambda p: p.symlink_to("/etc/shadow"), "not a regular file"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: (p.write_bytes(maildrop.encode(DROP, b"x\r\n")), os.link(p, p.parent.parent / "elsewhere")),
     "it has 2 links"),
    (lambda p: p.write_bytes(maildrop.encode(DROP, b"x" * 5000)), "over"),
])
def test_anything_but_a_sound_drop_is_refused_without_being_followed_or_blocking(files: Files, make: object,
                                                                                  why: str) -> None:
    msgid = claim_raw(files, make)
    with pytest.raises(DropError, match=why):
        files.read(msgid)
    files.corrupt(msgid, "test")
    assert os.listdir(files.pickup) == [] and os.listdir(files.corrupt_dir) == [msgid]


def test_settle_finishes_committed_files_and_returns_the_others(files: Files) -> None:
    for n in range(3):
        maildrop.write(files.maildrop, DROP, b"m%d\r\n" % n)
    first, second, third = sorted(files.claim(10, time.time()))
    done, pending = files.settle(lambda msgid: msgid == second)
    assert (done, pending) == ([second], [first, third])
    assert sorted(os.listdir(files.pickup)) == [first, third]


def test_at_start_committed_files_go_and_the_others_are_claimed_again_under_fresh_ids(files: Files) -> None:
    for n in range(2):
        maildrop.write(files.maildrop, DROP, b"m%d\r\n" % n)
    committed, lost = sorted(files.claim(10, time.time() - 3600))  # claimed an hour ago, then a crash
    lost_message = files.read(lost).message
    assert settle_at_start(files.maildrop, 1000, lambda msgid: msgid == committed) == 2
    [fresh] = os.listdir(files.pickup)
    assert fresh not in (committed, lost) and time.time() - claimed_at(fresh) < 5
    assert files.read(fresh).message == lost_message
