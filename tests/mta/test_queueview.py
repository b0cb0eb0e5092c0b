"""What operators see (mta/queueview.py): the listing written piece by piece is the
listing written whole, as `mta queue list` always printed it."""

from __future__ import annotations

import json

import pytest

from mta import queueview
from tests.mta.queuefill import message

T0 = 1_700_000_000.0


@pytest.mark.parametrize("count", [0, 1, 3])
def test_the_streamed_json_array_is_byte_for_byte_the_whole_one(count: int) -> None:
    entries = [queueview.envelope_json(message(T0 + n, n, [("a@x.test", "ready"), ("b@y.test", "deferred")]).envelope)
               for n in range(count)]
    pieces = list(queueview.json_array(iter(entries)))
    assert "".join(pieces) == json.dumps(entries, indent=1)
    assert len(pieces) == count + 1  # one per message, then the end: a writer never holds more than one


def test_a_message_in_the_text_listing() -> None:
    m = message(T0, 1, [("a@x.test", "deferred"), ("b@y.test", "ready")], next_attempt=T0 + 600)
    m.envelope.recipients[0].last_reply = "451 4.7.1 try later"
    m.envelope.recipients[0].attempts = 2
    assert queueview.text_lines(queueview.envelope_json(m.envelope)) == [
        "60A24181E400000000001  2023-11-14T22:13:20         20  <s@client.test>  next attempt 2023-11-14T22:23:20",
        " " * 55 + "  deferred  <a@x.test>  attempts=2",
        " " * 66 + "451 4.7.1 try later",
        " " * 55 + "  ready     <b@y.test>  attempts=0",
    ]


def test_the_domain_summary_leaves_out_states_and_domains_with_none() -> None:
    counts = {"y.test": {"ready": 0, "deferred": 3, "held": 1}, "x.test": {"ready": 2, "deferred": 0, "held": 0},
              "gone.test": {"ready": 0, "deferred": 0, "held": 0}}
    assert queueview.domain_summary(counts) == {"x.test": {"ready": 2}, "y.test": {"deferred": 3, "held": 1}}
    assert list(queueview.domain_summary(counts)) == ["x.test", "y.test"]
