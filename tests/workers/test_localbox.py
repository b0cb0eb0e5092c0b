"""workers/delivery/localbox.py over real files: which mailbox an address names, quota refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import Config, LocalConfig, ServerConfig
from workers.delivery.localbox import LocalDelivery
from workers.delivery.maildir import MaildirError


def local(tmp_path: Path, lines: str | None, **options: object) -> LocalDelivery:
    (tmp_path / "mail").mkdir(exist_ok=True)
    mailboxes = ""
    if lines is not None:
        (tmp_path / "mailboxes").write_text(lines)
        mailboxes = str(tmp_path / "mailboxes")
    return LocalDelivery(Config(server=ServerConfig(hostname="mx.test"),
                                local=LocalConfig(maildir_root=str(tmp_path / "mail"), mailboxes=mailboxes,
                                                  **options)))  # type: ignore[arg-type]


def test_mailbox_dir_follows_aliases_and_exists_only_once_made(tmp_path: Path) -> None:
    delivery = local(tmp_path, "alice@a.test aliases=al@b.test\n")
    assert delivery.mailbox_dir("al@b.test") is None  # listed, not made yet
    delivery.deliver("AL@b.test", b"Subject: x\r\n\r\nhi\r\n", return_path="s@x.test")
    assert delivery.mailbox_dir("al@b.test") == str(tmp_path / "mail" / "a.test" / "alice")
    assert delivery.mailbox_dir("alice@A.test") == str(tmp_path / "mail" / "a.test" / "alice")
    assert delivery.mailbox_dir("bob@a.test") is None
    (tmp_path / "mail" / "a.test" / "bob").mkdir()
    assert delivery.mailbox_dir("bob@a.test") is None  # a folder alone is no mailbox with the file


def test_without_the_file_the_folder_decides(tmp_path: Path) -> None:
    delivery = local(tmp_path, None)
    assert delivery.mailbox_dir("bob@a.test") is None
    with pytest.raises(MaildirError) as refused:
        delivery.deliver("bob@a.test", b"\r\n", return_path="")
    assert refused.value.status == "5.1.1"
    (tmp_path / "mail" / "a.test" / "bob").mkdir(parents=True)
    assert delivery.mailbox_dir("bob@a.test") == str(tmp_path / "mail" / "a.test" / "bob")
    assert Path(delivery.deliver("bob@a.test", b"\r\n", return_path="")).parent.name == "new"


@pytest.mark.parametrize("mode, temporary, status", [("defer", True, "4.2.2"), ("bounce", False, "5.2.2")])
def test_a_message_over_the_quota_is_refused_by_quota_full(tmp_path: Path, mode: str, temporary: bool,
                                                           status: str) -> None:
    delivery = local(tmp_path, "alice@a.test quota_bytes=200\n", quota_full=mode, quota_warn_percent=0)
    delivery.deliver("alice@a.test", b"x" * 100 + b"\r\n", return_path="s@x.test")
    with pytest.raises(MaildirError) as refused:
        delivery.deliver("alice@a.test", b"y" * 100 + b"\r\n", return_path="s@x.test")
    assert (refused.value.temporary, refused.value.status) == (temporary, status)
    assert "Mailbox full: alice@a.test holds 152 of 200 bytes" in refused.value.text
    assert (tmp_path / "mail" / "a.test" / "alice" / "maildirsize").read_text() == "200S\n0 0\n152 1\n"
