"""Delivery status notifications end to end: success, delay and failure notices as the sender gets them.

Real processes and sinks: mta delivers to Maildir, to LMTP and SMTP sinks that offer DSN
or not, and to a sink that defers; every notice lands in the sender's Maildir and is
read back as an RFC 3464 report with the email package (multipart/report,
message/delivery-status: Action, Status, Final-Recipient, Original-Recipient,
Original-Envelope-Id, Will-Retry-Until).
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import email.utils
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, mailbox, maildir_messages

pytestmark = pytest.mark.integration

MESSAGE = b"From: sender@local.test\r\nSubject: notice test\r\nMessage-ID: <n@client.test>\r\n\r\nhello\r\n"
NOTIFY_VALUES = [None, "NEVER", "SUCCESS", "FAILURE", "DELAY", "SUCCESS,FAILURE"]


@dataclass
class Sent:
    sender: str
    rcpt: str
    notify: str | None
    envid: str
    orcpt: str
    ret: str
    msgid: str = ""


async def submit(port: int, mails: list[Sent], null_sender: bool = False) -> None:
    """Each message with its DSN parameters (MAIL: RET, ENVID; RCPT: NOTIFY, ORCPT)."""
    client = await SmtpClient.connect(port)
    try:
        for m in mails:
            sender = "" if null_sender else m.sender
            reply = await client.command(f"MAIL FROM:<{sender}> RET={m.ret} ENVID={m.envid}")
            assert reply.code == 250, reply
            notify = f" NOTIFY={m.notify}" if m.notify else ""
            reply = await client.command(f"RCPT TO:<{m.rcpt}>{notify} ORCPT=rfc822;{m.orcpt}")
            assert reply.code == 250, reply
            assert (await client.command("DATA")).code == 354
            client.writer.write(MESSAGE + b".\r\n")
            reply = await client.read_reply()
            msgid = queued_id(reply)
            assert msgid is not None, reply
            m.msgid = msgid
    finally:
        await client.close()


def report(raw: bytes) -> tuple[email.message.EmailMessage, email.message.Message, list[email.message.Message],
                                email.message.Message]:
    """A notice as RFC 3464: the message, its per-message fields, per-recipient fields, returned part."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"].addresses[0].username == "MAILER-DAEMON"
    text, status, returned = message.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return message, per_message, per_recipient, returned


def notices(tmp_path: Path, user: str) -> list[bytes]:
    return maildir_messages(tmp_path / "mail" / "local.test" / user)


