"""Line-end check and repair shared by the SMTP server and client (mta/smtp/content.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.smtp.content import crlf_line_ends, has_bare_newline


def naive_bare(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


@pytest.mark.parametrize("data, bare", [
    (b"", False), (b"a", False), (b"a\r\nb\r\n", False), (b"\r\n\r\n", False),
    (b"a\nb", True), (b"a\rb", True), (b"a\n\rb", True),  # as many CR as LF, but never paired
    (b"\r", True), (b"\n", True), (b"a\r\r\n", True), (b"a\r\n\n", True), (b"\n\r\n\r", True),
])
def test_bare_newlines(data: bytes, bare: bool) -> None:
    assert has_bare_newline(data) is bare


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x\r\n"]), max_size=30).map(b"".join))
def test_the_fast_check_agrees_with_counting_everything(data: bytes) -> None:
    assert has_bare_newline(data) == naive_bare(data)
    fixed = crlf_line_ends(data)
    assert not has_bare_newline(fixed)
    assert fixed.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(b"\n", b"")
