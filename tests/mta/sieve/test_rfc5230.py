"""RFC 5230 vacation: the RFC's example scripts through evaluate, then vacation_reply's
rules on whom to answer (RFC 5230 4.5/4.6, RFC 3834) and the reply it builds."""

from __future__ import annotations

import email
import email.policy

import pytest

from mta.sieve import Keep, Redirect, SieveError, SieveRuntimeError, Vacation, parse
from mta.sieve.vacation import check_vacation, vacation_reply
from tests.mta.sieve.runner import message, run

ME = "me@example.com"
NOW = 1_780_000_000.0


def vacation(reason: str = "I'm away", **kw: object) -> Vacation:
    fields: dict[str, object] = dict(reason=reason, days=7, subject=None, from_=None, addresses=(), mime=False,
                                     handle=None)
    fields.update(kw)
    return Vacation(**fields)  # type: ignore[arg-type]


def test_section_4_example_subject_branches() -> None:
    script = """\
require "vacation";
if header :contains "subject" "cyrus" {
    vacation "I'm out -- send mail to cyrus-bugs";
} else {
    vacation "I'm out -- call me at +1 304 555 0123";
}
"""
    actions = run(script, message("Subject: cyrus is broken"))
    assert actions == [vacation("I'm out -- send mail to cyrus-bugs"), Keep()]
    actions = run(script, message("Subject: lunch"))
    assert actions == [vacation("I'm out -- call me at +1 304 555 0123"), Keep()]


def test_section_4_1_days_and_addresses() -> None:
    script = """\
require "vacation";
vacation :days 23 :addresses ["tjs@example.edu",
                              "ts4z@landru.example.edu"]
   "I'm away until October 19.
   If it's an emergency, call 911, I guess." ;
"""
    [action, keep] = run(script, message("Subject: hi"))
    assert keep == Keep()
    assert action == vacation("I'm away until October 19.\n   If it's an emergency, call 911, I guess.", days=23,
                              addresses=("tjs@example.edu", "ts4z@landru.example.edu"))


def test_section_4_redirect_the_boss_else_vacation() -> None:
    script = """\
require "vacation";
if header :contains "from" "boss@example.edu" {
    redirect "pleeb@isp.example.org";
} else {
    vacation "Sorry, I'm away, I'll read your
message when I get around to it.";
}
"""
    assert run(script, message("From: boss@example.edu")) == [Redirect("pleeb@isp.example.org")]
    assert run(script, message("From: pal@example.edu")) == [
        vacation("Sorry, I'm away, I'll read your\nmessage when I get around to it."), Keep()]


def test_section_4_2_handle() -> None:
    script = """\
require "vacation";
if header :contains "subject" "lunch" {
    vacation :handle "ran-away" "I'm out and can't meet for lunch";
} else {
    vacation :handle "ran-away" "I'm out";
}
"""
    assert run(script, message("Subject: lunch?"))[0] == vacation("I'm out and can't meet for lunch",
                                                                 handle="ran-away")
    assert run(script, message("Subject: hi"))[0] == vacation("I'm out", handle="ran-away")


MIME_EXAMPLE = """\
require "vacation";
vacation :mime text:
Content-Type: multipart/alternative; boundary=foo

--foo

I'm at the beach relaxing.  Mmmm, surf...

--foo
Content-Type: text/html; charset=us-ascii

<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.0//EN"
 "http://www.w3.org/TR/REC-html40/strict.dtd">
<HTML><HEAD><TITLE>How to relax</TITLE>
<BASE HREF="http://home.example.com/pictures/"></HEAD>
<BODY><P>I'm at the <A HREF="beach.gif">beach</A> relaxing.
Mmmm, <A HREF="ocean.gif">surf</A>...
</BODY></HTML>

--foo--
.
;
"""


def test_section_4_3_mime_reason_is_the_reply_entity() -> None:
    [action, _] = run(MIME_EXAMPLE, message("From: pal@example.org", f"To: {ME}", "Message-ID: <m1@example.org>"))
    assert action.mime and action.reason.startswith("Content-Type: multipart/alternative; boundary=foo\r\n")
    reply = vacation_reply(action, "pal@example.org", ME, (), message(f"To: {ME}"), "mx.example.com", NOW)
    assert reply is not None
    parsed = email.message_from_bytes(reply.content, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in parsed.iter_parts()]  # type: ignore[attr-defined]
    assert parts == ["text/plain", "text/html"]


