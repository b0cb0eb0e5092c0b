"""workers/inbound/transferin.py: the X-Mta-Transfer field is read, then removed from what is stored."""

from __future__ import annotations

import pytest

from workers.inbound.transferin import origin, strip

FIELD = b"X-Mta-Transfer: id=66204F527A796350D850A; from=a.test\r\n"
REST = b"Received: from a by a.test\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize(("data", "stored"), [
    (FIELD + REST, REST),
    (b"Received: from b\r\n" + FIELD + REST, b"Received: from b\r\n" + REST),
    (FIELD.replace(b"a.test\r\n", b"a.test\r\n\t\r\n") + REST, REST),  # a folded continuation goes with it
    (FIELD.rstrip(b"\r\n"), b""),  # the field alone, no line break
    (b"Subject: s\r\n\r\n" + FIELD, b"Subject: s\r\n\r\n" + FIELD),  # in the body: not a header field
    (REST, REST),
])
def test_strip_removes_the_field_origin_reads(data: bytes, stored: bytes) -> None:
    assert strip(data) == stored
    assert origin(stored) is None


def test_every_field_goes_and_origin_reads_the_topmost() -> None:
    data = FIELD + FIELD.replace(b"a.test", b"c.test") + REST
    assert origin(data) == ("66204F527A796350D850A", "a.test")
    assert strip(data) == REST


@pytest.mark.parametrize("name", [b"x-mta-transfer", b"X-MTA-TRANSFER", b"x-Mta-tRANSFER"])
def test_the_field_name_is_read_in_any_case(name: bytes) -> None:
    data = FIELD.replace(b"X-Mta-Transfer", name) + REST
    assert origin(data) == ("66204F527A796350D850A", "a.test")
    assert strip(data) == REST
