"""The virtual mailboxes file: parsing with line numbers, lookups, re-reading, the one editor."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mta.mailboxfile import (
    Mailbox,
    MailboxFile,
    MailboxFileError,
    edit_mailboxes,
    format_line,
    load_mailboxes,
    parse_mailboxes,
)

TEXT = """# mailboxes
alice@example.com quota_bytes=1048576 quota_messages=500 aliases=A.Smith@example.com,alice@example.net

Bob@Example.NET
"""


def test_parses_fields_and_looks_up_by_address_or_alias_in_any_case() -> None:
    table = parse_mailboxes(TEXT, "mb")
    alice = table.lookup("ALICE@example.com")
    assert alice == Mailbox("alice@example.com", 1048576, 500, ("a.smith@example.com", "alice@example.net"))
    assert table.lookup("a.smith@EXAMPLE.com") is alice and table.lookup("alice@example.net") is alice
    assert table.lookup("bob@example.net") == Mailbox("bob@example.net")
    assert table.lookup("carol@example.com") is None and table.lookup("alice") is None
    assert (alice.user, alice.domain, alice.has_quota) == ("alice", "example.com", True)
    assert len(table) == 2


@pytest.mark.parametrize("line, why", [
    ("alice@example.com quota=5", "'quota=5': expected one of quota_bytes="),
    ("alice@example.com quota_bytes=1M", "quota_bytes=1M: expected a whole number"),
    ("alice@example.com quota_bytes=1 quota_bytes=2", "quota_bytes given twice"),
    ("alice@example.com quota_messages=9223372036854775808", "quotas must be 0 (no limit) to 9223372036854775807"),
    ("alice", "'alice' is not an address"),
    ("../x@example.com", "unsafe user name"),
    ("alice@example.com aliases=bob", "'bob' is not an address"),
    ("bob@example.com aliases=alice@example.com", "alice@example.com is already listed on line 2"),
])
def test_errors_name_the_file_and_line(line: str, why: str) -> None:
    with pytest.raises(MailboxFileError) as raised:
        parse_mailboxes(f"# first\nalice@example.com\n{line}\n", "/etc/mta/mailboxes")
    assert str(raised.value).startswith("/etc/mta/mailboxes:3: ")
    assert why in str(raised.value)


def test_format_line_round_trips() -> None:
    for box in parse_mailboxes(TEXT, "mb").mailboxes.values():
        assert parse_mailboxes(format_line(box), "x").lookup(box.address) == box


def test_the_file_is_read_again_when_it_changes_and_a_bad_copy_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "mailboxes"
    path.write_text("alice@example.com\n")
    reader = MailboxFile(str(path))
    assert reader.lookup("alice@example.com") is not None and reader.lookup("bob@example.com") is None
    path.write_text("alice@example.com\nbob@example.com\n")
    assert reader.lookup("bob@example.com") is not None
    path.write_text("alice@example.com\nbob@example.com quota_bytes=x\n")
    assert reader.lookup("bob@example.com") is not None  # the last good table
    os.replace(tmp_path / "mailboxes", tmp_path / "gone")
    assert reader.lookup("alice@example.com") is None  # no file: no mailboxes


def test_edit_keeps_comments_order_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "mailboxes"
    path.write_text(TEXT)
    path.chmod(0o640)
    with edit_mailboxes(str(path)) as table:
        del table["alice@example.com"]
        table["carol@example.org"] = Mailbox("carol@example.org", quota_messages=3)
    assert path.read_text() == "# mailboxes\n\nbob@example.net\ncarol@example.org quota_messages=3\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not (tmp_path / "mailboxes.tmp").exists()


def test_edit_refuses_an_address_claimed_twice_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mailboxes"
    path.write_text(TEXT)
    before = path.read_bytes()
    with pytest.raises(MailboxFileError, match="alice@example.net is already listed"):
        with edit_mailboxes(str(path)) as table:
            table["alice@example.net"] = Mailbox("alice@example.net")
    assert path.read_bytes() == before
    assert len(load_mailboxes(str(path))) == 2
