"""The example scripts of RFC 5228 (sections 2 to 5, and the full example of section 9),
each run against messages that take each of its branches."""

from __future__ import annotations

import pytest

from mta.sieve import Discard, FileInto, Keep, Redirect, parse
from tests.mta.sieve.runner import message, run

# RFC 5228 section 9, verbatim (the capitals of :DOMAIN and NOT included).
FULL_EXAMPLE = """\
#
# Example Sieve Filter
# Declare any optional features or extension used by the script
#
require ["fileinto"];

#
# Handle messages from known mailing lists
# Move messages from IETF filter discussion list to filter mailbox
#
if header :is "Sender" "owner-ietf-mta-filters@imc.org"
        {
        fileinto "filter";  # move to "filter" mailbox
        }
#
# Keep all messages to or from people in my company
#
elsif address :DOMAIN :is ["From", "To"] "example.com"
        {
        keep;               # keep in "In" mailbox
        }

#
# Try and catch unsolicited email.  If a message is not to me,
# or it contains a subject known to be spam, file it away.
#
elsif anyof (NOT address :all :contains
               ["To", "Cc", "Bcc"] "me@example.com",
             header :matches "subject"
               ["*make*money*fast*", "*university*dipl*mas*"])
        {
        fileinto "spam";   # move to "spam" mailbox
        }
else
        {
        # Move all other (non-company) mail to "personal"
        # mailbox.
        fileinto "personal";
        }
"""


@pytest.mark.parametrize(("fields", "expected"), [
    (("Sender: owner-ietf-mta-filters@imc.org", "From: a@imc.org", "To: me@example.com"),
     [FileInto("filter", False)]),
    (("From: boss@EXAMPLE.com", "To: list@other.test"), [Keep()]),
    (("From: friend@other.test", "To: someone@other.test"), [FileInto("spam", False)]),
    (("From: friend@other.test", "To: list@other.test", "Cc: me@example.com",
      "Subject: Make MONEY very fast now"),
     [FileInto("spam", False)]),
    (("From: friend@other.test", "Cc: Me <me@example.com>", "Subject: your university diplomas"),
     [FileInto("spam", False)]),
    (("From: friend@other.test", "To: list@other.test", "Bcc: me@example.com", "Subject: lunch?"),
     [FileInto("personal", False)]),
], ids=["list", "company", "not-to-me", "money", "diplomas", "personal"])
def test_section_9_full_example(fields: tuple[str, ...], expected: list[object]) -> None:
    assert run(FULL_EXAMPLE, message(*fields)) == expected


SECTION_3_1 = """\
if header :contains "from" "coyote" {
    discard;
} elsif header :contains ["subject"] ["$$$"] {
    discard;
} else {
    fileinto "INBOX";
}
"""


def test_section_3_1_if_elsif_else() -> None:
    script = 'require "fileinto";\n' + SECTION_3_1
    assert run(script, message("From: Wile E. Coyote <coyote@desert.example.org>")) == [Discard()]
    assert run(script, message("From: a@b.test", "Subject: earn $$$ now")) == [Discard()]
    assert run(script, message("From: a@b.test", "Subject: hello")) == [Keep()]  # fileinto INBOX is keep


def test_section_3_3_stop_ends_the_script_and_the_implicit_keep_remains() -> None:
    script = 'if header :contains "subject" "stop" { stop; }\ndiscard;'
    assert run(script, message("Subject: please stop")) == [Keep()]
    assert run(script, message("Subject: go on")) == [Discard()]


def test_section_4_1_fileinto() -> None:
    script = 'require "fileinto";\nif header :contains ["from"] "coyote" {\n   fileinto "INBOX.harassment";\n}\n'
    assert run(script, message("From: coyote@desert.example.org")) == [FileInto("INBOX.harassment", False)]
    assert run(script, message("From: roadrunner@desert.example.org")) == [Keep()]


def test_section_4_2_redirect_cancels_the_implicit_keep() -> None:
    assert run('redirect "bart@example.com";', message("From: a@b.test")) == [Redirect("bart@example.com")]
    assert run('redirect "bart@example.com"; keep;', message("From: a@b.test")) == [
        Redirect("bart@example.com"), Keep()]