def test_section_7_language_selection() -> None:
    script = """\
require "vacation";
if header :contains ["accept-language", "content-language"] "en"
{
    vacation "I am away this week.";
} else {
    vacation "Estoy ausente esta semana.";
}
"""
    assert run(script, message("Content-Language: en-GB"))[0] == vacation("I am away this week.")
    assert run(script, message("Accept-Language: es"))[0] == vacation("Estoy ausente esta semana.")


def test_section_7_subject_by_division() -> None:
    script = """\
require "vacation";
if address :matches "from" "*@ourdivision.example.com"
{
    vacation :subject "Gone fishing"
             "Having lots of fun! Back in a day or two!";
} else {
    vacation :subject "Je suis parti cette semaine"
             "Je lirai votre message quand je retourne.";
}
"""
    assert run(script, message("From: pal@ourdivision.example.com"))[0] == vacation(
        "Having lots of fun! Back in a day or two!", subject="Gone fishing")
    assert run(script, message("From: pal@example.fr"))[0] == vacation(
        "Je lirai votre message quand je retourne.", subject="Je suis parti cette semaine")


def test_a_mime_reason_with_8bit_fields_is_a_runtime_error() -> None:
    script = 'require "vacation";\nvacation :mime "Content-Type: text/plain; name=caf\u00e9\n\nhi";'
    with pytest.raises(SieveRuntimeError, match="8-bit header"):
        run(script, message())
    assert run(script.replace("caf\u00e9", "cafe"), message())[0].mime  # type: ignore[union-attr]


def test_from_subject_and_days_tags() -> None:
    script = ('require "vacation";\nvacation :days 7 :from "hemingway@example.com" :subject "Gone Fishing"\n'
              ' :addresses ["hemingway@example.com", "ernest@example.com"] "Gone fishing.";')
    [action, _] = run(script, message("Subject: hi"))
    assert action == vacation("Gone fishing.", from_="hemingway@example.com", subject="Gone Fishing",
                              addresses=("hemingway@example.com", "ernest@example.com"))


def test_days_below_one_is_one_and_missing_is_seven() -> None:
    assert run('require "vacation"; vacation :days 0 "x";', message())[0].days == 1  # type: ignore[union-attr]
    assert run('require "vacation"; vacation "x";', message())[0].days == 7  # type: ignore[union-attr]


def test_vacation_needs_require_and_a_valid_from() -> None:
    with pytest.raises(SieveError, match='vacation needs require "vacation"'):
        parse('vacation "x";')
    with pytest.raises(SieveError, match=":from 'not an address' is not a mail address"):
        parse('require "vacation"; vacation :from "not an address" "x";')


ORIGINAL = message("From: Pal <pal@example.org>", f"To: Me <{ME}>", "Subject: =?utf-8?q?d=C3=A9jeuner?=",
                   "Message-ID: <m1@example.org>", "References: <m0@example.org>")


@pytest.mark.parametrize(("sender", "fields", "why"), [
    ("", (f"To: {ME}",), "<>"),
    ("<>", (f"To: {ME}",), "<>"),
    ("MAILER-DAEMON@example.org", (f"To: {ME}",), "daemon"),
    ("owner-staff@example.org", (f"To: {ME}",), "daemon"),
    ("staff-request@example.org", (f"To: {ME}",), "daemon"),
    ("pal@example.org", (f"To: {ME}", "Auto-Submitted: auto-generated"), "Auto-Submitted"),
    ("pal@example.org", (f"To: {ME}", "Auto-Submitted: auto-replied; owner-email=x@y.test"), "Auto-Submitted"),
    ("pal@example.org", (f"To: {ME}", "List-Id: Staff <staff.example.org>"), "mailing list"),
    ("pal@example.org", (f"To: {ME}", "List-Unsubscribe: <mailto:u@example.org>"), "mailing list"),
    ("pal@example.org", (f"To: {ME}", "Precedence: bulk"), "Precedence"),
    ("pal@example.org", (f"To: {ME}", "Precedence: JUNK"), "Precedence"),
    ("pal@example.org", (f"To: {ME}", "Precedence: list"), "Precedence"),
    (ME, (f"To: {ME}",), "the mailbox itself"),
    ("me-alias@example.net", (f"To: {ME}",), "the mailbox itself"),
    ("pal@example.org", ("To: staff@example.com",), "To, Cc or Bcc"),
])
def test_no_reply(sender: str, fields: tuple[str, ...], why: str) -> None:
    msg = message("From: x@example.org", *fields)
    assert why in (check_vacation(vacation(), sender, ME, ("me-alias@example.net",), msg) or "")
    assert vacation_reply(vacation(), sender, ME, ("me-alias@example.net",), msg, "mx.example.com", NOW) is None


