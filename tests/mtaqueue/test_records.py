"""Envelope records: the `warned` field (a delay notice was sent) and records written before it;
times no spool index can hold are corrupt."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from mtaqueue import records
from mtaqueue.ids import MessageId
from mtaqueue.records import CorruptRecord, Envelope, Recipient


def envelope(**fields: object) -> Envelope:
    return Envelope(MessageId("0065F2C1A2B3C4D5E6F70A1B2"), "a@x.test", [Recipient("b@y.test", ("DELAY",))],
                    10, 1e9, 1e9, **fields)  # type: ignore[arg-type]


def test_warned_round_trips() -> None:
    for warned in (False, True):
        assert records.decode(records.encode(envelope(warned=warned))).warned is warned


def test_a_record_written_before_the_field_decodes_as_not_warned() -> None:
    old = msgpack.unpackb(records.encode(envelope()))
    del old["W"]
    assert records.decode(msgpack.packb(old)) == envelope()


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_warned_of_another_type_is_a_corrupt_record(value: object) -> None:
    damaged = {**msgpack.unpackb(records.encode(envelope())), "W": value}
    with pytest.raises(CorruptRecord, match="warned"):
        records.decode(msgpack.packb(damaged))


@pytest.mark.parametrize("field", ["next_attempt", "arrival"])
@pytest.mark.parametrize("value", [1e300, float("inf"), float("nan"), -1.0])
def test_a_time_no_spool_index_can_hold_is_a_corrupt_record(field: str, value: float) -> None:
    # One flipped bit in a float's exponent: the record decodes, but its due key cannot be
    # packed (struct.error in the index); it must be reported as corrupt instead.
    with pytest.raises(CorruptRecord, match=field):
        records.decode(records.encode(dataclasses.replace(envelope(), **{field: value})))
