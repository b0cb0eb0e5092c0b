"""mta/queuetransfer.py's options for a receiving node that wants TLS and AUTH: what is refused before any I/O."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mta.queuetransfer import login_of


def args(**given: object) -> argparse.Namespace:
    return argparse.Namespace(**{"starttls": False, "ca_file": None, "user": None, "password_file": None, **given})


@pytest.mark.parametrize(("given", "why"), [
    ({"user": "alice"}, "--user and --password-file go together"),
    ({"user": "alice", "password_file": "/dev/null"}, "--user needs --starttls: a password is never sent in clear"),
    ({"ca_file": "/etc/ssl/certs/ca-certificates.crt"}, "--ca-file applies to --starttls"),
    ({"starttls": True, "ca_file": "/nonexistent.pem"}, "--ca-file /nonexistent.pem"),
    ({"starttls": True, "user": "alice", "password_file": "/nonexistent"}, "--password-file"),
    ({"starttls": True, "user": "alice", "password_file": "/dev/null"}, "the first line is empty"),
])
def test_refused(given: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        login_of(args(**given))


def test_the_first_line_is_the_password(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("correct horse\nignored\n")
    login = login_of(args(starttls=True, user="alice", password_file=str(tmp_path / "pw")))
    assert (login.user, login.password) == ("alice", "correct horse") and login.tls is not None
    assert login_of(args()).tls is None
