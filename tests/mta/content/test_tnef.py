"""TNEF: our reader agrees with Debian's tnef on a stream written after MS-OXTNEF, and
convert_tnef puts the packed attachments in the message as ordinary MIME parts."""

import base64
import email
import shutil
import subprocess
from email.policy import default
from pathlib import Path

import pytest

from mta.content.mime import parse_parts
from mta.content.tnef import TnefError, read_tnef
from mta.content.tnefconvert import convert_tnef
from tests.mta.content.samples import TEXT_PART, message, mixed
from tests.mta.content.tnefwriter import tnef_stream

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"
ATTACHMENTS = [
    ("QUARTE~1.PDF", "Quarterly report.pdf", PDF),   # the long name wins over the 8.3 title
    ("notes.txt", None, b"plain notes\r\nline two\r\n"),
    ("TSCHS~1.TXT", "Tschüß.txt", "Grüße\n".encode("cp1252")),
    ("empty.bin", None, b""),
]
EXPECTED = {"Quarterly report.pdf": PDF, "notes.txt": ATTACHMENTS[1][2], "Tschüß.txt": ATTACHMENTS[2][2],
            "empty.bin": b""}


def tnef_part(stream: bytes, name: str = "winmail.dat", content_type: str = "application/ms-tnef") -> str:
    encoded = base64.encodebytes(stream).decode().rstrip("\n")
    return (f'Content-Type: {content_type}; name="{name}"\nContent-Disposition: attachment; filename="{name}"\n'
            f"Content-Transfer-Encoding: base64\n\n{encoded}\n")


def test_debian_tnef_unpacks_our_fixture_to_what_our_reader_reads(tmp_path: Path) -> None:
    tool = shutil.which("tnef")
    assert tool, "Debian's tnef is a test dependency (make test-deps installs it)"
    stream = tnef_stream(ATTACHMENTS)
    (tmp_path / "winmail.dat").write_bytes(stream)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([tool, "-C", str(out), str(tmp_path / "winmail.dat")], check=True, timeout=30)
    unpacked = {p.name: p.read_bytes() for p in out.iterdir()}
    assert unpacked == EXPECTED
    assert {a.name: a.data for a in read_tnef(stream)} == EXPECTED


def test_a_multipart_message_gets_the_attachments_in_place_of_winmail_dat() -> None:
    original = mixed(TEXT_PART, tnef_part(tnef_stream(ATTACHMENTS)))
    converted = convert_tnef(original)
    parsed = email.message_from_bytes(converted, policy=default)
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/pdf", "text/plain",
                                                      "text/plain", "application/octet-stream"]
    assert parts[0].get_content() == "Hello.\r\n"
    got = {p.get_filename(): p.get_payload(decode=True) for p in parts[1:]}
    assert got == EXPECTED
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in parts[1:])
    # Everything before the TNEF part and after it is byte for byte as it was.
    tnef = parse_parts(original).children[1]
    new_last = parse_parts(converted).children[-1]
    assert converted[:tnef.start] == original[:tnef.start]
    assert converted[new_last.end:] == original[tnef.end:]


def test_a_message_that_is_a_tnef_part_becomes_multipart_mixed() -> None:
    stream = tnef_stream(ATTACHMENTS[:2])
    original = message('From: a@c.test\nMIME-Version: 1.0\nContent-Type: application/ms-tnef; name="winmail.dat"\n'
                       "Content-Transfer-Encoding: base64\nSubject: s\n",
                       base64.encodebytes(stream).decode())
    parsed = email.message_from_bytes(convert_tnef(original), policy=default)
    assert parsed.get_content_type() == "multipart/mixed"
    assert parsed["Subject"] == "s" and parsed["From"] == "a@c.test"
    assert {p.get_filename(): p.get_payload(decode=True) for p in parsed.iter_parts()} == {
        "Quarterly report.pdf": PDF, "notes.txt": ATTACHMENTS[1][2]}


def test_a_winmail_dat_sent_as_octet_stream_is_converted_too() -> None:
    original = mixed(TEXT_PART, tnef_part(tnef_stream(ATTACHMENTS[1:2]), content_type="application/octet-stream"))
    parts = list(email.message_from_bytes(convert_tnef(original), policy=default).iter_parts())
    assert [p.get_filename() for p in parts] == [None, "notes.txt"]


def test_no_tnef_part_is_none() -> None:
    assert convert_tnef(mixed(TEXT_PART, TEXT_PART)) is None
    assert convert_tnef(message("Subject: s\n", "hello\n")) is None


@pytest.mark.parametrize("stream", [
    b"not tnef at all",
    tnef_stream(ATTACHMENTS)[:-40],                          # cut short
    tnef_stream([]),                                         # nothing packed: the RTF body is all there is
])
def test_a_tnef_part_that_does_not_parse_is_kept_as_it_is(stream: bytes) -> None:
    original = mixed(TEXT_PART, tnef_part(stream))
    assert convert_tnef(original) == original


def test_the_reader_refuses_what_is_not_tnef() -> None:
    with pytest.raises(TnefError):
        read_tnef(b"\x78\x9f\x3e\x22\x00\x00\x01\x06\x90\x08\x00\xff\xff\xff\x7f")
    with pytest.raises(TnefError):
        read_tnef(b"PK\x03\x04")


def test_a_long_non_ascii_name_is_written_in_rfc_2231_continuations() -> None:
    name = "Übersicht der Quartalszahlen für den Vorstand – endgültige Fassung (überarbeitet).xlsx"
    converted = convert_tnef(mixed(TEXT_PART, tnef_part(tnef_stream([("UBERSI~1.XLS", name, b"PK")]))))
    part = list(email.message_from_bytes(converted, policy=default).iter_parts())[1]
    assert part.get_filename() == name and part.get_payload(decode=True) == b"PK"
    assert max(len(line) for line in converted.split(b"\r\n") if b"name*" in line) <= 78
