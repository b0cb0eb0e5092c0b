"""Sieve folder names to Maildir++ folder directories (what Dovecot lists as IMAP folders)."""

from __future__ import annotations

import pytest

from workers.delivery.folders import UnsafeFolder, maildir_folder, mutf7


@pytest.mark.parametrize(("name", "folder"), [
    ("Work", ".Work"),
    ("Work/Projects", ".Work.Projects"),
    ("Work.Projects", ".Work.Projects"),
    ("INBOX", ""),
    ("inbox", ""),
    ("INBOX/Sub", ".INBOX.Sub"),
    ("Tom & Jerry", ".Tom &- Jerry"),
    ("Réunions", ".R&AOk-unions"),
    ("日本語", ".&ZeVnLIqe-"),
])
def test_names_become_maildirplusplus_folders(name: str, folder: str) -> None:
    assert maildir_folder(name) == folder


def test_modified_utf7_matches_rfc3501_example() -> None:
    # RFC 3501 5.1.3: "~peter/mail/台北/日本語" -> "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert mutf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"


@pytest.mark.parametrize("name", ["", "A//B", ".Hidden", "Trailing.", "a\nb", "x\x00", "A" * 300, "..", "../x"])
def test_names_that_cannot_be_a_folder_are_refused(name: str) -> None:
    with pytest.raises(UnsafeFolder):
        maildir_folder(name)
