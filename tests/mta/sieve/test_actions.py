"""The action list evaluate returns: duplicates removed (RFC 5228 2.10.3), the implicit keep
(2.10.2), and run-time errors (2.10.6)."""

from __future__ import annotations

import pytest

from mta.sieve import Discard, FileInto, Keep, Redirect, SieveRuntimeError
from mta.sieve.interpreter import MAX_REDIRECTS
from tests.mta.sieve.runner import message, run

MSG = message("From: a@b.test", "To: me@example.com", "Subject: hi")


def test_keep_twice_is_one_keep() -> None:
    assert run("keep; keep;", MSG) == [Keep()]


def test_fileinto_the_same_folder_once_the_first_as_written() -> None:
    script = 'require ["fileinto", "mailbox"];\nfileinto "Work"; fileinto "Play"; fileinto :create "Work";'
    assert run(script, MSG) == [FileInto("Work", False), FileInto("Play", False)]


def test_fileinto_folder_names_are_case_sensitive_but_inbox_is_keep() -> None:
    script = 'require "fileinto";\nfileinto "work"; fileinto "Work"; fileinto "inbox"; keep;'
    assert run(script, MSG) == [FileInto("work", False), FileInto("Work", False), Keep()]


def test_redirect_once_per_address() -> None:
    script = 'redirect "a@b.test"; redirect "A@B.test"; redirect "c@b.test";'
    assert run(script, MSG) == [Redirect("a@b.test"), Redirect("c@b.test")]


def test_redirect_carries_the_bare_address() -> None:
    script = 'redirect "Bart Simpson <bart@example.com>"; redirect "bart@example.com";'
    assert run(script, MSG) == [Redirect("bart@example.com")]


def test_too_many_redirects_is_a_runtime_error_naming_the_line() -> None:
    script = "\n".join(f'redirect "r{i}@b.test";' for i in range(MAX_REDIRECTS + 1))
    with pytest.raises(SieveRuntimeError) as caught:
        run(script, MSG)
    assert caught.value.line == MAX_REDIRECTS + 1 and "redirects" in str(caught.value)
    allowed = "\n".join(script.splitlines()[:MAX_REDIRECTS])
    assert len(run(allowed, MSG)) == MAX_REDIRECTS
    assert len(run(allowed + '\nredirect "r0@b.test";', MSG)) == MAX_REDIRECTS  # a repeat is no new redirect


def test_two_vacations_is_a_runtime_error() -> None:
    with pytest.raises(SieveRuntimeError, match="vacation run twice"):
        run('require "vacation";\nvacation "a";\nvacation "b";', MSG)


def test_actions_in_untaken_branches_do_not_count() -> None:
    script = 'require "vacation";\nif false { vacation "a"; }\nvacation "b";'
    assert [type(a).__name__ for a in run(script, MSG)] == ["Vacation", "Keep"]


def test_discard_then_keep_keeps() -> None:
    assert run("discard; discard; keep;", MSG) == [Discard(), Keep()]


@pytest.mark.parametrize(("script", "expected"), [
    ('require "fileinto"; fileinto "x";', [FileInto("x", False)]),
    ('redirect "a@b.test";', [Redirect("a@b.test")]),
    ("discard;", [Discard()]),
    ("stop; discard;", [Keep()]),
    ("if false { discard; }", [Keep()]),
    ('require "fileinto"; if true { fileinto "x"; stop; } keep;', [FileInto("x", False)]),
])
def test_what_cancels_the_implicit_keep(script: str, expected: list[object]) -> None:
    assert run(script, MSG) == expected
