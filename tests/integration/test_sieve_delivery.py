"""Sieve in local delivery, end to end: a real `mta serve` delivering to Maildirs whose
`.dovecot.sieve` files file, discard, redirect, reject and answer; real SMTP sinks for
the remote recipients and for the senders' domain (bounces and vacation replies)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, mailbox, maildir_messages, send_all
from tests.integration.test_metrics import get, sample

pytestmark = pytest.mark.integration

SETTLE_SECONDS = 1.5  # after the spool is empty: long enough for a second copy to show up


def sieve_server(mta_server, tmp_path: Path, sink: SmtpSink, aliases: str = "") -> MtaServer:  # type: ignore[no-untyped-def]
    """Local domain local.test (Maildirs); remote.test and the senders' client.test go to `sink`."""
    target = f"{sink.address}:{sink.port}"
    if not aliases:
        return delivering(mta_server, tmp_path, {"remote.test": target, "client.test": target})
    (tmp_path / "aliases").write_text(aliases)
    (tmp_path / "mail" / "local.test").mkdir(parents=True, exist_ok=True)
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": ["local.test"], "relay_domains": ["remote.test", "client.test"],
               "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, "min_backoff_seconds": 1, "max_backoff_seconds": 2},
        routes={"remote.test": target, "client.test": target},
        local={"maildir_root": str(tmp_path / "mail"), "aliases": str(tmp_path / "aliases")})


def with_script(tmp_path: Path, user: str, script: str) -> Path:
    box = mailbox(tmp_path, "local.test", user)
    (box / ".dovecot.sieve").write_text(script)
    return box


def mail(n: int, subject: str = "hello", headers: str = "") -> bytes:
    return (f"From: Alice <alice@client.test>\r\nTo: bob@local.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <s{n}@client.test>\r\n{headers}\r\nbody {n}\r\n").encode()


def send(server: MtaServer, *mails: tuple[str, list[str], bytes]) -> list[str]:
    return asyncio.run(send_all(server.port, list(mails), sessions=1))


def drained(server: MtaServer) -> None:
    wait_until(lambda: server.queue_list() == [], 20, "an empty spool", server)


