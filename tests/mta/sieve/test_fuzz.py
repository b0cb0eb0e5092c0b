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
    except SieveError as exc:  # and it names a place in the text
        assert 1 <= exc.line <= text.count("\n") + 1 and exc.column >= 1, (exc.line, exc.column)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map(" ".join))
def test_script_like_text(text: str) -> None:
    try:
        script = parse(text)
    except SieveError as exc:
        assert 1 <= exc.line <= text.count("\n") + 1 and exc.column >= 1, (exc.line, exc.column)
        return
    try:
        evaluate(script, Context("pal@example.org", "me@example.com", MSG))
    except SieveRuntimeError:
        pass


# Valid scripts, built from the grammar: every one must parse, and run to an action list
# that keeps RFC 5228's promises (or stop with a SieveRuntimeError).
STRINGS = st.sampled_from(['"a"', '"me@example.com"', '"*x*"', '"?"', '""', '["to", "from"]', '"Pal"'])
MATCH = st.sampled_from(["", ":is", ":contains", ":matches"])
COMPARATOR = st.sampled_from(["", ':comparator "i;octet"', ':comparator "i;ascii-casemap"'])
PART = st.sampled_from(["", ":all", ":localpart", ":domain"])
LEAF_TESTS = st.one_of(
    st.sampled_from(["true", "false", 'exists "subject"', 'exists ["to", "x-none"]', "size :over 10",
                     "size :under 1K"]),
    st.builds(lambda m, c, k: f'header {m} {c} ["subject", "to"] {k}', MATCH, COMPARATOR, STRINGS),
    st.builds(lambda m, p, k: f'address {m} {p} ["from", "to"] {k}', MATCH, PART, STRINGS),
    st.builds(lambda m, p, k: f'envelope {m} {p} "from" {k}', MATCH, PART, STRINGS),
)
TESTS = st.recursive(LEAF_TESTS, lambda inner: st.one_of(
    inner.map(lambda t: f"not {t}"),
    st.lists(inner, min_size=1, max_size=3).map(lambda ts: f"allof ({', '.join(ts)})"),
    st.lists(inner, min_size=1, max_size=3).map(lambda ts: f"anyof ({', '.join(ts)})"),
), max_leaves=6)
PLAIN_ACTIONS = [
    "keep;", "discard;", "stop;", 'fileinto "A";', 'fileinto :create "B";', 'fileinto "INBOX";',
    'redirect "r@example.net";', 'redirect "s@example.net";', 'vacation :days 3 "away";', 'reject "no";',
]
PLAIN_HEAD = 'require ["fileinto", "mailbox", "envelope", "vacation", "reject"];\n'


def scripts(actions: list[str], head: str) -> st.SearchStrategy[str]:
    """Whole valid scripts: the head, then if/else trees of the actions under TESTS."""
    commands = st.recursive(st.sampled_from(actions), lambda inner: st.builds(
        lambda t, body, orelse: f"if {t} {{ {' '.join(body)} }}" + (f" else {{ {' '.join(orelse)} }}" if orelse
                                                                     else ""),
        TESTS, st.lists(inner, max_size=3), st.lists(inner, max_size=2)), max_leaves=8)
    return st.lists(commands, max_size=6).map(lambda cs: head + "\n".join(cs))


@settings(max_examples=400, deadline=None)
@given(scripts([*PLAIN_ACTIONS, 'ereject "no";'], PLAIN_HEAD.replace('"reject"]', '"reject", "ereject"]')),
       st.sampled_from(["", "pal@example.org", "me@example.com"]))
def test_valid_scripts_keep_the_rules(text: str, sender: str) -> None:
    script = parse(text)
    try:
        actions = evaluate(script, Context(sender, "me@example.com", MSG))
    except SieveRuntimeError:
        return
    assert actions, "the message never vanishes without a trace"
    assert len(actions) == len(set(actions)), "duplicates are removed"
    kinds = [type(a).__name__ for a in actions]
    assert kinds.count("Vacation") <= 1 and kinds.count("Reject") <= 1
    delivered = {"Keep", "FileInto", "Redirect", "Reject", "Discard"}
    assert delivered & set(kinds), "something happens to the message"
    if "Reject" in kinds:
        assert not {"Keep", "FileInto", "Vacation"} & set(kinds)
