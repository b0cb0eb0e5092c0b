"""Which header fields a signature covers (bottom-up repeats, From oversigned), and the
From: domain that decides whether a message is signed."""

import pytest

from mta.dkim.fields import DEFAULT_HEADERS, check_names, from_domain, select, split_message

MESSAGE = (b"Received: from a\r\n\tby b\r\nSubject: one\r\nFrom: A <a@example.test>\r\n"
           b"Subject: two\r\n  folded\r\nX-Other: not signed\r\nnot a field\r\nTo: t@t.test\r\n"
           b"\r\nbody\r\n\r\nFrom: in the body\r\n")


def test_split_keeps_folds_and_the_body() -> None:
    fields, body = split_message(MESSAGE)
    assert [f.name for f in fields] == [b"Received", b"Subject", b"From", b"Subject", b"X-Other", b"To"]
    assert fields[0].value == b" from a\r\n\tby b\r\n"
    assert fields[3].value == b" two\r\n  folded\r\n"
    assert body == b"body\r\n\r\nFrom: in the body\r\n"


def test_no_body() -> None:
    assert split_message(b"From: a@b.test\r\n") == ([(b"From", b" a@b.test\r\n")], b"")
    assert split_message(b"\r\nonly body\r\n") == ([], b"only body\r\n")


def test_repeated_fields_bottom_up_and_from_oversigned() -> None:
    fields, _ = split_message(MESSAGE)
    h, signed = select(fields, DEFAULT_HEADERS)
    assert h == ["from", "from", "subject", "subject", "to"]
    assert [f.value for f in signed] == [b" A <a@example.test>\r\n", b" two\r\n  folded\r\n", b" one\r\n",
                                         b" t@t.test\r\n"]


def test_default_list_is_opendkims_plus_rfc8058() -> None:
    assert DEFAULT_HEADERS[0] == "From" and "List-Unsubscribe-Post" in DEFAULT_HEADERS
    assert "Received" not in DEFAULT_HEADERS and "Return-Path" not in DEFAULT_HEADERS  # relays add these


def test_operator_list_any_case_named_once() -> None:
    fields, _ = split_message(MESSAGE)
    h, _ = select(fields, ("x-other", "X-OTHER", "Received", "From", "List-Id"))
    assert h == ["x-other", "received", "from", "from"]  # absent List-Id is not listed


@pytest.mark.parametrize(("value", "domain"), [
    (b"Joe <joe@Example.TEST>", "example.test"),
    (b"joe@example.test (Joe Bloggs)", "example.test"),
    (b'"a@evil.test, b" <x@example.test>', "example.test"),
    (b"(c@evil.test) x@example.test", "example.test"),
    (b"Joe (x <z@evil.test>) <j@example.test>", "example.test"),
    (b"=?utf-8?q?a@evil.test?= <x@example.test>", "example.test"),
    (b'"quoted@local"@example.test', "example.test"),
    (b"Team: a@example.test, b@example.test;", "example.test"),
    (b"a@example.test,\r\n b@example.test", "example.test"),
    (b"J\xc3\xb6rg <j@example.test>", "example.test"),
    (b"a@example.test, b@other.test", None),
    (b"nobody", None),
    (b"<>", None),
    (b"a@[192.0.2.1]", None),
])
def test_from_domain(value: bytes, domain: str | None) -> None:
    assert from_domain(b"Subject: s\r\nFrom: " + value + b"\r\n\r\nbody\r\n") == domain


def test_from_domain_needs_exactly_one_from() -> None:
    assert from_domain(b"Subject: s\r\n\r\nFrom: a@example.test\r\n") is None
    assert from_domain(b"From: a@example.test\r\nFrom: b@example.test\r\n\r\n") is None


@pytest.mark.parametrize("name", ["", "X-A:B", "X;h=from", "X A", "Sub\u00e9ct", "X\tA"])
def test_names_that_cannot_stand_in_h(name: str) -> None:
    with pytest.raises(ValueError, match="is not a header field name"):
        check_names(("Subject", name))
    assert check_names(("Subject", "X-Mailer", "List-Unsubscribe-Post")) == ("Subject", "X-Mailer", "List-Unsubscribe-Post")