def test_fileinto_creates_the_folder_and_stores_there(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        box = with_script(tmp_path, "bob", 'require "fileinto";\n'
                          'if header :contains "subject" "report" { fileinto "Work/Reports"; }\n'
                          'elsif header :is "subject" "list" { fileinto "Lists.mta"; stop; }\n')
        send(server, ("alice@client.test", ["bob@local.test"], mail(1, "weekly report")),
             ("alice@client.test", ["bob@local.test"], mail(2, "list")),
             ("alice@client.test", ["bob@local.test"], mail(3, "lunch?")))
        drained(server)
        reports = box / ".Work.Reports"
        assert (reports / "maildirfolder").is_file()
        [filed] = maildir_messages(reports)
        assert b"Subject: weekly report" in filed and filed.startswith(b"Return-Path: <alice@client.test>\n")
        assert [b"Subject: list" in m for m in maildir_messages(box / ".Lists.mta")] == [True]
        [inbox] = maildir_messages(box)  # only the one no rule matched: fileinto cancels the implicit keep
        assert b"Subject: lunch?" in inbox
        assert re.search(rb"event=sieve msgid=\S+ rcpt=bob@local.test actions=fileinto:Work/Reports",
                         server.log_bytes())
        assert sink.messages == []
        _status, scraped = get(server, "/metrics")
        assert sample(scraped, "mta_delivery_sieve_actions_total", action="fileinto") == 2
        assert sample(scraped, "mta_delivery_sieve_actions_total", action="keep") == 1  # the implicit keep


def test_discard_stores_nothing_and_counts_as_delivered(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        box = with_script(tmp_path, "bob", 'if address :domain "from" "client.test" { discard; }\n')
        carol = mailbox(tmp_path, "local.test", "carol")  # no script: INBOX, as always
        [msgid] = send(server, ("alice@client.test", ["bob@local.test", "carol@local.test"], mail(1)))
        drained(server)
        assert maildir_messages(box) == []
        assert len(maildir_messages(carol)) == 1
        log = server.log_bytes()
        assert re.search(rb"event=sieve msgid=" + msgid.encode() + rb" rcpt=bob@local.test actions=discard", log)
        assert re.search(rb"event=delivered msgid=" + msgid.encode() + rb".*discarded by the recipient's Sieve", log)
        time.sleep(SETTLE_SECONDS)
        assert sink.messages == []  # no bounce either


def test_redirect_reaches_the_target_once_with_the_original_sender(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        box = with_script(tmp_path, "bob", 'redirect "carol@remote.test";\n')
        [msgid] = send(server, ("alice@client.test", ["bob@local.test"], mail(1)))
        [forwarded] = sink.wait_for_messages(1, timeout=20)
        drained(server)
        time.sleep(SETTLE_SECONDS)
        assert len(sink.messages) == 1
        assert forwarded.sender == "alice@client.test"  # RFC 5228 4.2: the original envelope sender
        assert forwarded.recipients == ["carol@remote.test"]
        assert forwarded.data.startswith(b"Delivered-To: bob@local.test\r\nReceived: from client.test")
        assert b"Message-ID: <s1@client.test>\r\n" in forwarded.data and forwarded.data.endswith(b"body 1\r\n")
        assert maildir_messages(box) == []  # redirect cancels the implicit keep
        log = server.log_bytes()
        assert re.search(rb"event=sieve msgid=" + msgid.encode() + rb" rcpt=bob@local.test "
                         rb"actions=redirect:carol@remote.test queued=[0-9A-F]{21}", log)


def test_a_redirect_to_a_local_alias_reaches_its_targets(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink, aliases="team@local.test: carol, erin@remote.test\n")
        with_script(tmp_path, "bob", 'redirect "team@local.test";\n')
        carol = mailbox(tmp_path, "local.test", "carol")
        send(server, ("alice@client.test", ["bob@local.test"], mail(1)))
        [remote] = sink.wait_for_messages(1, timeout=20)
        drained(server)
        assert remote.recipients == ["erin@remote.test"] and remote.sender == "alice@client.test"
        [local] = maildir_messages(carol)
        assert local.startswith(b"Return-Path: <alice@client.test>\nDelivered-To: carol@local.test\n"
                                b"Delivered-To: bob@local.test\n")


def test_a_refused_redirect_bounces_to_the_original_sender(mta_server, tmp_path: Path) -> None:
    """The redirect is a queued message of its own from the original sender: the original
    is delivered (settled) while the copy's target refuses, and the refusal goes to
    the original sender, not to the mailbox that redirected."""
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        with_script(tmp_path, "bob", 'redirect "r550-gone@remote.test";\n')
        [msgid] = send(server, ("alice@client.test", ["bob@local.test"], mail(1)))
        [bounce] = sink.wait_for_messages(1, timeout=20)
        drained(server)
        assert bounce.sender == "" and bounce.recipients == ["alice@client.test"]
        text = " ".join(bounce.data.decode("utf-8", "replace").split())
        assert "r550-gone@remote.test" in text and "Status: 5.1.1" in text
        assert "Original-Recipient: rfc822;bob@local.test" in text  # ORCPT: what alice wrote
        log = server.log_bytes()
        assert re.search(rb"event=delivered msgid=" + msgid.encode() + rb" rcpt=bob@local.test", log)


def test_a_redirect_loop_between_two_mailboxes_ends_in_an_inbox(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        bob = with_script(tmp_path, "bob", 'redirect "dave@local.test";\n')
        dave = with_script(tmp_path, "dave", 'redirect "bob@local.test";\n')
        send(server, ("alice@client.test", ["bob@local.test"], mail(1)))
        wait_until(lambda: maildir_messages(bob), 20, "the message back in bob's INBOX", server)
        drained(server)
        time.sleep(SETTLE_SECONDS)
        [kept] = maildir_messages(bob)
        assert maildir_messages(dave) == []
        assert b"Delivered-To: dave@local.test\nDelivered-To: bob@local.test\n" in kept
        assert b"event=sieve_run_error" in server.log_bytes() and b"mail forwarding loop" in server.log_bytes()


def test_reject_bounces_to_the_sender_with_the_reason(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        box = with_script(tmp_path, "bob", 'require "reject";\n'
                          'if header :contains "subject" "offer" { reject "I do not want your offers."; }\n')
        send(server, ("alice@client.test", ["bob@local.test"], mail(1, "a special offer")))
        [bounce] = sink.wait_for_messages(1, timeout=20)
        drained(server)
        assert bounce.sender == "" and bounce.recipients == ["alice@client.test"]
        report = email.message_from_bytes(bounce.data, policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        text = " ".join(bounce.data.decode("utf-8", "replace").split())  # unfolded
        assert "Status: 5.7.1" in text and "550 5.7.1 refused by the recipient's Sieve script: I do not want your offers." in text
        assert "bob@local.test" in text
        assert maildir_messages(box) == []


def test_vacation_answers_once_per_sender_and_never_to_lists_robots_or_null(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        box = with_script(tmp_path, "bob", 'require "vacation";\n'
                          'vacation :days 1 :subject "Away" "I am away until Monday.";\n')
        # The first alone: two queued messages may go to two delivery workers at once,
        # and the reply answers whichever ran first.
        send(server, ("alice@client.test", ["bob@local.test"], mail(1, "first")))
        wait_until(lambda: len(sink.messages) >= 1, 20, "the first vacation reply", server)
        send(server,
             ("alice@client.test", ["bob@local.test"], mail(2, "second, same day")),
             ("", ["bob@local.test"], mail(3, "a bounce")),
             ("news@client.test", ["bob@local.test"], mail(4, "news", "List-Id: <news.client.test>\r\n")),
             ("robot@client.test", ["bob@local.test"], mail(5, "auto", "Auto-Submitted: auto-generated\r\n")),
             ("zoe@client.test", ["bob@local.test"], mail(6, "another sender")))
        wait_until(lambda: len(sink.messages) >= 2, 20, "two vacation replies", server)
        drained(server)
        time.sleep(SETTLE_SECONDS)
        assert sorted(m.recipients[0] for m in sink.messages) == ["alice@client.test", "zoe@client.test"]
        reply = next(m for m in sink.messages if m.recipients == ["alice@client.test"])
        assert reply.sender == ""  # vacation replies go from <>
        parsed = email.message_from_bytes(reply.data, policy=email.policy.default)
        assert str(parsed["Auto-Submitted"]).startswith("auto-replied")
        assert parsed["In-Reply-To"] == "<s1@client.test>"
        assert "I am away until Monday." in parsed.get_body(("plain",)).get_content()
        assert len(maildir_messages(box)) == 6  # vacation keeps the message
        assert (box / ".mta-vacation").is_file()
        _status, scraped = get(server, "/metrics")
        assert sample(scraped, "mta_delivery_sieve_actions_total", action="vacation") == 2
        assert sample(scraped, "mta_delivery_sieve_actions_total", action="vacation_skipped") == 4


def test_a_broken_script_keeps_mail_in_inbox_and_is_logged_once(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = sieve_server(mta_server, tmp_path, sink)
        box = with_script(tmp_path, "bob", 'if header :contains "subject" "x" { discard;\n')  # no closing brace
        send(server, ("alice@client.test", ["bob@local.test"], mail(1, "x")),
             ("alice@client.test", ["bob@local.test"], mail(2, "x")))
        drained(server)
        assert len(maildir_messages(box)) == 2
        log = server.log_bytes()
        assert log.count(b"event=sieve_script_error") == 1, server.log_tail()
        assert re.search(rb"event=sieve_script_error path=\S+/bob/.dovecot.sieve error=.*line \d", log)
        _status, scraped = get(server, "/metrics")
        assert sample(scraped, "mta_delivery_sieve_actions_total", action="error") == 2
        # Fixed: the new version is read at the next delivery.
        (box / ".dovecot.sieve").write_text('if header :contains "subject" "x" { discard; }\n')
        send(server, ("alice@client.test", ["bob@local.test"], mail(3, "x")))
        drained(server)
        assert len(maildir_messages(box)) == 2
