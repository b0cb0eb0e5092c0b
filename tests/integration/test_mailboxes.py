"""Virtual mailboxes and quotas end to end: a real `mta serve`, smtplib, real Maildirs.

The mailboxes file ([local] mailboxes) decides who exists, aliases across domains
deliver to their mailbox, the maildirsize file (Maildir++, as Dovecot keeps it) decides
452 4.2.2 at RCPT, a deferral or a bounce with 5.2.2 at delivery, and the one warning.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import secrets
import smtplib
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, wait_until

pytestmark = pytest.mark.integration

FAST_RETRY = {"min_backoff_seconds": 1, "max_backoff_seconds": 1}


def serving(mta_server, tmp_path: Path, lines: list[str], *, domains: tuple[str, ...] = ("a.test",),
            local: dict | None = None, delivery: dict | None = None) -> MtaServer:  # type: ignore[no-untyped-def]
    (tmp_path / "mail").mkdir(exist_ok=True)
    (tmp_path / "mailboxes").write_text("# test mailboxes\n" + "".join(line + "\n" for line in lines))
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": list(domains), "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, **FAST_RETRY, **(delivery or {})},
        local={"maildir_root": str(tmp_path / "mail"), "mailboxes": str(tmp_path / "mailboxes"), **(local or {})},
    )


def body(n: int, size: int = 0, subject: str = "quota test") -> bytes:
    return (f"From: s@a.test\r\nSubject: {subject} {n}\r\nMessage-ID: <q{n}.{secrets.token_hex(4)}@client.test>\r\n\r\n"
            + "x" * size + "\r\n").encode()


def rcpt(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("s@a.test")
        return client.rcpt(address)


def send(port: int, to: str, data: bytes, sender: str = "s@a.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(sender, [to], data)


def messages(box: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir())


def maildirsize(box: Path) -> list[str]:
    return (box / "maildirsize").read_text().splitlines()


def test_full_mailbox_is_452_at_rcpt_and_takes_mail_again_when_space_is_freed(mta_server, tmp_path: Path) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test quota_messages=2"], local={"quota_warn_percent": 0})
    box = tmp_path / "mail" / "a.test" / "alice"
    for n in range(2):
        send(server.port, "alice@a.test", body(n))
        wait_until(lambda n=n: len(messages(box)) == n + 1, 15, f"message {n} in the mailbox", server)
    assert maildirsize(box)[0] == "2C"  # Dovecot's form: the count limit alone
    assert rcpt(server.port, "alice@a.test") == (452, b"4.2.2 Mailbox full")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(server.port, "alice@a.test", body(9))
    for path in messages(box):  # the user deletes mail (a client that does not update maildirsize)
        path.unlink()
    assert rcpt(server.port, "alice@a.test")[0] == 250
    send(server.port, "alice@a.test", body(3))
    wait_until(lambda: len(messages(box)) == 1, 15, "the message after space was freed", server)
    [stored] = messages(box)
    wait_until(lambda: sum(int(line.split()[1]) for line in maildirsize(box)[1:]) == 1, 5, "the count", server)
    lines = maildirsize(box)
    assert lines[0] == "2C" and lines[1] == "0 0"  # recalculated: the deleted mail no longer counts
    assert lines[2:] == [f"{stored.stat().st_size} 1"]


def test_a_message_that_would_overflow_defers_then_bounces_5_2_2(mta_server, tmp_path: Path) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test quota_bytes=3000", "s@a.test"],
                     local={"quota_warn_percent": 0}, delivery={"max_queue_lifetime_seconds": 4})
    alice, sender = tmp_path / "mail" / "a.test" / "alice", tmp_path / "mail" / "a.test" / "s"
    send(server.port, "alice@a.test", body(1, 2000))
    wait_until(lambda: messages(alice), 15, "the first message", server)
    assert rcpt(server.port, "alice@a.test")[0] == 250  # not full: RCPT cannot know the size
    send(server.port, "alice@a.test", body(2, 2000))
    wait_until(lambda: b"event=deferred" in server.log_bytes() and b"4.2.2 Mailbox full" in server.log_bytes(),
               15, "a 4.2.2 deferral", server)
    dsn = wait_until(lambda: messages(sender), 30, "the bounce to the sender", server)
    report = dsn[0].read_bytes()
    assert b"Status: 5.2.2" in report and b"Action: failed" in report
    assert b"Mailbox full" in report
    assert len(messages(alice)) == 1


def test_quota_full_bounce_bounces_at_once(mta_server, tmp_path: Path) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test quota_bytes=3000", "s@a.test"],
                     local={"quota_full": "bounce", "quota_warn_percent": 0})
    alice, sender = tmp_path / "mail" / "a.test" / "alice", tmp_path / "mail" / "a.test" / "s"
    send(server.port, "alice@a.test", body(1, 2000))
    wait_until(lambda: messages(alice), 15, "the first message", server)
    started = time.monotonic()
    send(server.port, "alice@a.test", body(2, 2000))
    dsn = wait_until(lambda: messages(sender), 15, "the bounce to the sender", server)
    assert time.monotonic() - started < 10  # the default lifetime is 5 days: this is not an expiry
    assert b"Status: 5.2.2" in dsn[0].read_bytes()
    assert b"event=deferred" not in server.log_bytes()


def warnings(box: Path) -> list[bytes]:
    return [data for data in (p.read_bytes() for p in messages(box)) if b"Subject: Your mailbox is" in data]


def test_one_warning_per_crossing_of_quota_warn_percent(mta_server, tmp_path: Path) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test quota_bytes=20000"], local={"quota_warn_percent": 30})
    box = tmp_path / "mail" / "a.test" / "alice"
    for n in range(5):  # ~2.2 KB each as stored: the third crosses 30%
        send(server.port, "alice@a.test", body(n, 2000))
        wait_until(lambda n=n: len(messages(box)) - len(warnings(box)) == n + 1, 15, f"message {n}", server)
    [warning] = warnings(box)
    parsed = email.message_from_bytes(warning, policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-generated" and parsed["To"] == "alice@a.test"
    assert "alice@a.test holds" in parsed.get_content() and "of 20000 bytes" in parsed.get_content()
    assert (box / "mta-quota-warned").exists()
    # Below the threshold again (mail deleted, maildirsize dropped as Maildir++ allows), then across it again.
    for path in messages(box):
        path.unlink()
    (box / "maildirsize").unlink()
    for n in range(5, 8):
        send(server.port, "alice@a.test", body(n, 2000))
        wait_until(lambda n=n: len(messages(box)) - len(warnings(box)) == n - 4, 15, f"message {n}", server)
    assert len(warnings(box)) == 1  # a new warning, for the new crossing (the old one was deleted)
    assert server.log_bytes().count(b"event=quota_warning") == 2


def test_the_file_is_read_again_when_it_changes(mta_server, tmp_path: Path) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test"])
    assert rcpt(server.port, "bob@a.test")[0] == 550
    assert not (tmp_path / "mail" / "a.test").exists()  # no directory needed: the file decides
    server.mta("mailbox", "add", "bob@a.test")
    assert rcpt(server.port, "bob@a.test")[0] == 250
    send(server.port, "bob@a.test", body(1))
    bob = tmp_path / "mail" / "a.test" / "bob"
    wait_until(lambda: messages(bob), 15, "bob's first message (his folder made)", server)
    (tmp_path / "mailboxes").write_text("alice@a.test quota_bytes=lots\nbob@a.test\n")  # a broken edit
    assert rcpt(server.port, "bob@a.test")[0] == 250  # the last good table is kept
    assert b"event=mailboxes_error" in server.log_bytes() and b"mailboxes:1:" in server.log_bytes()
    assert server.mta("mailbox", "delete", "alice@a.test", check=False).returncode == 1  # never edits a broken file
    (tmp_path / "mailboxes").write_text("alice@a.test\n")
    assert rcpt(server.port, "bob@a.test")[0] == 550


def test_aliases_across_domains_deliver_to_their_mailbox(mta_server, tmp_path: Path) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test aliases=Al@b.test,alice.smith@a.test"],
                     domains=("a.test", "b.test"))
    assert rcpt(server.port, "al@b.test")[0] == 250
    assert rcpt(server.port, "alice@b.test")[0] == 550
    send(server.port, "AL@b.test", body(1))
    send(server.port, "alice.smith@a.test", body(2))
    box = tmp_path / "mail" / "a.test" / "alice"
    wait_until(lambda: len(messages(box)) == 2, 15, "both messages in alice's mailbox", server)
    assert not (tmp_path / "mail" / "b.test").exists()
    for path in messages(box):
        assert path.read_bytes().split(b"\n")[1] == b"Delivered-To: alice@a.test"


@pytest.fixture
def system_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("creating a user and chown need root")
    name = f"mtavm{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=True)


def test_owner_creates_and_writes_mailboxes_as_that_user(mta_server, tmp_path: Path, system_user: str) -> None:
    server = serving(mta_server, tmp_path, ["alice@a.test quota_bytes=100000"],
                     local={"owner": system_user, "quota_warn_percent": 1})
    send(server.port, "alice@a.test", body(1, 2000))
    box = tmp_path / "mail" / "a.test" / "alice"
    wait_until(lambda: len(messages(box)) == 2, 15, "the message and the warning", server)
    user = pwd.getpwnam(system_user)
    folders = [tmp_path / "mail" / "a.test", box, box / "tmp", box / "new", box / "cur"]
    files = [*messages(box), box / "maildirsize", box / "mta-quota-warned"]
    for path in folders + files:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), path
        assert stat.S_IMODE(st.st_mode) == (0o700 if path in folders else 0o600), path


def test_owner_must_exist(tmp_path: Path) -> None:
    from tests.integration.conftest import run_mta
    config = tmp_path / "mta.toml"
    config.write_text('[local]\nowner = "no-such-user-here"\n')
    result = run_mta("config", "check", "-c", str(config), check=False)
    assert result.returncode == 2
    assert b"[local] owner: no user 'no-such-user-here'" in result.stderr
