"""Parsing: the lexical forms of RFC 5228 section 2 and 8, and every kind of error with
the line it names (what `mta sieve check` shows the user)."""

from __future__ import annotations

import pytest

from mta.sieve import Discard, Keep, Reject, SieveError, parse
from mta.sieve.commands import Call, If
from tests.mta.sieve.runner import message, run


def only_call(script: str) -> Call:
    [call] = parse(script).commands
    assert isinstance(call, Call)
    return call


def test_comments_of_both_kinds_and_case_insensitive_names() -> None:
    script = "# a comment\r\nIF /* a\nblock comment */ TRUE { DISCARD; } # trailing\n/**/"
    [command] = parse(script).commands
    assert isinstance(command, If) and command.branches[0][1][0].name == "discard"  # type: ignore[union-attr]


@pytest.mark.parametrize(("written", "value"), [
    ('"plain"', "plain"),
    ('"a \\" quote"', 'a " quote'),
    ('"back\\\\slash"', "back\\slash"),
    ('"undefined \\a escape"', "undefined a escape"),
    ('"two\r\nlines"', "two\r\nlines"),
    ('"ünïcödé"', "ünïcödé"),
    ('text:\r\nline one\r\n..dot-stuffed\r\n.foo\r\n.\r\n', "line one\r\n.dot-stuffed\r\n.foo\r\n"),
    ('text: # a comment\nunix\nline ends\n.\n', "unix\r\nline ends\r\n"),
    ('text:   \n\n.\n', "\r\n"),
    ('text:\n.\n', ""),
])
def test_strings(written: str, value: str) -> None:
    assert only_call(f'require "reject"; reject {written};').positional == (value,)


@pytest.mark.parametrize(("written", "value"), [
    ("0", 0), ("100", 100), ("1k", 1024), ("2K", 2048), ("3M", 3 << 20), ("1G", 1 << 30)])
def test_numbers_with_quantifiers(written: str, value: int) -> None:
    [command] = parse(f"if size :over {written} {{ discard; }}").commands
    assert isinstance(command, If) and command.branches[0][0].positional == (value,)  # type: ignore[union-attr]


def test_string_lists_and_tags_in_any_order() -> None:
    [command] = parse('if header :comparator "i;octet" :matches ["To", "Cc"] ["a*", "b?"] { keep; }').commands
    test = command.branches[0][0]  # type: ignore[union-attr]
    assert test.tags == {"comparator": "i;octet", "match": "matches"}
    assert test.positional == (("To", "Cc"), ("a*", "b?"))


def test_multiline_reason_reaches_the_action() -> None:
    script = 'require "reject";\nreject text:\nNo thanks.\n.\n;\n'
    assert run(script, message("Subject: x")) == [Reject("No thanks.\r\n", extended=False)]


