"""Match types and comparators (RFC 5228 2.7, RFC 4790) as tables, then through the
header, address and envelope tests."""

from __future__ import annotations

import pytest

from mta.sieve import Discard, Keep
from mta.sieve.match import matches
from tests.mta.sieve.runner import message, run

CASEMAP, OCTET = "i;ascii-casemap", "i;octet"

# (value, key, match, comparator, result)
TABLE = [
    ("Hello", "hello", "is", CASEMAP, True),
    ("Hello", "hello", "is", OCTET, False),
    ("Hello", "Hello", "is", OCTET, True),
    ("Hello", "Hell", "is", CASEMAP, False),
    ("", "", "is", CASEMAP, True),
    ("ÉTÉ", "été", "is", CASEMAP, False),        # ascii-casemap folds ASCII letters only
    ("ÉTÉ", "ÉtÉ", "is", CASEMAP, True),
    ("Make Money Fast", "MONEY", "contains", CASEMAP, True),
    ("Make Money Fast", "MONEY", "contains", OCTET, False),
    ("Make Money Fast", "", "contains", OCTET, True),
    ("abc", "abcd", "contains", CASEMAP, False),
    ("anything", "*", "matches", CASEMAP, True),
    ("", "*", "matches", CASEMAP, True),
    ("", "?", "matches", CASEMAP, False),
    ("a", "?", "matches", CASEMAP, True),
    ("ab", "?", "matches", CASEMAP, False),
    ("é", "?", "matches", OCTET, False),         # ? is one octet (RFC 5228 2.7.1): é is two
    ("é", "??", "matches", OCTET, True),
    ("É", "??", "matches", CASEMAP, True),
    ("make lots of money fast", "*make*money*fast*", "matches", CASEMAP, True),
    ("make money", "*make*money*fast*", "matches", CASEMAP, False),
    ("university diplomas", "*university*dipl*mas*", "matches", CASEMAP, True),
    ("Hello world", "hello*", "matches", CASEMAP, True),
    ("Hello world", "hello*", "matches", OCTET, False),
    ("Hello world", "hello", "matches", CASEMAP, False),   # :matches is the whole value
    ("a*b", "a\\*b", "matches", OCTET, True),              # \* is a literal star
    ("axxb", "a\\*b", "matches", OCTET, False),
    ("a?b", "a\\?b", "matches", OCTET, True),
    ("axb", "a\\?b", "matches", OCTET, False),
    ("a\\b", "a\\\\b", "matches", OCTET, True),            # \\ is one backslash
    ("abc", "a\\bc", "matches", OCTET, True),              # \b is b
    ("x.y", "x?y", "matches", OCTET, True),
    ("line\r\nbreak", "line*break", "matches", OCTET, True),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "*a*a*a*a*a*a*a*a*a*c", "matches", OCTET, False),
]


@pytest.mark.parametrize(("value", "key", "match", "comparator", "result"), TABLE)
def test_table(value: str, key: str, match: str, comparator: str, result: bool) -> None:
    assert matches(value, key, match, comparator) is result


def test_the_default_is_is_with_ascii_casemap() -> None:
    script = 'if header "Subject" "HELLO" { discard; }'
    assert run(script, message("Subject: hello")) == [Discard()]
    assert run(script, message("Subject: hello there")) == [Keep()]


def test_the_script_escapes_a_literal_star_with_two_backslashes() -> None:
    script = 'if header :matches "Subject" "5\\\\* rating" { discard; }'
    assert run(script, message("Subject: 5* rating")) == [Discard()]
    assert run(script, message("Subject: 55 rating")) == [Keep()]


def test_any_occurrence_of_any_header_matches_any_key() -> None:
    script = 'if header :contains ["X-A", "X-B"] ["red", "blue"] { discard; }'
    assert run(script, message("X-A: green", "X-A: dark blue")) == [Discard()]
    assert run(script, message("X-B: RED")) == [Discard()]
    assert run(script, message("X-A: green", "X-C: red")) == [Keep()]


@pytest.mark.parametrize(("part", "key", "result"), [
    (":all", "Tim.Smith@Mail.Example.com", True),
    (":localpart", "tim.smith", True),
    (":localpart", "tim", False),
    (":domain", "mail.example.com", True),
    (":domain", "example.com", False),
])
def test_address_parts(part: str, key: str, result: bool) -> None:
    script = f'if address {part} :is "from" "{key}" {{ discard; }}'
    actions = run(script, message('From: "Smith, Tim" <Tim.Smith@mail.example.com>'))
    assert (actions == [Discard()]) is result


def test_address_sees_every_address_in_every_field() -> None:
    script = 'if address :domain :is ["to", "cc"] "b.test" { discard; }'
    assert run(script, message("To: a@a.test, Group: x@x.test, y@b.test;")) == [Discard()]
    assert run(script, message("To: a@a.test", "Cc: c@c.test, d@B.TEST")) == [Discard()]
    assert run(script, message("To: b.test@a.test")) == [Keep()]


def test_address_does_not_match_display_names() -> None:
    script = 'if address :contains "from" "Boss" { discard; }'
    assert run(script, message("From: The Boss <intern@example.com>")) == [Keep()]
    assert run(script, message("From: boss@example.com")) == [Discard()]


def test_envelope_to_and_from_parts() -> None:
    script = ('require "envelope";\n'
              'if envelope :domain :is "to" "example.com" { if envelope :localpart :matches "from" "bob*" '
              '{ discard; } }')
    assert run(script, message(), envelope_from="bobby@x.test", envelope_to="me@EXAMPLE.com") == [Discard()]
    assert run(script, message(), envelope_from="bobby@x.test", envelope_to="me@example.org") == [Keep()]
    assert run(script, message(), envelope_from="<rob@x.test>", envelope_to="<me@example.com>") == [Keep()]


def test_localpart_and_domain_never_match_an_address_without_an_at() -> None:
    for part in (":localpart", ":domain"):
        assert run(f'if address {part} :matches "to" "*" {{ discard; }}', message("To: postmaster")) == [Keep()]
    assert run('if address :all :is "to" "postmaster" { discard; }', message("To: postmaster")) == [Discard()]


def test_a_name_that_is_no_field_name_matches_nothing_and_is_no_error() -> None:
    msg = message("From: a@b.test", "X Bad: value")
    assert run('if header :contains ["x bad", "From:"] "" { discard; }', msg) == [Keep()]
    assert run('if exists ["From", "From:"] { discard; }', msg) == [Keep()]
    assert run('if exists "From" { discard; }', msg) == [Discard()]
    assert run('if not header :matches "Cc" "?*" { discard; }', msg) == [Discard()]  # RFC 5228 5.7
    assert run('if not header :matches "Cc" "?*" { discard; }', message("Cc: x@y.test")) == [Keep()]


def test_a_quoted_local_part_is_matched_unquoted() -> None:
    script = 'if address :localpart :is "to" "post master" { discard; }'
    assert run(script, message('To: "post master"@example.com')) == [Discard()]
    assert run(script, message("To: postmaster@example.com")) == [Keep()]
