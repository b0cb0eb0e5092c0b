"""The queue backend contract, run against every implementation."""

import concurrent.futures
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


def test_begin_commit_is_commit_begun_and_ended_in_one_thread_added_to_in_another(backend: QueueBackend) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as writer:  # one thread: LMDB's write lock is its
        pending = writer.submit(backend.begin_commit).result()
        kept = [message(rcpts=2), message()]
        pending.add(kept)  # this thread: the event loop's, in the committer
        writer.submit(pending.commit).result()
        assert {e.id for e in backend.envelopes()} == {m.envelope.id for m in kept}
        assert backend.totals()["ready"] == 3

        dropped = writer.submit(backend.begin_commit).result()
        dropped.add([message()])
        writer.submit(dropped.abort).result()
        assert {e.id for e in backend.envelopes()} == {m.envelope.id for m in kept}

        full = writer.submit(backend.begin_commit).result()
        with pytest.raises(QueueFull):
            full.add([message(body=b"x" * (2 * MIB))])
            writer.submit(full.commit).result()  # (the memory backend stores, and checks, here)
        writer.submit(full.abort).result()
        backend.commit([message()])  # the write lock was given back
    assert backend.stats().messages == 3


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
    assert b.envelopes_of([m.envelope.id for m in reversed(msgs)]) == [m.envelope for m in reversed(msgs)]
    b.close()


def test_envelopes_of_gives_each_in_the_order_asked_none_for_one_not_stored(backend: QueueBackend) -> None:
    first, gone, last = message(when=1000.0), message(when=2000.0), message(when=3000.0)
    backend.commit([first, gone, last])
    backend.delete([gone.envelope.id])
    never = new_id(4000.0)
    assert backend.envelopes_of([last.envelope.id, gone.envelope.id, first.envelope.id, never, last.envelope.id]) == [
        last.envelope, None, first.envelope, None, last.envelope]
    assert backend.envelopes_of([]) == []


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


# --- format 2: the due rule, counts, bydest and the views ---------------------------------

def mail(when: float, *rcpts: tuple[str, str]) -> NewMessage:
    """A message arrived (and due) at `when` with recipients (address, state)."""
    m = message(when=when)
    m.envelope.recipients = [Recipient(address, None, None, state) for address, state in rcpts]
    return m


def test_due_holds_only_messages_with_a_ready_or_deferred_recipient(backend: QueueBackend) -> None:
    ready = mail(1000.0, ("a@x.test", "ready"), ("b@x.test", "delivered"))
    deferred = mail(1001.0, ("a@y.test", "deferred"), ("b@y.test", "held"))
    held = mail(1002.0, ("a@x.test", "held"), ("b@x.test", "bounced"))
    done = mail(1003.0, ("a@x.test", "delivered"))
    backend.commit([ready, deferred, held, done])
    assert backend.due(9999.0, 10) == [ready.envelope.id, deferred.envelope.id]
    deferred.envelope.recipients[0].state = "held"  # held-only now: leaves the index
    held.envelope.recipients[0].state = "ready"  # released: enters it
    held.envelope.next_attempt = 1500.0
    backend.apply(update=[deferred.envelope, held.envelope])
    assert backend.due(9999.0, 10) == [ready.envelope.id, held.envelope.id]
    assert backend.due(1499.0, 10) == [ready.envelope.id]


def test_due_from_next_due_and_due_floor_walk_the_index_from_a_mark(backend: QueueBackend) -> None:
    msgs = [mail(1000.0 + i, (f"u@d{i}.test", "ready")) for i in range(5)]
    backend.commit(msgs)
    keys = [backend.due_key(m.envelope) for m in msgs]
    assert keys == sorted(keys) and keys[0][:8] == backend.due_floor(1000.0)
    assert backend.due_from(b"", 1002.0, 10) == [(k, m.envelope.id) for k, m in zip(keys[:3], msgs)]
    assert backend.due_from(keys[1], 1003.0, 2) == [(keys[1], msgs[1].envelope.id), (keys[2], msgs[2].envelope.id)]
    assert backend.due_from(backend.due_floor(1002.5), 9999.0, 10) == [(k, m.envelope.id) for k, m in
                                                                        zip(keys[3:], msgs[3:])]
    assert backend.due_from(backend.due_floor(1004.5), 9999.0, 10) == []
    assert backend.next_due(b"") == 1000.0
    assert backend.next_due(backend.due_floor(1001.5)) == 1002.0
    assert backend.next_due(backend.due_floor(1004.5)) is None


