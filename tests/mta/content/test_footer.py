"""add_footer: the footer lands at the end of the first text part's decoded text, in its
transfer encoding and charset, and every other byte of the message stays as it was."""

import base64
import email
import quopri
from email.policy import default

from mta.content.footer import add_footer
from mta.content.mime import parse_parts
from tests.mta.content.samples import RECEIVED, TEXT_PART, attachment, message, mixed

FOOTER = "--\nSent through the example.net relay"
HTML = "<p>Sent through the example.net relay</p>"


def decoded(part) -> str:
    return part.get_content().replace("\r\n", "\n")


def test_a_plain_message_gets_the_footer_and_the_marker_at_the_top() -> None:
    original = message("From: a@c.test\nSubject: hi\n", "Hello,\nsee you.\n")
    changed = add_footer(original, FOOTER)
    assert changed.startswith(b"X-MTA-Footer: added\r\n" + RECEIVED)
    assert changed == b"X-MTA-Footer: added\r\n" + original + b"--\r\nSent through the example.net relay\r\n"
    parsed = email.message_from_bytes(changed, policy=default)
    assert decoded(parsed).endswith("see you.\n" + FOOTER + "\n")


def test_never_twice() -> None:
    once = add_footer(message("Subject: hi\n", "Hello\n"), FOOTER)
    assert add_footer(once, FOOTER) is None
    assert add_footer(once.replace(b"X-MTA-Footer", b"x-mta-FOOTER"), "other") is None


def test_a_body_without_a_final_line_end_gets_one_before_the_footer() -> None:
    changed = add_footer(message("Subject: hi\n", "no newline"), "F")
    assert changed.endswith(b"\r\n\r\nno newline\r\nF\r\n")


def test_multipart_alternative_gets_it_in_text_and_html_and_nothing_else_moves() -> None:
    alternative = ('Content-Type: multipart/alternative; boundary="alt"\n\n'
                   "--alt\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nHallo Wörld\n"
                   "--alt\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>Hallo</p></BODY></html>\n"
                   "--alt--")
    original = mixed(alternative, attachment(' filename="a.pdf"', "application/pdf"))
    changed = add_footer(original, FOOTER, HTML)
    parsed = email.message_from_bytes(changed, policy=default)
    plain = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert decoded(plain) == "Hallo Wörld\n" + FOOTER + "\n"
    assert decoded(html) == "<html><body><p>Hallo</p>" + HTML + "\n</BODY></html>"
    # The attachment, the preamble and the delimiters are byte-identical.
    old, new = parse_parts(original), parse_parts(changed)
    assert changed[new.children[1].start:] == original[old.children[1].start:]
    old_alt, new_alt = old.children[0], new.children[0]
    assert changed[new_alt.children[0].start:new_alt.children[0].body_start] == \
        original[old_alt.children[0].start:old_alt.children[0].body_start]


def test_html_is_left_alone_without_an_html_footer() -> None:
    alternative = ('Content-Type: multipart/alternative; boundary="alt"\n\n'
                   "--alt\nContent-Type: text/plain\n\nHi\n--alt\nContent-Type: text/html\n\n<p>Hi</p>\n--alt--")
    original = message("MIME-Version: 1.0\n" + alternative.split("\n\n", 1)[0] + "\n", alternative.split("\n\n", 1)[1])
    changed = add_footer(original, FOOTER)
    assert changed.endswith(original[original.index(b"--alt\r\nContent-Type: text/html"):])


def test_a_base64_body_is_decoded_and_re_encoded() -> None:
    text = "Grüße aus Köln\n" * 20
    encoded = base64.encodebytes(text.replace("\n", "\r\n").encode("iso-8859-1")).decode()
    part = f"Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: base64\n\n{encoded}"
    changed = add_footer(mixed(part), "Grüße, das Team")
    body = list(email.message_from_bytes(changed, policy=default).iter_parts())[0]
    assert body["Content-Transfer-Encoding"] == "base64" and body.get_content_charset() == "iso-8859-1"
    assert decoded(body) == text + "Grüße, das Team\n"
    assert all(len(line) <= 76 for line in changed.split(b"\r\n"))


