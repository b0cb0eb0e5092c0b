"""The open-relay matrix: an untrusted, unauthenticated client never gets mail relayed.

mta serves local.test (Maildir, one real mailbox: user@local.test) and sends every
other domain to a sink through [delivery] smarthost. mynetworks is 127.0.0.1/32 only;
the attacker connects from 127.0.0.9 and says HELO with our own host name. Every
address form known to trick relays (percent hack, quoted local parts, source routes,
bang paths, address literals, trailing dots, case, look-alike subdomains) is tried
from the null sender, a foreign sender and a local sender. Each must be refused with
a 5xx, or accepted only when it is the real local mailbox; then nothing may reach the
sink, while a trusted client's message does (the sink is proven reachable).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.conftest import SmtpClient, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, mailbox, maildir_messages

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.9"
SENDERS = ["", "someone@foreign.test", "user@local.test"]
# (recipient path as sent, accepted?) -- accepted only when it is the real mailbox.
FORMS = [
    ("<u@foreign.test>", False),
    ("<u%foreign.test@local.test>", False),
    ('<"u@foreign.test">', False),
    ("<u@foreign.test@local.test>", False),
    ('<"u@foreign.test"@local.test>', False),
    ("<@local.test:u@foreign.test>", False),
    ("<foreign.test!u>", False),
    ("<foreign.test!u@local.test>", False),
    ("<u@[127.0.0.2]>", False),
    ("<u@[IPv6:::1]>", False),
    ("<u@foreign.test.>", False),
    ("<U@FOREIGN.TEST>", False),
    ("<u@local.test.foreign.test>", False),
    ("<u@foreign.test.local.test>", False),
    ("<user%foreign.test@local.test>", False),
    ("<user@local.test>", True),
    ("<USER@LOCAL.TEST>", True),
    ("<user@local.test.>", False),  # RFC 5321 has no trailing dot: a syntax error
]


def test_no_address_form_gets_an_untrusted_client_relayed(mta_server, tmp_path: Path) -> None:
    box = mailbox(tmp_path, "local.test", "user")
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, routes={}, delivery={"smarthost": f"127.0.0.2:{sink.port}"})

        async def attack() -> list[tuple[str, str, str]]:
            results = []
            for sender in SENDERS:
                client = await SmtpClient.connect(server.port, helo="mx.test", source=ATTACKER)
                for rcpt, _ in FORMS:
                    mail = await client.command(f"MAIL FROM:<{sender}>")
                    assert mail.code == 250, (sender, mail)
                    reply = await client.command(f"RCPT TO:{rcpt}")
                    if reply.code == 250:  # finish the transaction: a relay must not happen
                        data = await client.command("DATA")
                        assert data.code == 354, data
                        done = await client.command(f"Subject: relay test\r\n\r\n{rcpt}\r\n.")
                        assert done.code == 250, done
                    else:
                        await client.command("RSET")
                    results.append((sender, rcpt, str(reply)))
                await client.close()
            return results

        results = asyncio.run(attack())
        for sender, rcpt, reply in results:
            accepted = dict(FORMS)[rcpt]
            if accepted:
                assert reply.startswith("250 2.1.5"), (sender, rcpt, reply)
            else:
                assert reply[:1] == "5", (sender, rcpt, reply)

        # The positive control: the trusted client relays, so the sink is reachable.
        async def trusted() -> str:
            client = await SmtpClient.connect(server.port)
            reply = await client.send_mail("someone@local.test", ["friend@foreign.test"], b"Subject: ok\r\n\r\nok\r\n")
            await client.close()
            return str(reply)

        assert asyncio.run(trusted()).startswith("250 2.0.0")
        [relayed] = sink.wait_for_messages(1, timeout=20)
        assert relayed.recipients == ["friend@foreign.test"]
        expected_local = len(SENDERS) * sum(1 for _, ok in FORMS if ok)
        wait_until(lambda: len(maildir_messages(box)) == expected_local, 20, "local deliveries", server)
        wait_until(lambda: not server.queue_list(), 20, "an empty queue", server)
        assert len(sink.messages) == 1  # nothing from the attacker reached the sink