def test_section_4_3_keep_and_size() -> None:
    script = "if size :under 1M { keep; } else { discard; }"
    small = message("Subject: small")
    big = message("Subject: big", body="x" * (1 << 20) + "\r\n")
    assert run(script, small) == [Keep()]
    assert run(script, big) == [Discard()]


def test_section_4_4_discard() -> None:
    script = 'if header :contains ["from"] ["idiot@example.com"] {\n  discard;\n}'
    assert run(script, message("From: The Idiot <idiot@example.com>")) == [Discard()]
    assert run(script, message("From: genius@example.com")) == [Keep()]


def test_section_5_1_address() -> None:
    script = 'if address :is :all "from" "tim@example.com" {\n   discard;\n}'
    assert run(script, message("From: Tim <TIM@example.com>")) == [Discard()]
    assert run(script, message("From: tim@example.com.evil.test")) == [Keep()]


def test_section_5_2_and_5_3_allof_anyof() -> None:
    allof = 'if allof (header :contains "From" "Cobb", header :contains "To" "Cobb") { discard; }'
    anyof = 'if anyof (header :contains "From" "Cobb", header :contains "To" "Cobb") { discard; }'
    both = message("From: Ty Cobb <ty@b.test>", "To: Al Cobb <al@b.test>")
    one = message("From: Ty Cobb <ty@b.test>", "To: x@b.test")
    none = message("From: x@b.test", "To: y@b.test")
    assert [run(allof, m) for m in (both, one, none)] == [[Discard()], [Keep()], [Keep()]]
    assert [run(anyof, m) for m in (both, one, none)] == [[Discard()], [Discard()], [Keep()]]


def test_section_5_4_envelope() -> None:
    script = 'require "envelope";\nif envelope :all :is "from" "tim@example.com" {\n   discard;\n}'
    assert run(script, message("From: x@b.test"), envelope_from="tim@example.com") == [Discard()]
    assert run(script, message("From: tim@example.com"), envelope_from="other@example.com") == [Keep()]


def test_section_5_4_the_null_sender_is_the_empty_string_for_every_part() -> None:
    script = 'require "envelope";\nif envelope :localpart :is "from" "" { discard; }'
    assert run(script, message("From: x@b.test"), envelope_from="") == [Discard()]
    assert run(script, message("From: x@b.test"), envelope_from="a@b.test") == [Keep()]


def test_section_5_5_exists_needs_every_header() -> None:
    script = 'if not exists ["From","Date"] { discard; }'
    assert run(script, message("From: a@b.test", "Date: Mon, 7 Dec 2026 05:00:00 +0000")) == [Keep()]
    assert run(script, message("From: a@b.test")) == [Discard()]


def test_section_5_7_header_empty_key() -> None:
    is_empty = 'if header :is ["X-Caffeine"] [""] { discard; }'
    contains_empty = 'if header :contains ["X-Caffeine"] [""] { discard; }'
    caffeine = message("X-Caffeine: C8H10N4O2")
    assert run(is_empty, caffeine) == [Keep()]
    assert run(contains_empty, caffeine) == [Discard()]
    assert run(is_empty, message("X-Caffeine:")) == [Discard()]
    assert run(contains_empty, message("Subject: none")) == [Keep()]  # absent: not even ""


def test_section_5_9_size_is_neither_over_nor_under_its_own_size() -> None:
    msg = message("Subject: x", body="y" * 4000)
    size = len(msg)
    assert run(f"if size :over {size} {{ discard; }}", msg) == [Keep()]
    assert run(f"if size :under {size} {{ discard; }}", msg) == [Keep()]
    assert run(f"if size :over {size - 1} {{ discard; }}", msg) == [Discard()]
    assert run(f"if size :under {size + 1} {{ discard; }}", msg) == [Discard()]


@pytest.mark.parametrize(("tests", "allof", "anyof"), [
    ("false, false", False, False), ("false, true", False, True), ("true,  true", True, True)])
