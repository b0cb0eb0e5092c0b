"""Property tests: no reply bytes make the milter core raise anything but ProtocolError,
and how the bytes are split never changes the events."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.milter.protocol import (
    NEED_DATA,
    MilterConnection,
    Proto,
    ProtocolError,
    packet,
)

CODES = list(b"acrtdyphmibe+2-qsOZ4f")
PACKETS = st.builds(
    lambda code, data: packet(bytes([code]), data),
    st.sampled_from(CODES),
    st.one_of(st.binary(max_size=40), st.just(b"X\0v\0"), st.just(struct.pack(">I", 1) + b"X\0v\0"),
              st.just(b"550 5.7.1 no\0"), st.just(b"<a@b>\0")),
)


def _at_end_of_message() -> MilterConnection:
    conn = MilterConnection()
    conn.negotiate()
    conn.receive_data(packet(b"O", struct.pack(">III", 6, 0x1FF, Proto.SKIP)))
    conn.next_event()
    conn.end_of_message()
    return conn


def _events(data: bytes, cuts: list[int]) -> list:
    conn = _at_end_of_message()
    events: list = []
    pos = 0
    try:
        for cut in cuts + [len(data)]:
            conn.receive_data(data[pos : pos + cut])
            pos += cut
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
    except ProtocolError as exc:
        events.append(("error", str(exc)))
    return events


@settings(max_examples=300, deadline=None)
@given(st.lists(PACKETS, max_size=8), st.binary(max_size=20),
       st.lists(st.integers(min_value=1, max_value=50), max_size=20))
def test_replies_in_any_split_give_the_same_events_or_a_protocol_error(packets, junk, cuts):
    data = b"".join(packets) + junk
    whole = _events(data, [])
    assert _events(data, cuts) == whole
