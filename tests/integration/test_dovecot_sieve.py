"""mta's Sieve under Dovecot (needs Sieve in local delivery, branch q17-deliver).

The script a webmail uploads over ManageSieve, run by mta at delivery: the folder its
fileinto makes is an IMAP folder, its vacation reply an ordinary message, and nothing
mta keeps beside the mail shows up as a folder. The same script run by mta and by
Pigeonhole (an LMTP route) makes the same folder directories (modified UTF-7 names,
Maildir++ levels). The same private Dovecot and `mta serve` as test_dovecot.py (mta
writes as root; the test hands a mailbox to Dovecot's mail user before Dovecot reads it).
"""

from __future__ import annotations

import imaplib
import smtplib
from pathlib import Path

import pytest

from tests.integration.conftest import wait_until
from tests.integration.dovecot import (
    Dovecot,
    DovecotUser,
    ManageSieve,
    hand_over,
    start_dovecot,
)
from tests.integration.test_dovecot import (  # noqa: F401  (dovecot, vmail_user: fixtures)
    ALICE,
    DOMAIN,
    PASSWORD,
    ROUNDCUBE_SCRIPT,
    by_message_id,
    dovecot,
    fetch_all,
    folders,
    imap_login,
    mailbox,
    message,
    mta_over,
    vmail_user,
)

pytestmark = pytest.mark.integration

BOB = f"bob@{DOMAIN}"


def test_a_script_uploaded_over_managesieve_files_mail_into_an_imap_folder(
        mta_server, dovecot: Dovecot, vmail_user: str) -> None:  # noqa: F811
    box, bob_box = mailbox(dovecot), mailbox(dovecot, "bob")
    hand_over(box, vmail_user)
    client = ManageSieve(dovecot.managesieve_port)  # what Roundcube's Filters page does
    try:
        client.login(ALICE, PASSWORD)
        client.activate("roundcube", ROUNDCUBE_SCRIPT)
    finally:
        client.close()

    server = mta_over(mta_server, dovecot)
    announce = message(1, subject="Release 2.0").replace(
        b"\r\n\r\n", b"\r\nList-Id: Announcements <announce.example.org>\r\n", 1)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.sendmail(BOB, [ALICE], announce)
        smtp.sendmail(BOB, [ALICE], message(2, subject="lunch?"))
    lists_new = box / ".Lists" / "new"
    wait_until(lambda: lists_new.is_dir() and len(list(lists_new.iterdir())) == 1
               and len(list((box / "new").iterdir())) == 1, 20, "one message in .Lists, one in INBOX", server)
    [reply] = wait_until(lambda: (bob_box / "new").is_dir() and list((bob_box / "new").iterdir()), 20,
                         "the vacation reply to bob", server)
    hand_over(box, vmail_user)

    imap = imap_login(dovecot)
    try:
        # Lists is a folder; mta's own files in the mailbox (the .dovecot.sieve link, its
        # vacation log) are not
        assert folders(imap) == ["INBOX", "Lists"]
        assert list(by_message_id(fetch_all(imap, "Lists"))) == [b"<m1@sender.test>"]
        assert list(by_message_id(fetch_all(imap, "INBOX"))) == [b"<m2@sender.test>"]
    finally:
        imap.logout()
    text = reply.read_text(errors="replace")
    assert "Return-Path: <>" in text and "Subject: Away" in text and "Back on Monday." in text


FOLDERS_SCRIPT = """require ["fileinto"];
if header :contains "subject" "meeting" { fileinto "Réunions"; stop; }
if header :contains "subject" "project" { fileinto "Work.Projects"; stop; }
"""


def test_mta_names_fileinto_folders_on_disk_as_pigeonhole_does(
        mta_server, tmp_path: Path, vmail_user: str) -> None:  # noqa: F811
    """The same script, run by mta (alice, Maildir) and by Pigeonhole (carol, LMTP route):
    the same folder directories, the same IMAP folders."""
    carol = "carol@lmtp.test"
    users = {ALICE: DovecotUser(PASSWORD), carol: DovecotUser(PASSWORD)}
    with start_dovecot(tmp_path, vmail_user, users) as peer:
        boxes = {ALICE: mailbox(peer), carol: peer.mail_root / "lmtp.test" / "carol"}
        boxes[carol].mkdir(parents=True)
        for box in boxes.values():
            (box / ".dovecot.sieve").write_text(FOLDERS_SCRIPT)
        hand_over(peer.mail_root / "lmtp.test", vmail_user)
        server = mta_server(
            server={"inbound_workers": 1},
            relay={"local_domains": [DOMAIN, "lmtp.test"], "relay_domains": [], "mynetworks": ["127.0.0.1/32"]},
            delivery={"workers": 1, "min_backoff_seconds": 1, "max_backoff_seconds": 2},
            local={"maildir_root": str(peer.mail_root)}, routes={"lmtp.test": peer.lmtp_route})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            for n, subject in enumerate(("meeting on Monday", "project plan"), 1):
                smtp.sendmail(BOB, [ALICE, carol], message(n, subject=subject))

        def folder_dirs(box: Path) -> list[str]:
            return sorted(p.name for p in box.iterdir() if p.name.startswith(".") and (p / "new").is_dir()
                          and any((p / "new").iterdir()))

        expected = [".R&AOk-unions", ".Work.Projects"]  # RFC 3501 modified UTF-7, Maildir++ levels
        for box in boxes.values():
            wait_until(lambda box=box: folder_dirs(box) == expected, 20, f"both folders in {box}", server)
        hand_over(boxes[ALICE], vmail_user)
        listed = {}
        for address in boxes:
            imap = imaplib.IMAP4("127.0.0.1", peer.imap_port, timeout=30)
            try:
                imap.login(address, PASSWORD)
                listed[address] = folders(imap)
                assert list(by_message_id(fetch_all(imap, '"R&AOk-unions"'))) == [b"<m1@sender.test>"]
            finally:
                imap.logout()
        assert listed[ALICE] == listed[carol]
        assert {"R&AOk-unions", "Work.Projects"} <= set(listed[ALICE])
