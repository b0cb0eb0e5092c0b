"""The queue backend contract, run against every implementation."""

from collections.abc import Iterator

import pytest

from mtaqueue import Envelope, NewMessage, QueueFull, Recipient, new_id
from mtaqueue.backend import QueueBackend, QueueIOError
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.backend_memory import MemoryBackend
from mtaqueue.records import decode, encode

MIB = 1024 * 1024


def message(body: bytes = b"Subject: x\r\n\r\nhi\r\n", when: float = 1000.0, rcpts: int = 1) -> NewMessage:
    envelope = Envelope(
        id=new_id(when), sender="a@example.org",
        recipients=[Recipient(f"u{i}@local.test", ("SUCCESS", "FAILURE"), "rfc822;u@x") for i in range(rcpts)],
        size=len(body), arrival=when, next_attempt=when, ret="HDRS", envid="E1", body_type="8BITMIME",
        client={"ip": "192.0.2.1", "helo": "c.test"},
    )
    return NewMessage(envelope, body)


@pytest.fixture(params=["memory", "lmdb"])
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[QueueBackend]:
    b: QueueBackend = MemoryBackend(max_bytes=MIB) if request.param == "memory" else LmdbBackend(str(tmp_path / "q"), MIB)
    yield b
    b.close()


def test_commit_then_read_back(backend: QueueBackend) -> None:
    m = message(rcpts=3)
    backend.commit([m])
    assert backend.envelope(m.envelope.id) == m.envelope
    assert backend.body(m.envelope.id) == m.body
    assert [e.id for e in backend.envelopes()] == [m.envelope.id]
    assert backend.stats().messages == 1


def test_a_batch_is_all_or_nothing(backend: QueueBackend) -> None:
    first = message()
    backend.commit([first])
    clash = message()
    clash.envelope.id = first.envelope.id
    with pytest.raises(QueueIOError):
        backend.commit([message(), clash])
    assert [e.id for e in backend.envelopes()] == [first.envelope.id]


def test_full_raises_queue_full_and_keeps_what_was_stored(backend: QueueBackend) -> None:
    kept = []
    with pytest.raises(QueueFull):
        for _ in range(200):
            m = message(body=b"x" * 20_000)
            backend.commit([m])
            kept.append(m)
    assert kept, "nothing fitted at all"
    for m in kept:
        assert backend.body(m.envelope.id) == m.body
    assert backend.delete([m.envelope.id for m in kept[: len(kept) // 2]]) == len(kept) // 2
    backend.commit([message(body=b"y" * 20_000)])  # room again


def test_delete_and_due_order(backend: QueueBackend) -> None:
    late, early, mid = message(when=3000.0), message(when=1000.0), message(when=2000.0)
    backend.commit([late, early, mid])
    assert backend.due(now=2500.0, limit=10) == [early.envelope.id, mid.envelope.id]
    assert backend.due(now=9999.0, limit=1) == [early.envelope.id]
    assert backend.delete([mid.envelope.id, mid.envelope.id]) == 1
    assert backend.due(now=9999.0, limit=10) == [early.envelope.id, late.envelope.id]
    assert backend.envelope(mid.envelope.id) is None and backend.body(mid.envelope.id) is None
    assert backend.message(mid.envelope.id) == (None, None)
    assert backend.message(early.envelope.id) == (early.envelope, early.body)


def test_envelopes_iterates_in_id_order_across_batches(tmp_path) -> None:
    b = LmdbBackend(str(tmp_path / "q"), 64 * MIB)
    msgs = [message(body=b"b", when=1000.0 + i) for i in range(2500)]
    b.commit(msgs)
    assert [e.id for e in b.envelopes()] == sorted(m.envelope.id for m in msgs)
    b.close()


def test_lmdb_survives_reopen(tmp_path) -> None:
    m = message()
    b = LmdbBackend(str(tmp_path / "q"), MIB)
    b.commit([m])
    b.close()
    b = LmdbBackend(str(tmp_path / "q"), MIB)
    assert b.body(m.envelope.id) == m.body
    b.close()


def test_envelope_codec_round_trips() -> None:
    e = message(rcpts=2).envelope
    e.recipients[1].state, e.recipients[1].last_reply, e.recipients[1].notify = "deferred", "451 4.3.0 x", None
    assert decode(encode(e)) == e


def test_apply_moves_due_deletes_and_adds_in_one_transaction(backend: QueueBackend) -> None:
    a, b = message(when=1000.0), message(when=1001.0)
    backend.commit([a, b])
    a.envelope.next_attempt = 5000.0
    a.envelope.recipients[0].state, a.envelope.recipients[0].last_reply = "deferred", "451 4.3.0 later"
    bounce = message(when=1002.0)
    bounce.envelope.sender = ""
    backend.apply(update=[a.envelope], delete=[b.envelope.id], add=[bounce])
    assert backend.envelope(a.envelope.id) == a.envelope
    assert backend.envelope(b.envelope.id) is None
    assert backend.due(now=2000.0, limit=10) == [bounce.envelope.id]
    assert backend.due(now=6000.0, limit=10) == [bounce.envelope.id, a.envelope.id]
    before = backend.stats().used_bytes
    backend.apply(delete=[a.envelope.id, bounce.envelope.id])
    assert backend.stats().messages == 0 and backend.stats().used_bytes == 0 < before


def test_bounces_are_added_even_when_the_queue_is_full(backend: QueueBackend) -> None:
    with pytest.raises(QueueFull):
        for _ in range(200):
            backend.commit([message(body=b"x" * 20_000)])
    backend.apply(add=[message(body=b"bounce" * 100)])  # never refused
