"""RFC 3464 DSNs, read back with the stdlib email parser; one golden file; NOTIFY rules."""

from __future__ import annotations

import email
import email.policy
import os
import re
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.dsn import DsnRecipient, build_dsn, should_notify

GOLDEN = Path(__file__).parent / "dsn"
ORIGINAL = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"\tby mx.example.com (mta) with ESMTP id 18C2B3A4F5E6D7A8B9C0D;\r\n"
    b"\tSun, 29 Nov 2026 06:43:03 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch?\r\n"
    b"Message-ID: <lunch.1@example.org>\r\n"
    b"\r\n"
    b"Noon at the usual place?\r\n"
)
NOW = 1_796_000_000.0
BOB = DsnRecipient("bob@example.net", "failed", "5.1.1", orcpt="rfc822;Bob+list@Example.NET",
                   remote_mta="mx.example.net", diagnostic="550 5.1.1 <bob@example.net>: no such user",
                   last_attempt=NOW - 5)


def dsn(recipients=(BOB,), **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    args = dict(reporting_mta="mx.example.com", original_sender="alice@example.org",
                recipients=list(recipients), original=ORIGINAL, arrival=NOW - 3600, now=NOW,
                queue_id="18C2B3A4F5E6D7A8B9C0D")
    args.update(kwargs)
    return build_dsn(**args)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    for part in message.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    return message


def parts(raw: bytes) -> tuple[EmailMessage, EmailMessage, EmailMessage, EmailMessage]:
    message = parse(raw)
    text, status, returned = message.get_payload()
    return message, text, status, returned


def blocks(status: EmailMessage) -> list[EmailMessage]:
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def test_structure_and_top_level_headers() -> None:
    raw = dsn()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    message, text, status, returned = parts(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.com>"
    assert message["To"] == "alice@example.org"
    assert raw.count(b"\r\nTo: <alice@example.org>\r\n") == 1
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"] == "Mon, 30 Nov 2026 00:53:20 +0000"
    assert re.fullmatch(r"<[^@<>\s]+@mx\.example\.com>", message["Message-ID"])
    assert text.get_content_type() == "text/plain"
    assert returned.get_content_type() == "message/rfc822"


def test_per_message_and_per_recipient_fields() -> None:
    carol = DsnRecipient("carol@example.net", "failed", "5.7.1", remote_mta="mx2.example.net",
                         diagnostic="554 5.7.1 rejected by policy")
    _, _, status, _ = parts(dsn([BOB, carol], envid="QQ314159"))
    per_message, bob, second = blocks(status)
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["X-Queue-ID"] == "18C2B3A4F5E6D7A8B9C0D"
    assert per_message["Arrival-Date"] == "Sun, 29 Nov 2026 23:53:20 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Last-Attempt-Date"] == "Mon, 30 Nov 2026 00:53:15 +0000"
    assert second["Final-Recipient"] == "rfc822; carol@example.net"
    assert second["Original-Recipient"] is None
    assert second["Last-Attempt-Date"] is None


def test_optional_per_message_fields_absent() -> None:
    _, _, status, _ = parts(dsn(queue_id=None))
    per_message = blocks(status)[0]
    assert per_message["Original-Envelope-Id"] is None  # RFC 3461 6.3(a): MUST NOT without ENVID
    assert per_message["X-Queue-ID"] is None


def test_orcpt_is_written_decoded_and_unchanged() -> None:
    _, _, status, _ = parts(dsn())
    assert blocks(status)[1]["Original-Recipient"] == "rfc822;Bob+list@Example.NET"


def test_orcpt_control_characters_go_back_to_xtext() -> None:
    raw = dsn([DsnRecipient("bob@example.net", "failed", "5.1.1", orcpt="rfc822;a\r\nBcc: x@evil")])
    _, _, status, _ = parts(raw)
    assert blocks(status)[1]["Original-Recipient"] == "rfc822;a+0D+0ABcc: x@evil"
    assert b"\r\nBcc:" not in raw


def test_diagnostic_code_carries_the_reply_exactly() -> None:
    _, text, status, _ = parts(dsn())
    assert blocks(status)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert "550 5.1.1 <bob@example.net>: no such user" in text.get_content()
    assert "mx.example.net said:" in text.get_content()


def test_long_diagnostic_is_folded_and_unfolds_to_the_same_text() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(300))
    raw = dsn([DsnRecipient("bob@example.net", "failed", "5.7.1", diagnostic=reply)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    _, _, status, _ = parts(raw)
    assert blocks(status)[1]["Diagnostic-Code"] == "smtp; " + reply


def test_multiline_reply_continues_the_field_rfc3461_9_2() -> None:
    reply = "550-5.1.1 mailbox unavailable\r\n550 5.1.1 user has moved"
    raw = dsn([DsnRecipient("bob@example.net", "failed", "5.1.1", diagnostic=reply)])
    assert b"Diagnostic-Code: smtp; 550-5.1.1 mailbox unavailable\r\n 550 5.1.1 user has moved\r\n" in raw
    _, _, status, _ = parts(raw)
    assert blocks(status)[1]["Diagnostic-Code"] == "smtp; 550-5.1.1 mailbox unavailable 550 5.1.1 user has moved"


def test_ret_full_returns_the_whole_original() -> None:
    _, _, _, returned = parts(dsn(ret="FULL"))
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "lunch?"
    assert inner.get_content().rstrip() == "Noon at the usual place?"
    assert ORIGINAL in dsn(ret="FULL")


def test_ret_hdrs_returns_only_the_header_section() -> None:
    raw = dsn(ret="HDRS")
    _, _, _, returned = parts(raw)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: lunch?" in returned.get_content()
    assert b"Noon at the usual place" not in raw
    header_section = ORIGINAL[:ORIGINAL.index(b"\r\n\r\n") + 2]
    assert b"Content-Description: Undelivered message\r\n\r\n" + header_section + b"\r\n--" in raw


def test_without_ret_the_size_limit_decides() -> None:
    _, _, _, small = parts(dsn(max_original_bytes=len(ORIGINAL)))
    assert small.get_content_type() == "message/rfc822"
    _, _, _, large = parts(dsn(max_original_bytes=len(ORIGINAL) - 1))
    assert large.get_content_type() == "text/rfc822-headers"
    _, _, _, full = parts(dsn(ret="FULL", max_original_bytes=10))
    assert full.get_content_type() == "message/rfc822"  # the sender asked for it


def test_reports_without_a_failure_return_only_headers_rfc3461_6_2() -> None:
    late = DsnRecipient("bob@example.net", "delayed", "4.4.1", remote_mta="mx.example.net",
                        diagnostic="451 4.4.1 try again later")
    message, _, status, returned = parts(dsn([late], ret="FULL"))
    assert message["Subject"] == "Delivery Status Notification (Delay)"
    assert blocks(status)[1]["Action"] == "delayed"
    assert returned.get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize(("actions", "subject"), [
    (["failed", "delayed"], "Undelivered Mail Returned to Sender"),
    (["delayed", "delivered"], "Delivery Status Notification (Delay)"),
    (["delivered"], "Delivery Status Notification (Success)"),
    (["relayed", "expanded"], "Delivery Status Notification (Success)"),
])
def test_subject_follows_the_most_serious_action(actions: list[str], subject: str) -> None:
    status = {"failed": "5.0.0", "delayed": "4.0.0"}
    recipients = [DsnRecipient(f"r{i}@example.net", a, status.get(a, "2.0.0")) for i, a in enumerate(actions)]
    message, _, report, _ = parts(dsn(recipients))
    assert message["Subject"] == subject
    assert [b["Action"] for b in blocks(report)[1:]] == actions


def test_eight_bit_original_is_declared_8bit() -> None:
    original = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    raw = dsn(original=original, ret="FULL")
    message, _, _, returned = parts(raw)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert original in raw


def test_original_with_an_overlong_line_is_returned_as_headers_only() -> None:
    original = b"Subject: wide\r\n\r\n" + b"x" * 2000 + b"\r\n"
    raw = dsn(original=original, ret="FULL")
    _, _, _, returned = parts(raw)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_overlong_header_line_is_wrapped() -> None:
    original = b"X-Long: " + b"y" * 3000 + b"\r\nSubject: s\r\n\r\nbody\r\n"
    raw = dsn(original=original, ret="HDRS")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    _, _, _, returned = parts(raw)
    assert "Subject: s" in returned.get_content()


def test_bare_lf_original_is_normalised_to_crlf() -> None:
    raw = dsn(original=b"Subject: lf\n\nbody\n", ret="FULL")
    assert b"\r\n\r\nSubject: lf\r\n\r\nbody\r\n\r\n--" in raw


def test_boundary_never_occurs_in_the_content() -> None:
    first = dsn()
    boundary = parse(first).get_boundary()
    assert boundary is not None
    hostile = ORIGINAL + b"--" + boundary.encode() + b"--\r\n"
    second = dsn(original=hostile, ret="FULL")
    other = parse(second).get_boundary()
    assert other is not None and other != boundary
    assert hostile in second


def test_deterministic_and_unique_per_report() -> None:
    assert dsn() == dsn()
    ids = {parse(dsn(now=NOW + i))["Message-ID"] for i in range(3)}
    ids.add(parse(dsn(queue_id="other"))["Message-ID"])
    assert len(ids) == 4


@pytest.mark.parametrize("bad", [
    dict(original_sender=""),
    dict(recipients=[]),
    dict(recipients=[DsnRecipient("a@b", "bounced", "5.0.0")]),
    dict(recipients=[DsnRecipient("a@b", "failed", "550")]),
    dict(recipients=[DsnRecipient("a@b", "failed", "5.0.0", will_retry_until=NOW)]),  # delayed only
    dict(ret="full"),
])
def test_bad_arguments_are_our_bug(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        dsn(**bad)


def test_golden_failed_dsn() -> None:
    carol = DsnRecipient("carol@example.net", "failed", "4.4.7", remote_mta="mx2.example.net",
                         diagnostic="451-4.7.1 greylisted\r\n451 4.7.1 come back later (gave up after 432000 s)",
                         last_attempt=NOW)
    raw = dsn([BOB, carol], envid="QQ314159", ret="FULL")
    path = GOLDEN / "failed.eml"
    if os.environ.get("MTA_REGOLD"):
        path.write_bytes(raw)
    assert raw == path.read_bytes(), "regenerate with MTA_REGOLD=1 after checking the diff"


def test_golden_delay_dsn_headers_only() -> None:
    late = DsnRecipient("bob@example.net", "delayed", "4.4.1", orcpt="rfc822;bob@example.net",
                        remote_mta="mx.example.net", diagnostic="421 4.4.1 connection timed out",
                        last_attempt=NOW, will_retry_until=NOW - 3600 + 432000)  # arrival + 5 days
    raw = dsn([late])
    path = GOLDEN / "delayed.eml"
    if os.environ.get("MTA_REGOLD"):
        path.write_bytes(raw)
    assert raw == path.read_bytes(), "regenerate with MTA_REGOLD=1 after checking the diff"


text_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)


@settings(max_examples=150, deadline=None)
@given(address=st.text(min_size=1, max_size=300).filter(lambda s: s.strip()), diagnostic=text_values,
       remote=st.one_of(st.none(), st.text(max_size=300)), orcpt=st.one_of(st.none(), text_values),
       envid=st.one_of(st.none(), st.text(max_size=200)), original=st.binary(max_size=4000),
       ret=st.sampled_from([None, "FULL", "HDRS"]))
def test_any_input_gives_short_lines_and_a_parseable_report(address: str, diagnostic: str, remote: str | None,
                                                            orcpt: str | None, envid: str | None,
                                                            original: bytes, ret: str | None) -> None:
    rcpt = DsnRecipient(address, "failed", "5.0.0", orcpt=orcpt, remote_mta=remote, diagnostic=diagnostic)
    raw = build_dsn(reporting_mta="mx.example.com", original_sender="a@example.org", recipients=[rcpt],
                    original=original, arrival=NOW, now=NOW, envid=envid, ret=ret)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert b"\n" not in raw.replace(b"\r\n", b"")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    text, status, _ = message.get_payload()
    report = status.get_payload()
    assert len(report) == 2 and report[1]["Action"] == "failed" and report[1]["Status"] == "5.0.0"


@pytest.mark.parametrize(("notify", "action", "expected"), [
    (None, "failed", True), (None, "delayed", True), (None, "delivered", False),
    (None, "relayed", False), (None, "expanded", False),
    (("NEVER",), "failed", False), (("NEVER",), "delayed", False), (("NEVER",), "delivered", False),
    (("SUCCESS",), "delivered", True), (("SUCCESS",), "relayed", True), (("SUCCESS",), "expanded", True),
    (("SUCCESS",), "failed", False), (("SUCCESS",), "delayed", False),
    (("FAILURE",), "failed", True), (("FAILURE",), "delayed", False), (("FAILURE",), "delivered", False),
    (("DELAY",), "delayed", True), (("DELAY",), "failed", False),
    (("SUCCESS", "FAILURE", "DELAY"), "failed", True), (("failure", "delay"), "delayed", True),
])
def test_should_notify_rfc3461(notify: tuple[str, ...] | None, action: str, expected: bool) -> None:
    assert should_notify(notify, action) is expected


def test_should_notify_rejects_unknown_actions() -> None:
    with pytest.raises(ValueError):
        should_notify(None, "bounced")
