"""A full spool: 452 4.3.1, never a 250 for what was not stored; room comes back after deletes.

[queue] max_size_bytes = 1 MiB (the minimum) and 20 KiB messages: the limit is hit
after about 50. LMDB is copy-on-write and reuses freed pages only once no reader holds
an older snapshot, so the cycle test also shows no snapshot is left open anywhere.
"""

from __future__ import annotations

import base64
import os
import smtplib
from collections.abc import Callable

import pytest

from tests.integration.conftest import MIB, MtaServer, split_received

pytestmark = pytest.mark.integration

MESSAGE_BYTES = 20 * 1024
MAX_TRIES = 200
CYCLES = 20  # x ~1.2 MiB of pages each: more than the 18 MiB map unless freed pages are reused


def message(n: int) -> bytes:
    head = f"Message-ID: <{n}.{os.getpid()}@mapfull.test>\r\nSubject: fill {n}\r\n\r\n".encode()
    text = base64.b64encode(os.urandom((MESSAGE_BYTES - len(head)) * 3 // 4))
    return head + b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + b"\r\n"


def send(smtp: smtplib.SMTP, n: int) -> tuple[int, str, bytes]:
    """One transaction: (final reply code, its text, the message sent)."""
    data = message(n)
    assert smtp.mail(f"s{n}@client.test")[0] == 250
    assert smtp.rcpt(f"r{n}@local.test")[0] == 250
    code, text = smtp.data(data)
    return code, text.decode(), data


def fill(smtp: smtplib.SMTP, first: int, acked: dict[str, bytes]) -> str:
    """Send until the queue is full; record each 250 in `acked`; the 452's text."""
    for n in range(first, first + MAX_TRIES):
        code, text, data = send(smtp, n)
        if code != 250:
            assert code == 452 and text.startswith("4.3.1 "), (code, text)
            return text
        acked[text.rsplit(" ", 1)[-1]] = data
    raise AssertionError(f"no 452 after {MAX_TRIES} messages of {MESSAGE_BYTES} bytes into a 1 MiB queue")


def check_stored(server: MtaServer, acked: dict[str, bytes]) -> None:
    """Exactly the acknowledged messages are stored, each whole."""
    listing = {e["id"]: e for e in server.queue_list()}
    assert listing.keys() == acked.keys()
    snap = server.spool_snapshot()
    assert snap.problems() == []
    for qid, data in acked.items():
        header, rest = split_received(snap.bodies[qid])
        assert rest == data, qid
        assert f" id {qid}".encode() in header
        assert listing[qid]["size"] == len(snap.bodies[qid])
    some = sorted(acked)[:3]
    assert [server.queue_body(qid) for qid in some] == [snap.bodies[qid] for qid in some]


def test_full_queue_answers_452_and_recovers_after_deletes(mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server(queue={"max_size_bytes": MIB})
    acked: dict[str, bytes] = {}
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        text = fill(smtp, 0, acked)
        assert "insufficient system storage" in text
        assert 40 <= len(acked) <= 52, len(acked)  # 1 MiB / (20 KiB + Received + envelope)

        # The session goes on: the transaction was reset, the connection is usable.
        assert smtp.noop()[0] == 250
        assert smtp.rset()[0] == 250
        assert smtp.mail("again@client.test")[0] == 250
        assert smtp.rset()[0] == 250

        # A new session is served too, and refused the same way.
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="other.test", timeout=30) as other:
            assert other.ehlo()[0] == 250
            code, text, _ = send(other, 1000)
            assert (code, text[:6]) == (452, "4.3.1 ")
            assert other.noop()[0] == 250

        check_stored(server, acked)

        # Make room: delete half; new mail is taken again, the rest is untouched.
        gone = sorted(acked)[::2]
        done = server.queue_delete(*gone)
        assert done.returncode == 0, done
        assert done.stdout.decode().startswith(f"delete: {len(gone)} message(s)")
        for qid in gone:
            del acked[qid]
        check_stored(server, acked)
        before = dict(acked)
        for n in range(2000, 2005):
            code, text, data = send(smtp, n)
            assert code == 250, text
            acked[text.rsplit(" ", 1)[-1]] = data
        check_stored(server, acked)
        assert all(acked[qid] == data for qid, data in before.items())
    assert server.stop() == 0


def test_fill_and_empty_cycles_reuse_freed_pages(mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server(queue={"max_size_bytes": MIB})
    counts = []
    for cycle in range(CYCLES):  # a session per cycle: each 452 counts toward [limits] max_errors
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30) as smtp:
            assert smtp.ehlo()[0] == 250
            acked: dict[str, bytes] = {}
            fill(smtp, cycle * MAX_TRIES, acked)
        counts.append(len(acked))
        assert server.queue_delete(*acked).returncode == 0
    assert server.queue_list() == []
    assert min(counts) >= 40, counts  # the 20th fill takes as much as the first
    data_file = os.path.getsize(server.spool / "data.mdb")
    assert data_file < 6 * MIB, f"data.mdb grew to {data_file} bytes: freed pages are not reused"
    assert server.stop() == 0
