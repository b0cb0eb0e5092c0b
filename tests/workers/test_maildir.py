"""Maildir delivery into a real directory: content, atomicity, refusals, fsync order."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mta import mailboxes
from workers.delivery import maildir
from workers.delivery.maildir import MaildirError

BODY = b"Received: from a by b\r\nSubject: hello\r\n\r\nline one\r\n.dot line\r\n"
STORED = b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.com\nReceived: from a by b\nSubject: hello\n\nline one\n.dot line\n"
LINES = STORED.count(b"\n")
SIZES = f",S={len(STORED)},W={len(STORED) + LINES}"  # Maildir++: the size, and with CRLF


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "example.com" / "bob").mkdir(parents=True)
    return tmp_path


def deliver(root: Path, user: str = "bob", domain: str = "example.com", body: bytes = BODY) -> str:
    return maildir.deliver(str(root), domain, user, body, return_path="alice@example.org",
                           delivered_to="bob@example.com", hostname="mx.example.com")


def test_delivers_into_new_with_headers_first(root: Path) -> None:
    path = deliver(root)
    box = root / "example.com" / "bob"
    assert Path(path).parent == box / "new"
    assert Path(path).read_bytes() == STORED
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []
    assert list((box / "new").iterdir()) == [Path(path)]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_null_sender_gives_an_empty_return_path(root: Path) -> None:
    path = maildir.deliver(str(root), "example.com", "bob", b"\r\n", return_path="",
                           delivered_to="bob@example.com", hostname="h")
    assert Path(path).read_bytes().startswith(b"Return-Path: <>\nDelivered-To: bob@example.com\n")


def test_file_names_are_unique_and_follow_the_maildir_convention(root: Path) -> None:
    names = {Path(deliver(root)).name for _ in range(50)}
    assert len(names) == 50
    for name in names:
        seconds, unique, host = name.split(".", 2)
        assert seconds.isdigit() and unique.startswith("M") and "P" in unique and "Q" in unique and "R" in unique
        assert host == "mx.example.com" + SIZES
        assert ":" not in name and "/" not in name


def test_hostname_slash_colon_and_comma_are_escaped(root: Path) -> None:
    path = maildir.deliver(str(root), "example.com", "bob", BODY, return_path="alice@example.org",
                           delivered_to="bob@example.com", hostname="odd/host:name,S=1")
    assert Path(path).name.endswith(".odd\\057host\\072name\\054S=1" + SIZES)


def test_user_and_domain_are_lower_cased(root: Path) -> None:
    path = deliver(root, user="Bob", domain="Example.COM")
    assert Path(path).parent.parent == root / "example.com" / "bob"
    assert mailboxes.mailbox_exists(str(root), "EXAMPLE.com", "BOB")


def test_missing_subdirectories_are_created_in_an_existing_mailbox(root: Path) -> None:
    box = root / "example.com" / "bob"
    deliver(root)
    assert (box / "cur").is_dir() and (box / "tmp").is_dir()


def test_missing_mailbox_is_a_permanent_5_1_1_and_never_created(root: Path) -> None:
    assert not mailboxes.mailbox_exists(str(root), "example.com", "carol")
    with pytest.raises(MaildirError) as caught:
        deliver(root, user="carol")
    assert (caught.value.temporary, caught.value.status) == (False, "5.1.1")
    assert not (root / "example.com" / "carol").exists()
    with pytest.raises(MaildirError) as caught:
        deliver(root, domain="example.net")
    assert caught.value.status == "5.1.1"
    assert not (root / "example.net").exists()


def test_a_file_where_the_mailbox_should_be_is_no_mailbox(root: Path) -> None:
    (root / "example.com" / "carol").write_bytes(b"")
    assert not mailboxes.mailbox_exists(str(root), "example.com", "carol")
    with pytest.raises(MaildirError) as caught:
        deliver(root, user="carol")
    assert caught.value.status == "5.1.1"


def test_missing_root_is_our_configuration_so_temporary(tmp_path: Path) -> None:
    with pytest.raises(MaildirError) as caught:
        deliver(tmp_path / "nowhere")
    assert caught.value.temporary and caught.value.status == "4.3.5"


@pytest.mark.parametrize(("user", "domain"), [
    ("../bob", "example.com"), ("bob/../../etc", "example.com"), ("..", "example.com"),
    ("a..b", "example.com"), (".hidden", "example.com"), ("bob\0", "example.com"),
    ("bo\nb", "example.com"), ("", "example.com"), ("bob", "../example.com"),
    ("bob", ".."), ("bob", "ex/ample.com"), ("bob", ""), ("bob", ".example.com"),
])
def test_path_tricks_are_refused_5_1_3(root: Path, user: str, domain: str) -> None:
    with pytest.raises(MaildirError) as caught:
        deliver(root, user=user, domain=domain)
    assert (caught.value.temporary, caught.value.status) == (False, "5.1.3")
    assert not mailboxes.mailbox_exists(str(root), domain, user)


def test_path_trick_cannot_reach_an_existing_directory(root: Path) -> None:
    (root / "example.com" / "bob" / "new").mkdir()
    with pytest.raises(MaildirError):
        deliver(root, user="bob/new")


def test_fsync_on_the_file_and_then_on_new(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = deliver(root)
    box = root / "example.com" / "bob"
    assert synced == [str(box / "tmp" / Path(path).name), str(box / "new")]


def test_disk_full_is_temporary_and_leaves_nothing_behind(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(MaildirError) as caught:
        deliver(root)
    assert (caught.value.temporary, caught.value.status) == (True, "4.3.0")
    box = root / "example.com" / "bob"
    assert list((box / "tmp").iterdir()) == [] and list((box / "new").iterdir()) == []


def test_io_error_on_fsync_is_temporary(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(MaildirError) as caught:
        deliver(root)
    assert (caught.value.temporary, caught.value.status) == (True, "4.3.0")
    box = root / "example.com" / "bob"
    assert list((box / "tmp").iterdir()) == [] and list((box / "new").iterdir()) == []


def test_failed_directory_fsync_takes_the_message_back(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def dir_fails(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", dir_fails)
    with pytest.raises(MaildirError) as caught:
        deliver(root)
    assert caught.value.temporary
    box = root / "example.com" / "bob"
    assert list((box / "tmp").iterdir()) == [] and list((box / "new").iterdir()) == []


def test_quota_is_mailbox_full(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def quota(fd: int, data: bytes) -> int:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "write", quota)
    with pytest.raises(MaildirError) as caught:
        deliver(root)
    assert (caught.value.temporary, caught.value.status) == (True, "4.2.2")


def test_permission_error_is_temporary_4_2_0(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(src: str, dst: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", dst)

    monkeypatch.setattr(os, "link", denied)
    with pytest.raises(MaildirError) as caught:
        deliver(root)
    assert (caught.value.temporary, caught.value.status) == (True, "4.2.0")
    assert "Permission denied" in caught.value.text
    assert list((root / "example.com" / "bob" / "tmp").iterdir()) == []


def test_file_system_without_hard_links_falls_back_to_rename(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = deliver(root)
    assert Path(path).read_bytes() == STORED
    assert list((root / "example.com" / "bob" / "tmp").iterdir()) == []


def test_name_collision_in_new_picks_another_name(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = iter(["taken", "free"])
    monkeypatch.setattr(maildir, "_unique_name", lambda hostname: next(names))
    (root / "example.com" / "bob" / "new").mkdir()
    (root / "example.com" / "bob" / "new" / ("taken" + SIZES)).write_bytes(b"older message")
    path = deliver(root)
    assert Path(path).name == "free" + SIZES
    assert (root / "example.com" / "bob" / "new" / ("taken" + SIZES)).read_bytes() == b"older message"
    assert list((root / "example.com" / "bob" / "tmp").iterdir()) == []


def test_error_attributes() -> None:
    error = MaildirError(True, "4.3.0", "disk full")
    assert (error.temporary, error.status, error.text, str(error)) == (True, "4.3.0", "disk full", "4.3.0 disk full")


def test_sizes_in_the_name_are_the_file_and_its_crlf_size(root: Path) -> None:
    path = Path(deliver(root))
    size = path.stat().st_size
    size, count = path.stat().st_size, path.read_bytes().count(b"\n")
    assert path.name.endswith(f",S={size},W={size + count}")


def test_open_mailbox_creates_a_listed_mailbox_and_refuses_an_unlisted_one(root: Path) -> None:
    with pytest.raises(MaildirError) as refused:
        maildir.open_mailbox(str(root), "example.net", "carol")
    assert (refused.value.temporary, refused.value.status) == (False, "5.1.1")
    box = maildir.open_mailbox(str(root), "example.net", "carol", create=True)
    assert sorted(p.name for p in Path(box).iterdir()) == ["cur", "new", "tmp"]
    assert os.stat(Path(box).parent).st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owner_gets_every_folder_and_file_created(root: Path) -> None:
    owner = (65534, 65534)
    box = maildir.open_mailbox(str(root), "example.net", "carol", create=True, owner=owner)
    path = maildir.store(box, b"Subject: x\n\nhi\n", "h", owner)
    for made in (Path(box).parent, Path(box), Path(box) / "tmp", Path(box) / "new", Path(box) / "cur", Path(path)):
        assert (made.stat().st_uid, made.stat().st_gid) == owner, made


def test_a_folder_is_created_as_maildirplusplus_and_stored_into(root: Path) -> None:
    path = maildir.deliver(str(root), "example.com", "bob", BODY, return_path="alice@example.org",
                           delivered_to="bob@example.com", hostname="mx.example.com", folder=".Work.Projects")
    folder = root / "example.com" / "bob" / ".Work.Projects"
    assert Path(path).parent == folder / "new"
    assert Path(path).read_bytes() == STORED
    assert sorted(p.name for p in folder.iterdir()) == ["cur", "maildirfolder", "new", "tmp"]
    assert (folder / "maildirfolder").stat().st_size == 0
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert list((root / "example.com" / "bob" / "new").iterdir()) == []  # not in INBOX
    again = maildir.deliver(str(root), "example.com", "bob", BODY, return_path="alice@example.org",
                            delivered_to="bob@example.com", hostname="mx.example.com", folder=".Work.Projects")
    assert sorted(p.name for p in (folder / "new").iterdir()) == sorted([Path(path).name, Path(again).name])
