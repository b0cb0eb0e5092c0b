"""Message ids: is_id takes exactly the one form new_id makes (21 upper-case hex digits).

is_id runs for every id of every New the scheduler gets, so it checks the characters in
one C pass (str.strip); this holds it to the rule written out character by character."""

from __future__ import annotations

import string

from mtaqueue.ids import is_id, new_id


def by_the_rule(text: str) -> bool:
    return len(text) == 21 and all(c in "0123456789ABCDEF" for c in text)


def test_every_new_id_is_an_id() -> None:
    assert all(is_id(new_id()) for _ in range(1000))
    assert is_id(new_id(0.0)) and is_id("F" * 21)


def test_one_wrong_character_anywhere_is_not_an_id() -> None:
    good = str(new_id())
    # (and an Arabic-Indic zero, a full-width A: digits and letters, not ours)
    others = set(string.printable) - set("0123456789ABCDEF") | {"é", "\x00", "\u0660", "\uff21"}
    for at in range(21):
        for c in sorted(others):
            text = good[:at] + c + good[at + 1:]
            assert is_id(text) is by_the_rule(text) is False, repr(text)


def test_lengths_other_than_21_are_not_ids() -> None:
    good = str(new_id())
    for text in ("", good[:20], good + "0", good + " ", " " + good[1:] + " ", good.lower()):
        assert is_id(text) is by_the_rule(text) is False, repr(text)
