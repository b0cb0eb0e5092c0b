"""forbidden_attachment: an attachment's name, however it is written, found wherever it sits."""

import base64

import pytest

from mta.content.attachments import TOO_MANY_PARTS, forbidden_attachment
from tests.mta.content.samples import TEXT_PART, attachment, message, mixed
from tests.mta.content.tnefwriter import tnef_stream

BLOCKED = frozenset({"exe", "vbs", "js", "scr"})


@pytest.mark.parametrize("params, name", [
    (' filename="setup.exe"', "setup.exe"),
    (' filename=setup.exe', "setup.exe"),
    (' filename="INVOICE.EXE"', "INVOICE.EXE"),                              # case-insensitive
    (" filename*=utf-8''%E2%82%ACinvoice.exe", "€invoice.exe"),               # RFC 2231
    (" filename*=iso-8859-1'de'Rechnung%20M%E4rz.exe", "Rechnung März.exe"),  # RFC 2231, a language
    (" filename*0*=utf-8''Fa%C3%A7;\n filename*1=ture.e;\n filename*2=xe", "Façture.exe"),  # continuations
    (' filename="=?utf-8?B?UmVjaG51bmcuZXhl?="', "Rechnung.exe"),              # RFC 2047
    (' filename="=?iso-8859-1?Q?F=E4llig=2Evbs?="', "Fällig.vbs"),            # RFC 2047, Q
    (' filename="trailing.exe."', "trailing.exe."),                          # Windows drops the dot
])
def test_a_forbidden_name_however_it_is_written(params: str, name: str) -> None:
    assert forbidden_attachment(mixed(TEXT_PART, attachment(params)), BLOCKED) == name


def test_a_name_only_in_content_type_name() -> None:
    part = "Content-Type: application/octet-stream; name=\"run.scr\"\nContent-Transfer-Encoding: base64\n\nAAAA\n"
    assert forbidden_attachment(mixed(TEXT_PART, part), BLOCKED) == "run.scr"


@pytest.mark.parametrize("params", [
    ' filename="report.pdf"', ' filename="report.exe.pdf"', ' filename="notexe"', ' filename="exe"',
    " filename*=utf-8''caf%C3%A9.pdf",
])
def test_an_innocent_attachment_passes(params: str) -> None:
    assert forbidden_attachment(mixed(TEXT_PART, attachment(params, "application/pdf")), BLOCKED) is None


def test_no_extensions_configured_lets_everything_through() -> None:
    assert forbidden_attachment(mixed(TEXT_PART, attachment(' filename="a.exe"')), frozenset()) is None


def test_inside_a_forwarded_message_with_its_own_multipart() -> None:
    inner = mixed(TEXT_PART, attachment(' filename="=?utf-8?Q?tr=C3=A4ger.js?="'), boundary="inner")
    inner_text = inner.decode("utf-8").replace("\r\n", "\n")
    forwarded = "Content-Type: message/rfc822\nContent-Disposition: inline\n\n" + inner_text
    outer = mixed(TEXT_PART, attachment(' filename="fine.pdf"', "application/pdf"), forwarded, boundary="outer")
    assert forbidden_attachment(outer, BLOCKED) == "träger.js"
    assert forbidden_attachment(outer, frozenset({"vbs"})) is None


def test_single_part_message_with_a_name() -> None:
    msg = message('Content-Type: application/x-msdownload; name="a.exe"\nContent-Transfer-Encoding: base64\n',
                  "AAAA\n")
    assert forbidden_attachment(msg, BLOCKED) == "a.exe"


def test_packed_inside_a_winmail_dat() -> None:
    stream = tnef_stream([("notes.txt", None, b"hi"), ("EVIL~1.EXE", "evil payload.exe", b"MZ")])
    part = ("Content-Type: application/ms-tnef; name=\"winmail.dat\"\nContent-Transfer-Encoding: base64\n\n"
            + base64.b64encode(stream).decode() + "\n")
    assert forbidden_attachment(mixed(TEXT_PART, part), BLOCKED) == "evil payload.exe"


def test_malformed_mime_is_read_as_far_as_it_goes() -> None:
    # No closing delimiter, a boundary parameter with stray quoting, a part without a blank line.
    msg = message('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="x"\n',
                  '--x\nContent-Type: text/plain\n\nhi\n--x\nContent-Disposition: attachment; filename="late.vbs"\n')
    assert forbidden_attachment(msg, BLOCKED) == "late.vbs"


def test_a_name_cannot_hide_behind_ten_thousand_parts() -> None:
    empty = "Content-Type: text/plain\n\n"
    exe = attachment(' filename="x.exe"')
    assert forbidden_attachment(mixed(*[empty] * 9_990, exe), BLOCKED) == "x.exe"
    assert forbidden_attachment(mixed(*[empty] * 10_000, exe), BLOCKED) == TOO_MANY_PARTS
    assert forbidden_attachment(mixed(*[empty] * 10_000), frozenset()) is None


def test_control_characters_neither_hide_the_extension_nor_reach_the_reply() -> None:
    # =0D=0A decoded from RFC 2047 would be a line end in the 554 reply that names it.
    name = forbidden_attachment(mixed(TEXT_PART, attachment(' filename="=?utf-8?Q?a=0D=0A250_ok.exe=0D=0A?="')),
                                BLOCKED)
    assert name == "a??250 ok.exe??"