def test_the_dsn_matrix_notify_by_destination_kind(mta_server, tmp_path: Path) -> None:
    sinks = {"relay-dsn": SmtpSink("127.0.0.2"), "relay-plain": SmtpSink("127.0.0.3", dsn=False),
             "lmtp-dsn": SmtpSink("127.0.0.4", lmtp=True), "lmtp-plain": SmtpSink("127.0.0.5", lmtp=True, dsn=False)}
    try:
        for sink in sinks.values():
            sink.start()
        routes = {f"{name}.test": f"{'lmtp:' if sink.lmtp else ''}{sink.address}:{sink.port}"
                  for name, sink in sinks.items()}
        server = delivering(mta_server, tmp_path, routes)
        mailbox(tmp_path, "local.test", "rcpt")
        # Each NOTIFY value, each destination kind, a recipient that is delivered and (on the
        # sinks) one refused with 550; the sender's mailbox says who got which notice.
        cases: list[tuple[str, str, Sent]] = []
        for n, notify in enumerate(NOTIFY_VALUES):
            for kind in ["maildir", *sinks]:
                outcomes = ["delivered"] + (["failed"] if kind != "maildir" else [])
                for outcome in outcomes:
                    i = len(cases)
                    user = f"s{i}"
                    mailbox(tmp_path, "local.test", user)
                    rcpt = "rcpt@local.test" if kind == "maildir" else (
                        f"u{i}@{kind}.test" if outcome == "delivered" else f"r550-u{i}@{kind}.test")
                    cases.append((kind, outcome, Sent(f"{user}@local.test", rcpt, notify, f"env{i}+2Bx",
                                                      f"orig{i}@client.test", "FULL" if i % 2 else "HDRS")))
        null_sender = [Sent("", "u@relay-plain.test", "SUCCESS,FAILURE", "null", "o@client.test", "FULL"),
                       Sent("", "r550-u@relay-plain.test", "SUCCESS,FAILURE", "null", "o@client.test", "FULL")]
        asyncio.run(submit(server.port, [sent for _, _, sent in cases]))
        asyncio.run(submit(server.port, null_sender, null_sender=True))

        expected: dict[str, str | None] = {}  # sender's user -> the action of its notice
        for kind, outcome, sent in cases:
            words = set((sent.notify or "").split(",")) - {""}
            if outcome == "failed":
                action = "failed" if (not words or "FAILURE" in words) else None
            elif "SUCCESS" not in words or kind.endswith("-dsn"):
                action = None  # a next hop offering DSN got NOTIFY: success is its to report
            else:
                action = "relayed" if kind == "relay-plain" else "delivered"
            expected[sent.sender.split("@")[0]] = action
        total = sum(1 for a in expected.values() if a)
        wait_until(lambda: server.queue_list() == [] and sum(len(notices(tmp_path, u)) for u in expected) >= total,
                   30, f"{total} notices delivered and an empty queue", server)
        time.sleep(1)  # nothing more comes
        got: dict[str, str | None] = {}
        for kind, outcome, sent in cases:
            user = sent.sender.split("@")[0]
            boxes = notices(tmp_path, user)
            assert len(boxes) <= 1, (kind, outcome, sent.notify, len(boxes))
            if not boxes:
                got[user] = None
                continue
            message, per_message, [block], returned = report(boxes[0])
            got[user] = block["Action"]
            assert message["To"] == sent.sender
            assert per_message["Original-Envelope-Id"] == sent.envid.replace("+2B", "+")  # xtext decoded
            assert per_message["Reporting-MTA"] == "dns; mx.test"
            assert block["Final-Recipient"] == f"rfc822; {sent.rcpt}"
            assert block["Original-Recipient"] == f"rfc822;{sent.orcpt}"
            assert block["Status"].startswith("5." if outcome == "failed" else "2."), block["Status"]
            if outcome == "failed":
                assert "550 5.1.1" in block["Diagnostic-Code"]
            # RET=FULL returns the whole message in a failure notice; HDRS, or any other
            # notice (RFC 3461 4.3), only its header section.
            full = outcome == "failed" and sent.ret == "FULL"
            assert returned.get_content_type() == ("message/rfc822" if full else "text/rfc822-headers")
            assert (b"hello" in boxes[0]) is full and b"Subject: notice test" in boxes[0]
        assert got == expected

        # The next hops that offer DSN got the parameters (xtext as it came).
        for name in ("relay-dsn", "lmtp-dsn"):
            for m in sinks[name].messages:
                [sent] = [s for _, _, s in cases if s.rcpt == m.recipients[0]]
                assert (m.mail_params["RET"], m.mail_params["ENVID"]) == (sent.ret, sent.envid)
                assert m.rcpt_params[0] == {**({"NOTIFY": sent.notify} if sent.notify else {}),
                                            "ORCPT": f"rfc822;{sent.orcpt}"}
        log = server.log_bytes()
        for sent in null_sender:  # a message from <> never gets a notice, whatever it asked
            assert re.search(rf"event=(delivered|bounced) msgid={sent.msgid} ".encode(), log)
            assert f"origin={sent.msgid}".encode() not in log
        assert log.count(b"event=notice_queued") == sum(1 for a in expected.values() if a in ("delivered", "relayed"))
    finally:
        for sink in sinks.values():
            sink.close()


