"""The users file: scrypt hashes, the file format, atomic saves, who owns which sender."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mta.users import User, UsersError, edit_users, hash_password, load_users, save_users, verify_password

HASH = hash_password("correct horse")  # computed once: scrypt is deliberately slow


def test_hash_and_verify_round_trip() -> None:
    assert HASH.startswith("scrypt$16384$8$1$")
    assert verify_password("correct horse", HASH)
    assert hash_password("correct horse") != HASH  # a fresh salt every time


def test_wrong_password_is_false() -> None:
    assert not verify_password("correct horse ", HASH)
    assert not verify_password("", HASH)


@pytest.mark.parametrize("stored", [
    "", "plain", "scrypt$16384$8$1$c2FsdA==", "md5$16384$8$1$c2FsdA==$a2V5a2V5a2V5a2V5a2V5",
    "scrypt$16385$8$1$c2FsdHNhbHRzYWx0c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",  # N not a power of 2
    "scrypt$16384$8$1$not*base64$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",
    "scrypt$16384$8$1$c2FsdA==$a2V5",  # key too short
    "scrypt$1048576$8$1$c2FsdHNhbHRzYWx0c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",  # 1 GiB: beyond maxmem
    "scrypt$１６$8$1$c2FsdHNhbHRzYWx0c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5",  # non-ASCII digits
])
def test_malformed_stored_hash_is_false_never_an_exception(stored: str) -> None:
    assert verify_password("anything", stored) is False


def test_undecodable_password_bytes_hash_as_they_came() -> None:
    raw = b"caf\xe9"  # Latin-1, not UTF-8
    stored = hash_password(raw.decode("utf-8", "surrogateescape"))
    assert verify_password(raw.decode("utf-8", "surrogateescape"), stored)
    assert not verify_password("café", stored)
    assert verify_password("\ud800", stored) is False  # a lone surrogate: no exception


def test_file_round_trip_with_comments_and_senders(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(
        "# SMTP AUTH users\n"
        "\n"
        f"alice@example.com:{HASH}\n"
        "   # indented comment\n"
        f"app:{HASH}:news@example.com, @lists.example.org\n"
        f"bob@example.com:{HASH}:\n")
    users = load_users(str(path))
    assert list(users) == ["alice@example.com", "app", "bob@example.com"]
    assert users["app"] == User("app", HASH, ("news@example.com", "@lists.example.org"))
    assert users["bob@example.com"].senders == ()

    users["carol@example.com"] = User("carol@example.com", HASH, ("@example.com",))
    del users["alice@example.com"]
    save_users(str(path), users)
    assert path.read_text() == (
        "# SMTP AUTH users\n"
        "\n"
        "   # indented comment\n"
        f"app:{HASH}:news@example.com,@lists.example.org\n"
        f"bob@example.com:{HASH}\n"
        f"carol@example.com:{HASH}:@example.com\n")
    assert load_users(str(path)) == users


@pytest.mark.parametrize("line, why", [
    ("alice", "expected name:hash"),
    (f"alice:{HASH}:a@x:extra", "expected name:hash"),
    ("alice:md5$abc", "not scrypt$N$r$p$salt$key"),
    (f"al ice:{HASH}", "white space"),
    (f":{HASH}", "1-256 characters"),
    (f"{'a' * 257}:{HASH}", "1-256 characters"),
    (f"a\x01b:{HASH}", "control character"),
    (f"a\u2028b:{HASH}", "white space"),  # no line break but \n: line numbers stay right
    (f"alice:{HASH}:example.com", 'use "user@example.com" or "@example.com"'),
    (f"alice:{HASH}:a b@example.com", 'use "user@example.com"'),
    (f"alice@example.com:{HASH}\nalice@example.com:{HASH}", "listed twice"),
])
def test_malformed_line_error_names_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"# header\nok:{HASH}\n{line}\n")
    with pytest.raises(UsersError) as caught:
        load_users(str(path))
    lineno = 3 + line.count("\n")
    assert str(caught.value).startswith(f"{path}:{lineno}: ")
    assert why in str(caught.value)


def test_new_file_is_0600_and_an_existing_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "users"
    with edit_users(str(path)) as users:  # a missing file is an empty table
        assert users == {}
        users["a@example.com"] = User("a@example.com", HASH)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "users.lock").stat().st_mode) == 0o600
    os.chmod(path, 0o640)
    inode = path.stat().st_ino
    with edit_users(str(path)) as users:
        users["b@example.com"] = User("b@example.com", HASH)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode  # replaced, not rewritten in place
    assert sorted(load_users(str(path))) == ["a@example.com", "b@example.com"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]  # no temp file left


def test_an_edit_that_raises_saves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "users"
    save_users(str(path), {"a@example.com": User("a@example.com", HASH)})
    before = path.read_text()
    with pytest.raises(RuntimeError), edit_users(str(path)) as users:
        del users["a@example.com"]
        raise RuntimeError("changed my mind")
    assert path.read_text() == before


def test_invalid_users_are_refused_when_built() -> None:
    with pytest.raises(UsersError, match="not scrypt"):
        User("a@example.com", "plain")
    with pytest.raises(UsersError, match="sender"):
        User("a@example.com", HASH, ("nobody",))


@pytest.mark.parametrize("user, sender, owned", [
    (User("alice@example.com", HASH), "alice@example.com", True),
    (User("alice@example.com", HASH), "alice@EXAMPLE.com", True),  # domains case-insensitively
    (User("alice@example.com", HASH), "Alice@example.com", False),  # local parts exactly
    (User("alice@example.com", HASH), "bob@example.com", False),
    (User("alice@example.com", HASH), "", False),  # the null sender is nobody's
    (User("alice@example.com", HASH), "alice", False),
    (User("relay-app", HASH), "relay-app", False),  # a name that is no address owns nothing
    (User("relay-app", HASH), "relay-app@example.com", False),
    (User("@example.com", HASH), "anyone@example.com", False),  # a name is one address, never a domain
    (User("app", HASH, ("@Example.com",)), "anyone@example.COM", True),
    (User("app", HASH, ("@example.com",)), "anyone@sub.example.com", False),
    (User("app", HASH, ("news@example.com", "@lists.example.org")), "news@example.com", True),
    (User("app", HASH, ("news@example.com",)), "other@example.com", False),
    (User("alice@example.com", HASH, ("news@example.com",)), "alice@example.com", False),  # senders replace the name
])
def test_owns(user: User, sender: str, owned: bool) -> None:
    assert user.owns(sender) is owned
