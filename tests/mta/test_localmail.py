"""What sendmail makes of its caller's message: line ends, -t, Bcc, the fields it adds, a lone dot."""

from __future__ import annotations

import email
import email.policy
import io

import pytest

from mta.localmail import TooBig, complete, read_input

NOW = 1_796_613_405.0


def done(raw: bytes, *, extract: bool = False, sender: str = "cron@mx.test", full_name: str | None = None):  # type: ignore[no-untyped-def]
    return complete(raw, sender=sender, full_name=full_name, hostname="mx.test", now=NOW, unique="abc", extract=extract)


def test_a_cron_message_gets_crlf_date_message_id_and_from() -> None:
    out = done(b"Subject: backup\nTo: root@mx.test\n\nall good\n")
    assert out.added == ("Date", "Message-ID", "From")
    assert b"\n" not in out.message.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(out.message, policy=email.policy.SMTP)
    assert parsed["Subject"] == "backup" and parsed["From"] == "cron@mx.test"
    assert parsed["Message-ID"] == "<1796613405000.abc@mx.test>"
    assert email.utils.parsedate_to_datetime(parsed["Date"]).timestamp() == NOW
    assert out.message.endswith(b"\r\n\r\nall good\r\n")


def test_fields_the_caller_wrote_are_kept_and_nothing_is_added_twice() -> None:
    raw = b"from: Me <me@x.test>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <m@x>\r\n\r\nbody\r\n"
    out = done(raw)
    assert out.added == () and out.message == raw


def test_minus_F_names_the_sender_in_the_from_field_it_adds() -> None:
    out = done(b"Subject: x\n\nbody\n", full_name="Backup Robot")
    assert b"\r\nFrom: Backup Robot <cron@mx.test>\r\n" in out.message
    assert b"\r\nFrom: =?utf-8?" in done(b"\n\nbody\n", full_name="Jürgen").message
    assert b"From: MAILER-DAEMON@mx.test\r\n" in done(b"\n\nbody\n", sender="").message


def test_minus_t_takes_to_cc_and_bcc_and_bcc_never_leaves() -> None:
    raw = (b"To: Alice <a@x.test>, b@x.test\nCc: c@x.test\nBcc: hidden@x.test,\n  also-hidden@x.test\n"
           b"Subject: t\n\nbody\n")
    out = done(raw, extract=True)
    assert out.recipients == ("a@x.test", "b@x.test", "c@x.test", "hidden@x.test", "also-hidden@x.test")
    assert b"hidden" not in out.message and b"Bcc" not in out.message
    assert b"To: Alice <a@x.test>, b@x.test\r\nCc: c@x.test\r\nSubject: t\r\n" in out.message
    assert done(raw).recipients == ()  # without -t the fields are not read, but Bcc still goes
    assert b"hidden" not in done(raw).message


def test_resent_fields_replace_the_originals_for_minus_t() -> None:
    raw = b"To: old@x.test\nResent-To: new@x.test\nResent-Bcc: secret@x.test\n\nbody\n"
    out = done(raw, extract=True)
    assert out.recipients == ("new@x.test", "secret@x.test")
    assert b"secret" not in out.message and b"To: old@x.test\r\n" in out.message


def test_a_body_without_headers_stays_the_body() -> None:
    out = done(b"just a line of text\nand another\n")
    head, _, body = out.message.partition(b"\r\n\r\n")
    assert body == b"just a line of text\r\nand another\r\n"
    assert head.startswith(b"Date: ")


def test_a_line_that_is_no_field_ends_the_header_section() -> None:
    out = done(b"Subject: s\nthis is not a field\nTo: not-a-header@x.test\n", extract=True)
    assert out.recipients == ()
    assert out.message.endswith(b"\r\n\r\nthis is not a field\r\nTo: not-a-header@x.test\r\n")


def test_an_mbox_from_line_is_dropped_and_a_last_line_gets_its_crlf() -> None:
    out = done(b"From cron Mon Jan  1 00:00:00 2024\nSubject: s\n\nno newline at the end")
    assert out.message.startswith(b"Subject: s\r\n") and out.message.endswith(b"no newline at the end\r\n")


def test_without_minus_i_a_lone_dot_ends_the_input_with_it_the_dot_is_data() -> None:
    raw = b"Subject: s\n\nline\n.\nafter\n"
    assert read_input(io.BytesIO(raw), ignore_dots=False, limit=100) == b"Subject: s\n\nline\n"
    assert read_input(io.BytesIO(raw.replace(b"\n", b"\r\n")), ignore_dots=False, limit=100) == b"Subject: s\r\n\r\nline\r\n"
    assert read_input(io.BytesIO(raw), ignore_dots=True, limit=100) == raw
    assert read_input(io.BytesIO(b"..\n"), ignore_dots=False, limit=100) == b"..\n"


@pytest.mark.parametrize("ignore_dots", [True, False])
def test_input_over_the_limit_is_refused(ignore_dots: bool) -> None:
    assert read_input(io.BytesIO(b"x" * 10 + b"\n"), ignore_dots, limit=11) == b"x" * 10 + b"\n"
    with pytest.raises(TooBig):
        read_input(io.BytesIO(b"x" * 11 + b"\n"), ignore_dots, limit=11)
