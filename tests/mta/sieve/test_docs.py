"""The example scripts in docs/mailboxes.md's Sieve section parse, and do what the text says."""

from __future__ import annotations

import re
from pathlib import Path

from mta.sieve import Discard, FileInto, Keep, Redirect, Reject, Vacation, parse

from tests.mta.sieve.runner import message, run

DOC = Path(__file__).resolve().parents[3] / "docs" / "mailboxes.md"


def examples() -> list[str]:
    section = DOC.read_text().split("## Sieve", 1)[1].split("\n## ", 1)[0]
    section = section.split("### Examples", 1)[1]
    blocks = re.findall(r"(?:^    .*\n|^\n)+", section, flags=re.MULTILINE)
    return [re.sub(r"^    ", "", b, flags=re.MULTILINE).strip() + "\n" for b in blocks if "require" in b]


def test_every_example_parses() -> None:
    scripts = examples()
    assert len(scripts) == 3
    for script in scripts:
        parse(script)


def test_the_examples_do_what_the_text_says() -> None:
    filing, away, refuse = examples()
    assert run(filing, message("List-Id: Staff <staff.example.com>")) == [FileInto("Staff", True)]
    assert run(filing, message("From: Boss <boss@example.com>")) == [FileInto("Boss", False), Keep()]
    assert run(filing, message("Subject: make money fast")) == [Discard()]
    assert run(filing, message("Subject: lunch")) == [Keep()]
    actions = run(away, message(), envelope_from="ceo@important-client.example")
    assert actions[0] == Redirect("deputy@example.com") and isinstance(actions[1], Vacation)
    assert actions[1].reason.startswith("I am away until 14 December")
    assert run(refuse, message("From: x@spammer.example")) == [Reject("No mail from spammer.example, please.", True)]
