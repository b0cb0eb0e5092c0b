"""SMTP smuggling through a real socket: BDAT content obeys [limits] bare_newline like DATA.

The sans-I/O rules are in tests/mta/smtp/transcripts/smuggling_*.txt; here a real
`mta serve` shows what an operator sees: with "reject" (the default) a BDAT message
with a bare LF gets 550 5.5.2 at BDAT LAST and nothing reaches the spool, while the
same session then queues a clean message; with "normalize" the spool holds CRLF.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.integration.conftest import MtaServer, Reply, SmtpClient, queued_id, split_received

pytestmark = pytest.mark.integration

SMUGGLED = (b"Subject: outer\r\n\r\nhello\n.\nMAIL FROM:<admin@local.test>\r\nRCPT TO:<victim@local.test>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n")
CLEAN = b"Subject: clean\r\n\r\nhello\r\n"


async def _bdat_message(client: SmtpClient, chunks: list[bytes]) -> Reply:
    """MAIL, RCPT, then each chunk as BDAT (the last with LAST): the reply to the last."""
    for line in ("MAIL FROM:<a@client.test>", "RCPT TO:<u@local.test>"):
        reply = await client.command(line)
        assert reply.code == 250, (line, reply)
    for i, chunk in enumerate(chunks):
        last = " LAST" if i == len(chunks) - 1 else ""
        client.writer.write(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
        reply = await client.read_reply()
        if last:
            return reply
        assert reply.code == 250, reply
    raise AssertionError("no chunks")


def test_a_bdat_message_with_a_bare_lf_is_refused_and_nothing_is_queued(
        mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server()

    async def session() -> tuple[Reply, Reply, Reply]:
        client = await SmtpClient.connect(server.port)
        try:
            whole = await _bdat_message(client, [SMUGGLED])
            split = await _bdat_message(client, [b"Subject: split\r\n\r\nhello\r\n.", b"\nevil\r\n"])
            clean = await _bdat_message(client, [CLEAN[:-1], CLEAN[-1:]])  # its last CRLF split by chunks
            return whole, split, clean
        finally:
            await client.close()

    whole, split, clean = asyncio.run(session())
    assert (whole.code, whole.text[:5]) == (550, "5.5.2"), whole
    assert (split.code, split.text[:5]) == (550, "5.5.2"), split
    msgid = queued_id(clean)
    assert msgid is not None, clean
    assert [e["id"] for e in server.queue_list()] == [msgid]  # only the clean message
    snap = server.spool_snapshot()
    assert list(snap.bodies) == [msgid] and snap.problems() == []
    assert split_received(snap.bodies[msgid])[1] == CLEAN


def test_normalize_stores_bdat_content_with_crlf(mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server(limits={"bare_newline": "normalize"})

    async def session() -> Reply:
        client = await SmtpClient.connect(server.port)
        try:
            return await _bdat_message(client, [SMUGGLED[:30], SMUGGLED[30:]])
        finally:
            await client.close()

    msgid = queued_id(asyncio.run(session()))
    assert msgid is not None
    stored = split_received(server.queue_body(msgid))[1]
    assert stored == SMUGGLED.replace(b"\n.\n", b"\r\n.\r\n")
