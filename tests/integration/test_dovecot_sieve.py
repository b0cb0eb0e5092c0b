"""mta's Sieve under Dovecot: the script a webmail uploads over ManageSieve, run by mta at
delivery; the folder its fileinto makes is an IMAP folder, its vacation reply an ordinary
message, and nothing mta keeps beside the mail shows up as a folder.

The same private Dovecot and `mta serve` as test_dovecot.py (mta writes the Maildirs as
root; the test hands each mailbox to Dovecot's mail user before Dovecot reads it).
"""

from __future__ import annotations

import smtplib

import pytest

from tests.integration.conftest import wait_until
from tests.integration.dovecot import Dovecot, ManageSieve, hand_over
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
