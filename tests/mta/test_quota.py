"""Maildir++ quota: the maildirsize file as Dovecot's maildir backend writes and trusts it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mta import quota
from mta.quota import Limits, Usage


@pytest.fixture
def box(tmp_path: Path) -> Path:
    for folder in ("", ".Sent", ".Trash"):
        for sub in ("new", "cur", "tmp"):
            (tmp_path / folder / sub).mkdir(parents=True, exist_ok=True)
    return tmp_path


def put(box: Path, where: str, name: str, size: int) -> Path:
    path = box / where / name
    path.write_bytes(b"x" * size)
    return path


@pytest.mark.parametrize("limits, header", [
    (Limits(1000, 50), "1000S,50C"), (Limits(1000, 0), "1000S"), (Limits(0, 50), "50C"), (Limits(0, 0), "0S"),
])
def test_header_is_written_as_dovecot_writes_it(limits: Limits, header: str) -> None:
    assert limits.header() == header
    assert quota.parse_limits(header) == limits


def test_recalculation_counts_new_and_cur_of_every_folder_by_the_names_sizes(box: Path) -> None:
    put(box, "new", "1.M1P1.h,S=100,W=104", 7)  # the name's size wins (Dovecot reads no file)
    put(box, "cur", "2.M1P1.h,S=200:2,S", 9)
    put(box, "cur", "3.M1P1.h:2,", 30)  # no size in the name: stat
    put(box, ".Sent/cur", "4.M1P1.h,S=1000,W=1010:2,S", 1)
    put(box, ".Trash/new", "5.M1P1.h,S=5", 1)
    put(box, "tmp", "6.M1P1.h,S=99999", 1)  # tmp/ never counts
    put(box, "new", "7.M1P1.h,S=12x", 40)  # not a size: stat
    assert quota.recalculate(str(box), Limits(10_000, 0)) == Usage(100 + 200 + 30 + 1000 + 5 + 40, 6)
    assert (box / "maildirsize").read_text() == "10000S\n1375 6\n"
    assert oct((box / "maildirsize").stat().st_mode & 0o777) == "0o600"


def test_deliveries_append_and_the_sum_is_the_usage(box: Path) -> None:
    limits = Limits(10_000, 100)
    assert quota.usage(str(box), limits) == Usage(0, 0)  # missing: recalculated and written
    quota.add(str(box), 300)
    quota.add(str(box), -100, -1)  # what Dovecot appends on expunge
    quota.add(str(box), 50)
    assert (box / "maildirsize").read_text() == "10000S,100C\n0 0\n300 1\n-100 -1\n50 1\n"
    assert quota.read(str(box), limits) == Usage(250, 1)


def test_add_to_a_missing_file_leaves_it_for_recalculation(box: Path) -> None:
    quota.add(str(box), 300)
    assert not (box / "maildirsize").exists()


@pytest.mark.parametrize("text, why", [
    ("1000S\n", "no usage line"),
    ("2000S\n10 1\n", "the limits changed"),
    ("1000S\n10 x\n", "a bad line"),
    ("1000S\n10 1\n-20 -1\n", "negative"),
    ("1000S\n10\0 1\n", "a NUL"),
    ("1000S\n" + "10 1\n" * 1100, "5120 bytes or more"),
])
def test_read_refuses_what_dovecot_would_recalculate(box: Path, text: str, why: str) -> None:
    (box / "maildirsize").write_text(text)
    assert quota.read(str(box), Limits(1000, 0)) is None, why


def test_a_last_line_without_newline_is_not_counted_yet(box: Path) -> None:
    (box / "maildirsize").write_text("1000S\n10 1\n20 1")
    assert quota.read(str(box), Limits(1000, 0)) == Usage(10, 1)


def test_over_quota_is_trusted_only_from_one_fresh_line(box: Path) -> None:
    limits = Limits(1000, 0)
    (box / "maildirsize").write_text("1000S\n1000 3\n")
    assert quota.read(str(box), limits) == Usage(1000, 3)  # one recent line: full, trusted
    (box / "maildirsize").write_text("1000S\n900 3\n100 1\n")
    assert quota.read(str(box), limits) is None  # full by appended lines: count again
    (box / "maildirsize").write_text("1000S\n1000 3\n")
    old = os.stat(box / "maildirsize").st_mtime - 16 * 60
    os.utime(box / "maildirsize", (old, old))
    for folder in box.glob("**/new"), box.glob("**/cur"):
        for path in folder:
            os.utime(path, (old - 60, old - 60))  # no folder changed since: only the age speaks
    assert quota.read(str(box), limits) is None  # older than 15 minutes
    (box / "maildirsize").write_text("1000S\n500 3\n100 1\n")
    assert quota.read(str(box), limits) == Usage(600, 4)  # not full: appended lines are trusted


def test_a_full_mailbox_changed_after_its_file_is_counted_again(box: Path) -> None:
    limits = Limits(0, 2)
    a, b = put(box, "cur", "a,S=10:2,", 10), put(box, "new", "b,S=10", 10)
    assert quota.recalculate(str(box), limits) == Usage(20, 2)
    assert quota.usage(str(box), limits).full(limits)
    a.unlink()  # a client deleted mail and left maildirsize as it was
    st = os.stat(box / "maildirsize")
    os.utime(box / "cur", ns=(st.st_mtime_ns + 1000, st.st_mtime_ns + 1000))
    assert quota.usage(str(box), limits, write=False) == Usage(10, 1)
    assert (box / "maildirsize").read_text() == "2C\n20 2\n"  # write=False: the file untouched
    assert quota.usage(str(box), limits) == Usage(10, 1)
    assert (box / "maildirsize").read_text() == "2C\n10 1\n"
    assert b.exists()


def test_full_fits_and_percent() -> None:
    limits = Limits(1000, 10)
    assert not Usage(999, 9).full(limits) and Usage(1000, 0).full(limits) and Usage(0, 10).full(limits)
    assert Usage(900, 0).fits(limits, 100) and not Usage(900, 0).fits(limits, 101)
    assert not Usage(0, 10).fits(limits, 1)
    assert Usage(500, 9).percent(limits) == 90.0
    assert Usage(10**9, 10**9).percent(Limits()) == 0.0 and Usage(10**9, 0).fits(Limits(), 10**9)


@pytest.mark.parametrize("name, size", [
    ("1.M2P3.host,S=1234", 1234), ("1.M2P3.host,S=1234,W=1260:2,S", 1234), ("1.M2P3.host,S=77:2,", 77),
    ("1.M2P3.host", None), ("1.M2P3.host,S=12a", None), ("1.M2P3.host,W=5", None),
])
def test_size_from_name(name: str, size: int | None) -> None:
    assert quota.size_from_name(name) == size