def test_a_quoted_printable_body_is_decoded_and_re_encoded() -> None:
    text = "Gr=FC=DFe aus K=F6ln, a long line that was soft-broken by its sender because it goes on and on =\nand on.\n"
    part = f"Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n{text}"
    changed = add_footer(mixed(part), "Grüße")
    body = list(email.message_from_bytes(changed, policy=default).iter_parts())[0]
    assert body["Content-Transfer-Encoding"] == "quoted-printable" and body.get_content_charset() == "iso-8859-1"
    expected = quopri.decodestring(text.encode()).decode("iso-8859-1") + "Grüße\n"
    assert decoded(body) == expected


def test_a_charset_that_cannot_take_the_footer_becomes_utf_8() -> None:
    part = "Content-Type: text/plain; charset=iso-8859-1; format=flowed\nContent-Transfer-Encoding: 8bit\n\nK\xf6ln\n"
    original = mixed(TEXT_PART.replace("Hello.", "x")).replace(b"Content-Type: text/plain; charset=us-ascii\r\n\r\nx",
                                                                 part.replace("\n", "\r\n").encode("latin-1")[:-2])
    changed = add_footer(original, "— the team ✓")
    body = list(email.message_from_bytes(changed, policy=default).iter_parts())[0]
    assert body.get_content_charset() == "utf-8" and body.get_param("format") == "flowed"
    assert decoded(body) == "Köln\n— the team ✓\n"


def test_a_7bit_ascii_part_given_a_non_ascii_footer_becomes_quoted_printable_utf_8() -> None:
    changed = add_footer(message("Subject: s\nMIME-Version: 1.0\n", "plain\n"), "Grüße")
    parsed = email.message_from_bytes(changed, policy=default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable" and parsed.get_content_charset() == "utf-8"
    assert decoded(parsed) == "plain\nGrüße\n"
    assert changed.isascii()


def test_no_text_part_or_only_a_text_attachment_is_none() -> None:
    assert add_footer(mixed(attachment(' filename="a.pdf"', "application/pdf")), FOOTER) is None
    text_file = "Content-Type: text/plain\nContent-Disposition: attachment; filename=\"log.txt\"\n\nlog\n"
    assert add_footer(mixed(text_file), FOOTER) is None


def test_a_forwarded_message_is_not_where_the_footer_goes() -> None:
    forwarded = "Content-Type: message/rfc822\n\nSubject: inner\n\ninner text\n"
    changed = add_footer(mixed(forwarded, TEXT_PART), "F")
    assert b"inner text\r\n\r\n--b1" in changed
    assert b"Hello.\r\nF\r\n" in changed


def test_a_body_that_does_not_decode_in_its_charset_is_left_alone() -> None:
    assert add_footer(message("Content-Type: text/plain; charset=utf-8\n", "\xff\n").replace(b"\xc3\xbf", b"\xff"),
                      "F") is None
    assert add_footer(message("Content-Type: text/plain; charset=x-unknown\n", "hi\n"), "F") is None


def test_a_signed_message_gets_no_footer_that_would_break_its_signature() -> None:
    signed = ('Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="s"\n\n'
              "--s\nContent-Type: text/plain\n\nsigned text\n--s\nContent-Type: application/pkcs7-signature\n\n"
              "MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAKCAMIIB\n--s--")
    assert add_footer(mixed(signed), FOOTER) is None
    assert add_footer(message("MIME-Version: 1.0\n" + signed.split("\n\n", 1)[0] + "\n", signed.split("\n\n", 1)[1]),
                      FOOTER) is None


def test_a_message_or_part_without_a_body_gets_one() -> None:
    assert add_footer(b"Subject: x\r\nContent-Type: text/plain\r\n", "F") == \
        b"X-MTA-Footer: added\r\nSubject: x\r\nContent-Type: text/plain\r\n\r\nF\r\n"
    assert add_footer(b"Subject: x", "F") == b"X-MTA-Footer: added\r\nSubject: x\r\n\r\nF\r\n"
    empty_part = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b--\r\n"
    parsed = email.message_from_bytes(add_footer(empty_part, "F"), policy=default)
    assert [decoded(p) for p in parsed.iter_parts()] == ["F"]  # the last line end is the delimiter's
