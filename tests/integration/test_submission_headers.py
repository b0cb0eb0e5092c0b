"""Submission hygiene against a real `mta serve`: Date and Message-ID are added to mail from
user agents (submission, smtps, or any authenticated client) that lack them, never to mail
relayed on port 25; the spool holds the message as it will go out."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from pathlib import Path

import pytest

from tests.integration.conftest import SmtpClient, queued_id, split_received
from tests.integration.test_security import UNTRUSTED, secure_server
from tests.integration.tlscerts import Pki, make_pki

pytestmark = pytest.mark.integration

BARE = b"From: alice@x.test\r\nSubject: no date, no id\r\n\r\nhello\r\n"
COMPLETE = b"From: alice@x.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <own@x.test>\r\n\r\nhello\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def test_date_and_message_id_are_added_for_user_agents_only(mta_server, tmp_path: Path, pki: Pki) -> None:
    # Port 25 offers AUTH too (after STARTTLS): an authenticated client there is a user agent.
    server, ports = secure_server(mta_server, tmp_path, pki, smtp_options="auth = true\n")

    async def send(port: int, data: bytes, *, smtps: bool = False, starttls: bool = False,
                   login: bool = False, source: str | None = None) -> str:
        client = await SmtpClient.connect(port, source=source, tls=pki.client_context() if smtps else None)
        try:
            if starttls:
                await client.starttls(pki.client_context())
            if login:
                assert (await client.auth_plain("alice", "correct horse")).code == 235
            msgid = queued_id(await client.send_mail("alice@x.test", ["bob@local.test"], data))
            assert msgid is not None
            return msgid
        finally:
            await client.close()

    sent = {
        "relayed": asyncio.run(send(server.port, BARE, source=UNTRUSTED)),
        "relayed_tls": asyncio.run(send(server.port, BARE, starttls=True)),
        "smtp_auth": asyncio.run(send(server.port, BARE, starttls=True, login=True)),
        "submission": asyncio.run(send(ports["submission"], BARE, starttls=True, login=True)),
        "smtps": asyncio.run(send(ports["smtps"], BARE, smtps=True, login=True)),
        "complete": asyncio.run(send(ports["submission"], COMPLETE, starttls=True, login=True)),
    }
    stored = {name: split_received(server.queue_body(msgid))[1] for name, msgid in sent.items()}
    assert stored["relayed"] == BARE and stored["relayed_tls"] == BARE  # port 25 relayed mail: untouched
    assert stored["complete"] == COMPLETE
    for name in ("smtp_auth", "submission", "smtps"):
        content = stored[name]
        head, body = content.split(b"\r\n\r\n", 1)
        assert head.startswith(b"From: alice@x.test\r\nSubject: no date, no id\r\nDate: ") and body == b"hello\r\n"
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert parsed["Message-ID"] == f"<{sent[name]}@mx.test>"  # our host name, unique per message
        assert parsed["Date"].datetime is not None
        assert re.fullmatch(rb"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", head.split(b"\r\n")[2])