def deferring_server(mta_server, tmp_path: Path, sink: SmtpSink, **delivery) -> MtaServer:  # type: ignore[no-untyped-def]
    return delivering(mta_server, tmp_path, {"slow.test": f"{sink.address}:{sink.port}"},
                      delivery={"max_queue_lifetime_seconds": 3600, "delay_warning_seconds": 3, **delivery})


def test_one_delay_notice_per_message_with_will_retry_until_across_a_restart(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:  # r450-: every attempt is refused for now
        server = deferring_server(mta_server, tmp_path, sink, min_backoff_seconds=1, max_backoff_seconds=1)
        mails = []
        for i, notify in enumerate([None, "DELAY", "SUCCESS,DELAY", "FAILURE", "NEVER", "SUCCESS"]):
            mailbox(tmp_path, "local.test", f"s{i}")
            mails.append(Sent(f"s{i}@local.test", f"r450-u{i}@slow.test", notify, f"env{i}", f"orig{i}@client.test",
                              "FULL"))
        asyncio.run(submit(server.port, mails))
        warned = {0, 1, 2}  # no NOTIFY (delay notices are on by default), and those that asked
        wait_until(lambda: all(notices(tmp_path, f"s{i}") for i in warned), 20, "the delay notices", server)
        for i in warned:
            [raw] = notices(tmp_path, f"s{i}")
            message, per_message, [block], returned = report(raw)
            assert message["Subject"] == "Delivery Status Notification (Delay)"
            assert (block["Action"], block["Status"]) == ("delayed", "4.2.0")
            assert block["Final-Recipient"] == f"rfc822; r450-u{i}@slow.test"
            assert block["Original-Recipient"] == f"rfc822;orig{i}@client.test"
            assert per_message["Original-Envelope-Id"] == f"env{i}"
            assert "450 4.2.0" in block["Diagnostic-Code"]
            arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
            until = email.utils.parsedate_to_datetime(block["Will-Retry-Until"])
            assert (until - arrival).total_seconds() == 3600  # arrival + max_queue_lifetime_seconds
            assert returned.get_content_type() == "text/rfc822-headers"  # not a failure: headers only
        assert {e["id"]: e["warned"] for e in server.queue_list() if e["sender"]} == {
            m.msgid: i in warned for i, m in enumerate(mails)}
        # Retries go on, across a restart of the whole server: never a second notice.
        tried = len(sink.commands)
        server.stop()
        server.start()
        wait_until(lambda: len([c for c in sink.commands[tried:] if c[1].startswith("RCPT")]) >= 12, 20,
                   "two more rounds of attempts", server)
        assert [len(notices(tmp_path, f"s{i}")) for i in range(6)] == [1, 1, 1, 0, 0, 0]
        assert b"event=notice_queued" not in server.log_bytes()  # (this run's log)


def test_a_message_not_retried_before_its_warning_time_is_warned_when_loaded(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = deferring_server(mta_server, tmp_path, sink, min_backoff_seconds=1, max_backoff_seconds=1)
        mailbox(tmp_path, "local.test", "s")
        [sent] = mails = [Sent("s@local.test", "r450-u@slow.test", "DELAY", "env", "orig@client.test", "HDRS")]
        asyncio.run(submit(server.port, mails))
        wait_until(lambda: b"event=deferred" in server.log_bytes(), 10, "the first deferral", server)
        server.stop()  # down before the warning time: no attempt settles after it
        time.sleep(3.5)
        sink.greeting_delay_seconds = 60  # the next attempt hangs: only the load can warn
        connections, commands = sink.connections, len(sink.commands)
        server.start()
        [raw] = wait_until(lambda: notices(tmp_path, "s"), 15, "the delay notice at load", server)
        assert sink.connections > connections and len(sink.commands) == commands  # the attempt waits for 220
        _, _, [block], _ = report(raw)
        assert block["Action"] == "delayed" and block["Final-Recipient"] == f"rfc822; {sent.rcpt}"
        assert re.search(rf"event=notice_queued msgid=\S+ origin={sent.msgid} .*action=delayed".encode(),
                         server.log_bytes())
