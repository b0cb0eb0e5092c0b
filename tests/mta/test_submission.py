"""Submission hygiene (pure): Date and Message-ID appended to the header section when missing."""

from __future__ import annotations

import email
import email.policy

import pytest

from mta.submission import add_missing, header_section

NOW = 1_790_000_000.0
DATE = "Date: Mon, 21 Sep 2026 14:13:20 +0000\r\n"
MSGID = "Message-ID: <0065F2C1A2B3C4D5E6F70A1B2@mx.test>\r\n"


def fill(data: bytes) -> bytes:
    return add_missing(data, msgid="0065F2C1A2B3C4D5E6F70A1B2", hostname="mx.test", now=NOW)


def test_both_missing_go_at_the_end_of_the_header_section() -> None:
    out = fill(b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\nDate: not a header\r\n")
    assert out == (b"From: a@x.test\r\nSubject: hi\r\n" + (DATE + MSGID).encode()
                   + b"\r\nbody\r\nDate: not a header\r\n")
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Message-ID"] == "<0065F2C1A2B3C4D5E6F70A1B2@mx.test>"
    assert parsed["Date"].datetime.timestamp() == NOW
    assert parsed.get_content() == "body\r\nDate: not a header\r\n"


def test_fields_present_in_any_case_or_spacing_are_kept_and_nothing_changes() -> None:
    data = b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMESSAGE-ID : <x@y>\r\n\r\nbody\r\n"
    assert fill(data) is data


def test_folded_lines_stay_in_the_header_section() -> None:
    data = b"Subject: a long\r\n  folded subject\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    assert fill(data) == data.replace(b"\r\n\r\n", b"\r\n" + MSGID.encode() + b"\r\n", 1)


@pytest.mark.parametrize(("data", "expected"), [
    # No header at all: the fields, then the empty line, then the text as body.
    (b"just text\r\n", (DATE + MSGID).encode() + b"\r\njust text\r\n"),
    # A body line right after the fields (no empty line): one is added.
    (b"Subject: hi\r\nno separator\r\n", b"Subject: hi\r\n" + (DATE + MSGID).encode() + b"\r\nno separator\r\n"),
    # A folded line with no field before it is body, not header.
    (b" indented\r\n", (DATE + MSGID).encode() + b"\r\n indented\r\n"),
    # Headers only, and no content at all.
    (b"Subject: hi\r\n", b"Subject: hi\r\n" + (DATE + MSGID).encode()),
    (b"", (DATE + MSGID).encode()),
    # BDAT content may end without a line end.
    (b"Subject: hi", b"Subject: hi\r\n" + (DATE + MSGID).encode()),
])
def test_odd_shapes_stay_well_formed(data: bytes, expected: bytes) -> None:
    assert fill(data) == expected


def test_header_section_names_and_end() -> None:
    data = b"Received: x\r\n\ty\r\nX-A:1\r\n\r\nX-B: body\r\n"
    assert header_section(data) == (data.index(b"\r\n\r\n") + 2, {b"received", b"x-a"})
