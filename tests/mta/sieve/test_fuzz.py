"""parse() on any text raises nothing but SieveError; evaluate() on what parses raises
nothing but SieveRuntimeError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.sieve import Context, SieveError, SieveRuntimeError, evaluate, parse
from tests.mta.sieve.runner import message

# Pieces of real scripts, so that random joins get past the lexer and into the checks.
PIECES = [
    "require", '"fileinto"', '["reject", "vacation", "envelope"]', "if", "elsif", "else", "{", "}", "(", ")",
    "[", "]", ",", ";", "header", "address", "envelope", "exists", "size", "allof", "anyof", "not", "true",
    "false", "keep", "discard", "stop", "redirect", "fileinto", "reject", "ereject", "vacation", ":is",
    ":contains", ":matches", ":comparator", '"i;octet"', ":localpart", ":domain", ":all", ":over", ":under",
    ":days", ":subject", ":from", ":addresses", ":mime", ":handle", ":create", "10K", "0", '"to"', '"from"',
    '"a@b.test"', '"*x?\\\\*"', "text:\n", "\n.\n", "..", "#c\n", "/*", "*/", " ", "\n", '"', "\\", ":",
]

MSG = message("From: Pal <pal@example.org>", "To: me@example.com", "Subject: =?utf-8?q?x?=")


@settings(max_examples=600, deadline=None)
@given(st.text())
def test_any_text(text: str) -> None:
    try:
        parse(text)
    except SieveError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map(" ".join))
def test_script_like_text(text: str) -> None:
    try:
        script = parse(text)
    except SieveError:
        return
    try:
        evaluate(script, Context("pal@example.org", "me@example.com", MSG))
    except SieveRuntimeError:
        pass