@pytest.mark.parametrize("fields", [
    (f"To: {ME}",),
    ("To: staff@example.com", f"Cc: Me <{ME.upper()}>"),
    ("To: staff@example.com", f"Bcc: {ME}"),
    ("To: staff@example.com", "Cc: alias@example.net"),        # a mailbox address
    ("To: staff@example.com", "Resent-To: tjs@example.edu"),  # an :addresses one
    (f"To: {ME}", "Auto-Submitted: no", "Precedence: first-class"),
])
def test_reply(fields: tuple[str, ...]) -> None:
    action = vacation(addresses=("tjs@example.edu",))
    assert check_vacation(action, "pal@example.org", ME, ("alias@example.net",), message(*fields)) is None


def test_the_reply_message() -> None:
    reply = vacation_reply(vacation("Back on Monday — café.\nBye"), "pal@example.org", ME, (), ORIGINAL,
                           "mx.example.com", NOW)
    assert reply is not None
    assert (reply.to, reply.days) == ("pal@example.org", 7)
    assert reply.content.count(b"\n") == reply.content.count(b"\r\n")
    parsed = email.message_from_bytes(reply.content, policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["In-Reply-To"] == "<m1@example.org>"
    assert parsed["References"] == "<m0@example.org> <m1@example.org>"
    assert parsed["Subject"] == "Auto: déjeuner"
    assert parsed["From"] == ME and parsed["To"] == "pal@example.org"
    assert parsed["Message-ID"].endswith("@mx.example.com>") and parsed["Date"]
    assert parsed.get_content().replace("\r\n", "\n") == "Back on Monday — café.\nBye\n"  # type: ignore[attr-defined]


def test_subject_and_from_tags_win() -> None:
    action = vacation("x", subject="Gone\r\nBcc: victim@example.net", from_="Me <me@example.com>")
    reply = vacation_reply(action, "pal@example.org", ME, (), ORIGINAL, "mx.example.com", NOW)
    assert reply is not None
    parsed = email.message_from_bytes(reply.content, policy=email.policy.default)
    assert parsed["Subject"] == "Gone  Bcc: victim@example.net" and parsed["Bcc"] is None  # no header injection
    assert parsed["From"] == "Me <me@example.com>"


def test_handle_is_the_tag_or_a_digest_of_what_the_reply_says() -> None:
    args = ("pal@example.org", ME, (), ORIGINAL, "mx.example.com", NOW)
    assert vacation_reply(vacation(handle="ran-away"), *args).handle == "ran-away"  # type: ignore[union-attr]
    one = vacation_reply(vacation("a"), *args).handle  # type: ignore[union-attr]
    assert one == vacation_reply(vacation("a", days=3), *args).handle  # type: ignore[union-attr]
    assert one != vacation_reply(vacation("b"), *args).handle  # type: ignore[union-attr]
    assert one != vacation_reply(vacation("a", subject="s"), *args).handle  # type: ignore[union-attr]


def test_no_message_id_no_threading_fields() -> None:
    reply = vacation_reply(vacation(), "pal@example.org", ME, (), message(f"To: {ME}"), "mx.example.com", NOW)
    assert reply is not None and b"In-Reply-To" not in reply.content and b"References" not in reply.content
    assert b"Subject: Automated reply\r\n" in reply.content


def test_a_non_ascii_from_name_is_encoded() -> None:
    action = vacation("x", from_="Zoë Smith <zoe@example.com>")
    reply = vacation_reply(action, "pal@example.org", ME, (), ORIGINAL, "mx.example.com", NOW)
    assert reply is not None and reply.content.isascii()
    parsed = email.message_from_bytes(reply.content, policy=email.policy.default)
    assert parsed["From"].addresses[0].display_name == "Zoë Smith"
    assert parsed["From"].addresses[0].addr_spec == "zoe@example.com"


def test_long_fields_are_folded() -> None:
    chain = " ".join(f"<{i:04d}.{'x' * 30}@example.org>" for i in range(60))
    original = message(f"To: {ME}", f"References: {chain}", "Message-ID: <last@example.org>",
                       "Subject: " + "é" * 120)
    reply = vacation_reply(vacation(), "pal@example.org", ME, (), original, "mx.example.com", NOW)
    assert reply is not None
    assert max(len(line) for line in reply.content.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(reply.content, policy=email.policy.default)
    assert parsed["References"].split() == [*chain.split(), "<last@example.org>"]
    assert parsed["Subject"] == "Auto: " + "é" * 120