# (script, line, message fragment)
ERRORS = [
    ('keep', 1, "missing ';' after keep"),
    ('require "fileinto";\nif true {\n  fileinto "a"\n}\n', 3, "missing ';' after fileinto"),
    ('keep;\n\nfoo;', 3, "unknown command or test 'foo'"),
    ('\n\nfileinto "x";', 3, 'fileinto needs require "fileinto"'),
    ('require "fileinto";\nfileinto :create "x";', 2, ':create needs require "mailbox"'),
    ('require ["fileinto", "imap4flags"];', 1, "unsupported extension 'imap4flags'"),
    ('keep;\nrequire "fileinto";', 2, "require must come before every other command"),
    ('if true { require "fileinto"; }', 1, "require must come before"),
    ('keep;\nelsif true { keep; }', 2, "elsif without a preceding if"),
    ('else { keep; }', 1, "else without a preceding if"),
    ('if true { keep; }\nkeep;\nelse { keep; }', 3, "else without a preceding if"),
    ('if true keep;', 1, "a block { ... } must follow"),
    ('if not keep { keep; }', 1, "keep is not a test"),
    ('if true;', 1, "a block { ... } must follow"),
    ('if { keep; }', 1, "needs exactly one test"),
    ('if (true, false) { keep; }', 1, "needs exactly one test"),
    ('if header "to" { keep; }', 1, "takes a string or string list, a string or string list; found 1"),
    ('if header :is :contains "to" "x" { keep; }', 1, ":contains conflicts"),
    ('if header :localpart "to" "x" { keep; }', 1, "unknown tag :localpart"),
    ('if header :comparator "i;unicode-casemap" "to" "x" { keep; }', 1, "unknown comparator"),
    ('if header :comparator { keep; }', 1, ":comparator needs a string"),
    ('if header "bad name" "x" { keep; }', 1, None),  # valid: matches nothing (RFC 5228 2.4.2.2)
    ('if header "to" :is "x" { keep; }', 1, "tag :is after a positional argument"),
    ('require ["fileinto", "mailbox"];\nfileinto "x" :create;', 2, "tag :create after a positional"),
    ('keep;\n# a \0 in a comment\n', 2, "NUL character"),
    ('if address "subject" "x" { keep; }', 1, "holds no addresses"),
    ('require "envelope";\nif envelope "auth" "x" { keep; }', 2, "unknown envelope part 'auth'"),
    ('if size 100 { keep; }', 1, "needs :over or :under"),
    ('if size :over :under 100 { keep; }', 1, "conflicts"),
    ('if size :over "100" { keep; }', 1, "expected a number"),
    ('redirect "not an address";', 1, "is not a mail address"),
    ('redirect "a@b.test, c@d.test";', 1, "is not a mail address"),
    ('redirect "a@b@c.test";', 1, "is not a mail address"),
    ('redirect "a@b.test.";', 1, "is not a mail address"),
    ('redirect "Bart <bart@example.com>";', 1, None),
    ('redirect "\\"odd@local\\"@example.com";', 1, None),
    ('redirect ["a@b.test", "c@d.test"];', 1, "expected a string"),
    ('keep "x";', 1, "found 1 arguments"),
    ('if true { keep; ', 1, "expected '}' or a command, found the end of the script"),
    ('if allof () { keep; }', 1, "expected a command or test name"),
    ('if anyof (true false) { keep; }', 1, "true: takes no test; found false"),
    ('if true { keep; }}', 1, "expected a command, found '}'"),
    ('discard;\n"string";', 2, "expected a command, found"),
    ('keep;\n  /* never closed\n\n', 2, "unterminated /* comment"),
    ('require "reject";\nreject "never closed;\nkeep;\n', 2, "unterminated string"),
    ('require "reject";\nreject text:\nno end\n', 2, "not ended by a line with a single '.'"),
    ('require "reject";\nreject text: x\n.\n;', 2, '"text:" must be followed by the end of the line'),
    ('if size :over 99999999999G { keep; }', 1, "number too large"),
    ('keep;\n: x', 2, "':' must start a tag"),
    ('keep;\n\n  @', 3, "unexpected character '@'"),
    ('if not not true { keep; }', 1, None),  # valid: not of a not
    ('if ' + 'not ' * 100 + 'true { keep; }', 1, "nested deeper than"),
    ('if true {' * 100 + '}' * 100, 1, "nested deeper than"),
]


@pytest.mark.parametrize(("script", "line", "fragment"), ERRORS)
def test_errors_name_their_line(script: str, line: int, fragment: str | None) -> None:
    if fragment is None:
        parse(script)
        return
    with pytest.raises(SieveError) as caught:
        parse(script)
    assert caught.value.line == line, str(caught.value)
    assert fragment in caught.value.message
    assert str(caught.value).startswith(f"line {line}: ")


def test_a_number_of_thousands_of_digits_is_an_error_not_a_crash() -> None:
    with pytest.raises(SieveError, match="number too large"):
        parse("if size :over " + "9" * 5000 + " { keep; }")
    assert parse("if size :over 0009223372036854775807 { keep; }")


@pytest.mark.parametrize(("written", "value"), [  # RFC 5228 2.4.2.4's table
    ("$${hex:40}", "$@"), ("${hex: 40 }", "@"), ("${HEX: 40}", "@"), ("${hex:40", "${hex:40"),
    ("${hex:400}", "${hex:400}"), ("${hex:4${hex:30}}", "${hex:40}"), ("${unicode:40}", "@"),
    ("${ unicode:40}", "${ unicode:40}"), ("${UNICODE:40}", "@"), ("${UnICoDE:0000040}", "@"),
    ("${Unicode:40}", "@"), ("${Unicode:Cool}", "${Unicode:Cool}"), ("${hex:c3 a9}", "é"),
    ("${unicode:1F600 20 e9}", "\U0001F600 é"),
])
def test_encoded_character(written: str, value: str) -> None:
    call = only_call(f'require ["encoded-character", "reject"]; reject "{written}";')
    assert call.positional == (value,)
    plain = only_call(f'require "reject"; reject "{written}";')  # not required: as written
    assert plain.positional == (written,)


@pytest.mark.parametrize("written", ["${unicode:200000}", "${Unicode:DF01}"])
def test_encoded_character_out_of_range(written: str) -> None:
    with pytest.raises(SieveError, match="is not a Unicode character"):
        parse(f'require ["encoded-character", "reject"];\nreject "{written}";')


def test_encoded_character_example() -> None:
    script = 'require "encoded-character";\nif header :contains "Subject" "$${hex:24 24}" {\n   discard;\n}'
    assert run(script, message("Subject: earn $$$ now")) == [Discard()]
    assert run(script, message("Subject: earn $ now")) == [Keep()]
