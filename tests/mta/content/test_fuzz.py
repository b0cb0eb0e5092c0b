"""Property tests: no bytes make the content functions raise; read_tnef raises only TnefError."""

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.content.attachments import forbidden_attachment
from mta.content.footer import add_footer
from mta.content.tnef import TnefError, read_tnef
from mta.content.tnefconvert import convert_tnef
from tests.mta.content.tnefwriter import tnef_stream

FRAGMENTS = [b"\r\n", b"\n", b"\r", b"--b", b"--b--", b"--", b": ", b";", b"=", b'"', b" ", b"\t", b"\xff", b"=?",
             b"?=", b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
             b"Content-Type: text/plain; charset=utf-8\r\n", b"Content-Type: text/html; charset=x\r\n",
             b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
             b"Content-Type: application/ms-tnef\r\n", b"filename*0*=utf-8''%E2", b"filename=a.exe",
             b"name*=x'y'%", b"</body>", b"SGVsbG8=", b"eJ8+Ig", b"X-MTA-Footer: added\r\n"]
MIMEISH = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=8), max_size=60).map(b"".join)
TNEF = tnef_stream([("A.EXE", "a long.exe", b"MZ" * 40), ("b.txt", None, b"text")])


def mutated(data: bytes, cuts: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in cuts:
        out[at % len(out)] = value
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | MIMEISH)
def test_no_input_makes_them_raise(content: bytes) -> None:
    forbidden_attachment(content, frozenset({"exe", "js"}))
    convert_tnef(content)
    result = add_footer(content, "footer ✓", "<p>footer</p>")
    if result is not None:
        assert add_footer(result, "again") is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6), st.integers(0, len(TNEF)))
def test_damaged_tnef_is_refused_or_read_never_crashes(cuts: list[tuple[int, int]], length: int) -> None:
    stream = mutated(TNEF, cuts)[:length]
    try:
        read_tnef(stream)
    except TnefError:
        pass  # refused: the part is kept as it is
    part = base64.encodebytes(stream).replace(b"\n", b"\r\n")
    content = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/ms-tnef\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + part + b"--b--\r\n")
    assert convert_tnef(content) is not None
    forbidden_attachment(content, frozenset({"exe"}))
