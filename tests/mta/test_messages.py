"""Typed messages between processes: every kind round-trips; what is not a message of this
build (garbage, a wrong layout, an old untyped frame, a Hello of another version) is a
MessageError, never a KeyError or TypeError in a handler."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import messages
from mta.messages import PROTOCOL_VERSION, MessageError, VersionMismatch

# One of every kind, with fields that exercise the wire form (None, empty and nested
# tuples, a dict, non-ASCII text).
SAMPLES: list[messages.Message] = [
    messages.Hello(PROTOCOL_VERSION, "delivery", 4242, 500),
    messages.Hello(PROTOCOL_VERSION, "child", 7),
    messages.Status("retiring", 12),
    messages.Conn(((3, "127.0.0.1:2525"), (4, "[::1]:25"))),
    messages.Took((3, 4), 13),
    messages.Refused((4,), 13),
    messages.Children(("scheduler#1", "delivery#2")),
    messages.Children(()),
    messages.NodeDrain(True),
    messages.New(("0005F2C1A2B3C4D5E6F70A1B2C",) * 3),
    messages.Open(1, "example.com", 7, "0005F2C1A2B3C4D5E6F70A1B2C", (0, 2)),
    messages.Job(1, 8, "0005F2C1A2B3C4D5E6F70A1B2D", (1,)),
    messages.Close(1),
    messages.Done(1, 7, ((0, 250, "2.0.0", "ok"), (2, 550, "5.1.1", "unknown user ünïcode")),
                  "mx.example.com[192.0.2.1]:25"),
    messages.Done(1, 8, (), failed=True, skipped=(1,)),
    messages.Done(2, 9, ((0, 250, "2.0.0", "ok"),), None, handoff="delivered"),
    messages.Closed(1, False),
    messages.QueueCommand("hold", ("0005F2C1A2B3C4D5E6F70A1B2C",)),
    messages.QueueCommand("delete", domain="example.com"),
    messages.QueueCommand("release", all=True),
    messages.CommandResult(2),
    messages.CommandProgress(1000, 0),
    messages.ActiveQuery(),
    messages.ActiveJobs({"0005F2C1A2B3C4D5E6F70A1B2C": (0, 1)}),
    messages.GaugeQuery(),
    messages.DestinationGauges((("example.com", 3, 1, 2, 1, 5),), (4, 0, 7)),
]


def wire(*fields: object) -> bytes:
    return msgpack.packb(fields)


def test_every_kind_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(typing.get_args(messages.Message))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_kind_round_trips_as_the_same_frozen_value(message: messages.Message) -> None:
    data = messages.encode(message)
    back = messages.decode(data)
    assert back == message and type(back) is type(message)
    assert messages.encode(back) == data
    assert not hasattr(back, "__dict__")  # slots
    for field in dataclasses.fields(message):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(back, field.name, None)


def test_the_job_path_is_smaller_on_the_wire_than_the_old_maps() -> None:
    job = messages.Job(123, 4567, "0123456789ABCDEF01234", (0,))
    old = {"t": "job", "sid": 123, "job": {"id": 4567, "msgid": "0123456789ABCDEF01234", "rcpts": [0]}}
    assert len(messages.encode(job)) < len(msgpack.packb(old)) * 0.6


@pytest.mark.parametrize(("data", "says"), [
    (b"", "not msgpack"),
    (b"\xc1", "not msgpack"),  # a byte msgpack never uses
    (wire(8, 1, 2)[:-1], "not msgpack"),  # cut short
    (wire(9, 1) + b"\x00", "not msgpack"),  # something after the message
    (msgpack.packb({"t": "done", "sid": 1, "job": 2, "replies": []}), "an untyped 'done' frame"),
    (msgpack.packb({"x": 1}), "not a message"),
    (msgpack.packb(5), "not a message"),
    (msgpack.packb([]), "not a message"),
    (wire("job", 1), "not a message"),
    (wire(99, 1), "unknown message tag 99"),
    (wire(8, 1, 2, "id"), "a Job has 4 fields, not 3"),
    (wire(8, 1, 2, "id", [0], 5), "a Job has 4 fields, not 5"),
    (wire(8, "1", 2, "id", [0]), "wrong type"),  # sid as text
    (wire(8, 1, 2, b"id", [0]), "wrong type"),  # msgid as bytes
    (wire(8, 1, 2, "id", [0, "1"]), "wrong type"),  # a recipient index as text
    (wire(8, 1, 2, "id", 0), "wrong type"),  # rcpts not a list
    (wire(1, "ready", True), "wrong type"),  # a bool for an int
    (wire(11, 1, 1), "wrong type"),  # an int for a bool
    (wire(10, 1, 2, [[0, 250, "2.0.0"]], None, False, [], "relayed"), "wrong type"),  # a reply of 3 fields
    (wire(10, 1, 2, [[0, "250", "2.0.0", "ok"]], None, False, [], "relayed"), "wrong type"),
    (wire(10, 1, 2, [], 5, False, [], "relayed"), "wrong type"),  # remote: text or nil
    (wire(10, 1, 2, [], None, False, [], "expanded"), "wrong type"),  # not a handoff
    (wire(10, 1, 2, [], None, False, []), "a Done has 7 fields, not 6"),  # a build before handoff
    (wire(12, "purge", [], None, False), "wrong type"),  # not an operation
    (wire(15, {"id": [0, "x"]}), "wrong type"),
    (wire(17, [["d", 1, 2, 3, 4]], [0, 0, 0]), "wrong type"),  # a gauge row of 5
])
def test_what_is_not_a_message_is_a_message_error(data: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        messages.decode(data)


@pytest.mark.parametrize("hello", [
    wire(0, PROTOCOL_VERSION + 1, "delivery", 4242, 500),
    wire(0, PROTOCOL_VERSION + 1, "delivery", 4242, 500, "a field a later build added"),
    wire(0, 0, "inbound", 17, 0),
    wire(0, "1", "cli", 9, 0),
])
def test_a_hello_of_another_version_is_refused_whatever_its_layout(hello: bytes) -> None:
    with pytest.raises(VersionMismatch, match=f"this build {PROTOCOL_VERSION}") as caught:
        messages.decode(hello)
    assert caught.value.version == msgpack.unpackb(hello)[1] and caught.value.event == "protocol_mismatch"
    assert "pid" in str(caught.value)


def test_this_builds_hello_carries_its_version() -> None:
    hello = messages.hello("delivery", 500)
    assert hello.version == PROTOCOL_VERSION and hello.capacity == 500
    assert messages.decode(messages.encode(hello)) == hello


def test_an_unexpected_kind_is_a_message_error_naming_it() -> None:
    error = messages.unexpected(messages.Close(3), "from the master")
    assert isinstance(error, MessageError) and str(error) == "unexpected Close from the master"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_message_error(data: bytes) -> None:
    try:
        message = messages.decode(data)
    except MessageError:
        return
    assert messages.decode(messages.encode(message)) == message


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 19), st.lists(_values, max_size=7))
def test_any_tag_with_any_fields_decodes_or_raises_message_error(tag: int, fields: list[object]) -> None:
    try:
        message = messages.decode(wire(tag, *fields))
    except MessageError:
        return
    assert messages.decode(messages.encode(message)) == message  # well typed: it encodes again
