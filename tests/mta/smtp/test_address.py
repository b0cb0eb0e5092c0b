"""parse_path's usual case (one regular expression) held to the general checks, which say why not."""

import random

import pytest

from mta.smtp.address import MAX_LOCAL_OCTETS, Address, AddressError, _mailbox, parse_path

EDGES = ["alice@example.org", "a.b+c@x-y.example", "a@b", "first.last@sub.domain.test", "a..b@x.test", ".a@x.test",
         "a.@x.test", "a@-x.test", "a@x-.test", "a@x..test", "a@x.test.", "a@@x.test", "a@", "a",
         "a@[127.0.0.1]", '"a b"@x.test', "caf\u00e9@x.test", "a@caf\u00e9.test", "a b@x.test", "a@x_y.test",
         "l" * MAX_LOCAL_OCTETS + "@x.test", "l" * (MAX_LOCAL_OCTETS + 1) + "@x.test",
         "a@" + "d" * 63 + ".test", "a@" + "d" * 64 + ".test", "a@" + ".".join(["d" * 50] * 4)]


def _outcome(parse, inner: str) -> Address | str:
    try:
        return parse(inner)
    except AddressError as exc:
        return f"error: {exc}"


def _random_mailboxes(count: int) -> list[str]:
    """local@domain from characters the usual case takes and some it does not, now and then
    with one of anything in either part."""
    rng = random.Random(21)
    local, domain, other = "ab.+_-=~", "ab0.-", "@\"[]: \u00e9!#.-"
    def part(chars: str, longest: int) -> str:
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, longest)))
        return text + rng.choice(other) if rng.random() < 0.2 else text
    return [part(local, 8) + "@" + part(domain, 10) for _ in range(count)]


@pytest.mark.parametrize("inner", EDGES)
def test_the_usual_case_accepts_and_splits_as_the_checks_do(inner: str) -> None:
    assert _outcome(lambda i: parse_path(f"<{i}>", utf8=True), inner) == _outcome(_mailbox, inner)


def test_random_mailboxes_get_what_the_checks_give() -> None:
    accepted = 0
    for inner in _random_mailboxes(20000):
        if inner.startswith("@") or inner.lower() == "postmaster" or ">" in inner:
            continue  # source routes and postmaster come before the mailbox
        outcome = _outcome(lambda i: parse_path(f"<{i}>", utf8=True), inner)
        assert outcome == _outcome(_mailbox, inner), inner
        accepted += isinstance(outcome, Address)
    assert accepted > 2000  # both ways tried often