def test_totals_and_destination_counts_follow_every_write(backend: QueueBackend) -> None:
    assert backend.totals() == {"ready": 0, "deferred": 0, "held": 0, "messages": 0}
    assert backend.destination_counts() == {}
    a = mail(1000.0, ("a@X.test.", "ready"), ("b@x.test", "ready"), ("c@y.test", "ready"), ("d@", "ready"))
    b = mail(1001.0, ("a@y.test", "deferred"), ("b@z.test", "held"), ("c@z.test", "delivered"))
    backend.commit([a, b])
    assert backend.totals() == {"ready": 4, "deferred": 1, "held": 1, "messages": 2}
    assert backend.destination_counts() == {
        "x.test": {"ready": 2, "deferred": 0, "held": 0}, "y.test": {"ready": 1, "deferred": 1, "held": 0},
        "z.test": {"ready": 0, "deferred": 0, "held": 1}, "localhost": {"ready": 1, "deferred": 0, "held": 0}}
    for r in a.envelope.recipients[:2]:
        r.state = "deferred"
    a.envelope.recipients[2].state = "delivered"
    a.envelope.recipients[3].state = "bounced"
    bounce = mail(1002.0, ("sender@y.test", "ready"))
    backend.apply(update=[a.envelope], delete=[b.envelope.id], add=[bounce])
    assert backend.totals() == {"ready": 1, "deferred": 2, "held": 0, "messages": 2}
    assert backend.destination_counts() == {"x.test": {"ready": 0, "deferred": 2, "held": 0},
                                            "y.test": {"ready": 1, "deferred": 0, "held": 0}}
    backend.delete([a.envelope.id, bounce.envelope.id])
    assert backend.totals() == {"ready": 0, "deferred": 0, "held": 0, "messages": 0}
    assert backend.destination_counts() == {}


def test_page_and_ids_go_in_arrival_order_from_a_cursor(backend: QueueBackend) -> None:
    msgs = [mail(1000.0 + i, (f"u@d{i % 3}.test", "deferred")) for i in range(10)]
    backend.commit(list(reversed(msgs)))
    ids = [m.envelope.id for m in msgs]
    assert backend.oldest_arrival() == 1000.0
    assert [e.id for e in backend.page(None, 4)] == ids[:4]
    assert backend.page(None, 1)[0] == msgs[0].envelope
    assert [e.id for e in backend.page(ids[3], 4)] == ids[4:8]
    assert [e.id for e in backend.page(ids[7], 4)] == ids[8:]
    assert backend.page(ids[9], 4) == [] and backend.ids(ids[9], 4) == []
    assert backend.ids(None, 100) == ids and backend.ids(ids[0], 2) == ids[1:3]
    backend.delete(ids[:2])
    assert backend.oldest_arrival() == 1002.0


def test_page_and_ids_with_a_domain_see_only_messages_queued_there(backend: QueueBackend) -> None:
    here = [mail(1000.0 + i, ("a@other.test", "ready"), ("b@Here.test", state))
            for i, state in enumerate(["ready", "deferred", "held", "ready", "deferred"])]
    gone = mail(999.0, ("a@here.test", "delivered"), ("b@other.test", "deferred"))
    backend.commit([gone, *here])
    ids = [m.envelope.id for m in here]
    assert backend.ids(None, 100, domain="here.test") == ids
    assert backend.ids(None, 100, domain="HERE.test.") == ids  # the destination rule
    assert [e.id for e in backend.page(None, 2, domain="here.test")] == ids[:2]
    assert [e.id for e in backend.page(ids[1], 2, domain="here.test")] == ids[2:4]
    assert backend.page(ids[3], 10, domain="here.test") == [here[4].envelope]
    assert backend.ids(None, 100, domain="other.test") == [gone.envelope.id, *ids]
    assert backend.ids(None, 100, domain="nowhere.test") == []
    here[0].envelope.recipients[1].state = "delivered"
    backend.apply(update=[here[0].envelope], delete=[ids[1]])
    assert backend.ids(None, 100, domain="here.test") == ids[2:]
    assert sorted(backend.by_destination()) == sorted(
        [("other.test", gone.envelope.id)] + [("other.test", i) for i in ids if i != ids[1]]
        + [("here.test", i) for i in ids[2:]])


def test_by_destination_is_in_key_order(backend: QueueBackend) -> None:
    msgs = [mail(1000.0 + i, (f"u@{d}", "deferred")) for i, d in enumerate(["b.test", "a.test.x", "a.test", "b.test"])]
    backend.commit(msgs)
    assert list(backend.by_destination()) == [("a.test", msgs[2].envelope.id), ("a.test.x", msgs[1].envelope.id),
                                              ("b.test", msgs[0].envelope.id), ("b.test", msgs[3].envelope.id)]


def test_lmdb_pages_and_walks_bydest_across_batches(tmp_path) -> None:
    b = LmdbBackend(str(tmp_path / "q"), 64 * MIB)
    msgs = [mail(1000.0 + i, ("u@a.test", "deferred"), ("v@b.test", "held")) for i in range(2500)]
    b.commit(msgs)
    ids = [m.envelope.id for m in msgs]
    assert [e.id for e in b.page(None, 2400)] == ids[:2400]
    assert b.ids(ids[10], 2400, domain="b.test") == ids[11:2411]
    assert [e.id for e in b.page(ids[2000], 2400, domain="a.test")] == ids[2001:]
    assert list(b.by_destination()) == [("a.test", i) for i in ids] + [("b.test", i) for i in ids]
    assert b.totals() == {"ready": 0, "deferred": 2500, "held": 2500, "messages": 2500}
    b.close()
