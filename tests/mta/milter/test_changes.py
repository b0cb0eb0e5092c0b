"""The milters' modifications applied to a message: libmilter's header index rules, body, envelope."""

from mta.milter.changes import Message, apply_modifications
from mta.milter.protocol import (
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    Quarantine,
    ReplaceBody,
)

RAW = (b"Received: from a\r\n\tby b\r\nSubject: hi\r\nX-Tag: one\r\nX-Tag: two\r\n"
       b"From: s@s.test\r\n\r\nbody\r\n")


def message():
    return Message.parse(RAW, "s@s.test", ["a@r.test", "B@R.test"], ("SIZE=100",))


def test_parse_and_content_round_trip():
    msg = message()
    assert msg.headers[0] == ("Received", "from a\r\n\tby b")
    assert [name for name, _ in msg.headers] == ["Received", "Subject", "X-Tag", "X-Tag", "From"]
    assert msg.body == b"body\r\n"
    assert msg.content() == RAW


def test_no_modifications_change_nothing():
    assert apply_modifications(message(), []) == message()


def test_change_header_counts_occurrences_of_that_name_from_one():
    msg = apply_modifications(message(), [ChangeHeader(2, "x-tag", "2nd"), ChangeHeader(1, "Subject", "new")])
    assert msg.headers[1:4] == (("Subject", "new"), ("X-Tag", "one"), ("X-Tag", "2nd"))


def test_change_header_with_empty_value_deletes_that_occurrence():
    msg = apply_modifications(message(), [ChangeHeader(1, "X-Tag", "")])
    assert [v for n, v in msg.headers if n == "X-Tag"] == ["two"]


def test_change_header_past_the_last_occurrence_adds_it_and_an_empty_one_does_nothing():
    msg = apply_modifications(message(), [ChangeHeader(3, "X-Tag", "three"), ChangeHeader(5, "X-None", "")])
    assert msg.headers[-1] == ("X-Tag", "three") and len(msg.headers) == 6


def test_insert_header_is_a_position_among_all_headers():
    msg = apply_modifications(message(), [InsertHeader(0, "X-Top", "t"), InsertHeader(2, "X-Mid", "m"),
                                          InsertHeader(99, "X-End", "e")])
    assert [n for n, _ in msg.headers] == ["X-Top", "Received", "X-Mid", "Subject", "X-Tag", "X-Tag",
                                           "From", "X-End"]


def test_added_header_folding_from_the_milter_becomes_crlf():
    msg = apply_modifications(message(), [AddHeader("X-Spam", "yes\n\tscore=9")])
    assert msg.headers[-1] == ("X-Spam", "yes\r\n\tscore=9")
    assert msg.content().endswith(b"X-Spam: yes\r\n\tscore=9\r\n\r\nbody\r\n")


def test_replaced_body_is_every_piece_in_order():
    msg = apply_modifications(message(), [ReplaceBody(b"new "), ReplaceBody(b"body\r\n")])
    assert msg.body == b"new body\r\n"


def test_envelope_changes_and_quarantine():
    msg = apply_modifications(message(), [
        ChangeFrom("<n@s.test>", "BODY=8BITMIME"), AddRecipient("<c@r.test>"), AddRecipient("<A@r.test>"),
        DeleteRecipient("<b@r.test>"), Quarantine("spam"),
    ])
    assert (msg.sender, msg.sender_args) == ("n@s.test", ("BODY=8BITMIME",))
    assert msg.recipients == ("a@r.test", "c@r.test")
    assert msg.quarantine == "spam"