def test_sections_5_2_and_5_3_truth_tables(tests: str, allof: bool, anyof: bool) -> None:
    assert (run(f"if allof ({tests}) {{ discard; }}", message()) == [Discard()]) is allof
    assert (run(f"if anyof ({tests}) {{ discard; }}", message()) == [Discard()]) is anyof


def test_section_2_3_comments() -> None:
    hashed = "if size :over 100k { # this is a comment\n   discard;\n}\n"
    bracketed = ("if size :over 100K { /* this is a comment\n   this is still a comment */ discard /* this is "
                 "a comment\n   */ ;\n}\n")
    big, small = message(body="x" * 102400), message()
    for script in (hashed, bracketed):
        assert (run(script, big), run(script, small)) == ([Discard()], [Keep()])


def test_section_2_4_2_1_string_lists() -> None:
    script = 'if header :contains ["To", "Cc"] ["me@example.com", "me00@landru.example.com"] { discard; }'
    assert run(script, message("To: a@b.test", "Cc: Me <me00@landru.example.com>")) == [Discard()]
    assert run(script, message("To: me@example.com")) == [Discard()]
    assert run(script, message("To: a@b.test", "Bcc: me@example.com")) == [Keep()]
    assert run('if exists "To" { discard; }', message("To: x")) == run('if exists ["To"] { discard; }',
                                                                       message("To: x")) == [Discard()]


def test_section_2_5_1_test_list() -> None:
    script = ('if anyof (not exists ["From", "Date"],\n        header :contains "from" "fool@example.com") {\n'
              '   discard;\n}')
    date = "Date: Mon, 7 Dec 2026 05:00:00 +0000"
    assert run(script, message("From: fool@example.com", date)) == [Discard()]
    assert run(script, message("From: wise@example.com")) == [Discard()]
    assert run(script, message("From: wise@example.com", date)) == [Keep()]


def test_section_3_1_redirect_chain() -> None:
    script = """\
if header :contains ["From"] ["coyote"] {
   redirect "acm@example.com";
} elsif header :contains "Subject" "$$$" {
   redirect "postmaster@example.com";
} else {
   redirect "field@example.com";
}
"""
    assert run(script, message("From: coyote@desert.example.org", "Subject: $$$")) == [Redirect("acm@example.com")]
    assert run(script, message("From: a@b.test", "Subject: $$$")) == [Redirect("postmaster@example.com")]
    assert run(script, message("From: a@b.test", "Subject: hi")) == [Redirect("field@example.com")]


def test_section_3_2_require_forms() -> None:
    assert parse('require ["fileinto", "reject"];').requires == {"fileinto", "reject"}
    assert parse('require "fileinto";\nrequire "vacation";').requires == {"fileinto", "vacation"}


def test_section_4_3_keep_equivalence() -> None:
    for msg in (message(), message(body="x" * (1 << 20))):
        assert run("if size :under 1M { keep; } else { discard; }", msg) == run(
            "if not size :under 1M { discard; }", msg)


def test_section_5_9_size_over() -> None:
    script = "if size :over 500K { discard; }"
    assert run(script, message(body="x" * 500 * 1024)) == [Discard()]
    assert run(script, message(body="x" * 1000)) == [Keep()]


def test_section_2_6_2_comparator_octet_is_case_sensitive() -> None:
    script = 'if header :contains :comparator "i;octet" "Subject" "MAKE MONEY FAST" { discard; }'
    assert run(script, message("Subject: MAKE MONEY FAST now")) == [Discard()]
    assert run(script, message("Subject: make money fast now")) == [Keep()]


def test_section_2_10_2_the_implicit_keep() -> None:
    assert run("", message("Subject: x")) == [Keep()]
    assert run("discard;", message("Subject: x")) == [Discard()]
    assert run("discard; keep;", message("Subject: x")) == [Discard(), Keep()]


def test_headers_are_unfolded_and_rfc2047_decoded() -> None:
    script = 'if header :is "subject" "Café au lait et croissants" { discard; }'
    assert run(script, message("Subject: =?utf-8?q?Caf=C3=A9?= au lait\r\n et croissants")) == [Discard()]
