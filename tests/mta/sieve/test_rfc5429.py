"""RFC 5429 reject and ereject: the RFC's examples, and the action sets it forbids."""

from __future__ import annotations

import pytest

from mta.sieve import Discard, Keep, Reject, SieveError, SieveRuntimeError, parse
from tests.mta.sieve.runner import message, run

REJECT_EXAMPLE = """\
require ["reject"];

if header :contains "from" "coyote@desert.example.org" {
   reject text:
I am not taking mail from you, and I don't
want your birdseed, either!
.
;
}
"""

EREJECT_EXAMPLE = """\
require ["ereject"];

if address "from" "someone@example.com" {
   ereject "I no longer accept mail from this address";
}
"""


def test_reject_example() -> None:
    reason = "I am not taking mail from you, and I don't\r\nwant your birdseed, either!\r\n"
    assert run(REJECT_EXAMPLE, message("From: coyote@desert.example.org")) == [Reject(reason, extended=False)]
    assert run(REJECT_EXAMPLE, message("From: roadrunner@desert.example.org")) == [Keep()]


def test_ereject_example() -> None:
    assert run(EREJECT_EXAMPLE, message("From: Some One <someone@example.com>")) == [
        Reject("I no longer accept mail from this address", extended=True)]
    assert run(EREJECT_EXAMPLE, message("From: someone@example.com.evil.test")) == [Keep()]


def test_reject_and_ereject_each_need_their_own_require() -> None:
    with pytest.raises(SieveError, match='reject needs require "reject"'):
        parse('require "ereject";\nreject "no";')
    with pytest.raises(SieveError, match='ereject needs require "ereject"'):
        parse('require "reject";\nereject "no";')


@pytest.mark.parametrize("script", [
    'require ["reject", "ereject"]; reject "a"; ereject "b";',
    'require "reject"; reject "a"; reject "b";',
    'require "reject"; keep; reject "a";',
    'require "reject"; reject "a"; keep;',
    'require ["reject", "fileinto"]; reject "a"; fileinto "x";',
    'require ["reject", "vacation"]; vacation "away"; reject "a";',
    'require "ereject"; redirect "a@b.test"; ereject "no";',
    'require "reject"; reject "no"; redirect "a@b.test";',
])
def test_reject_twice_or_with_keep_fileinto_redirect_vacation_is_a_runtime_error(script: str) -> None:
    with pytest.raises(SieveRuntimeError, match="reject"):
        run(script, message("From: a@b.test", "To: me@example.com"))


def test_size_example() -> None:
    script = """\
require ["reject"];

if size :over 100K {
    reject text:
Your message is to big. If you want to send me a big attachment,
put it on a public web site and send me an URL.
.
    ;
}
"""
    [action] = run(script, message(body="x" * 101 * 1024))
    assert isinstance(action, Reject) and action.reason.startswith("Your message is to big.")
    assert run(script, message(body="x" * 99 * 1024)) == [Keep()]


def test_reject_with_discard_is_allowed() -> None:
    assert run('require "reject"; discard; reject "no";', message("From: x@y.test")) == [
        Discard(), Reject("no", extended=False)]
