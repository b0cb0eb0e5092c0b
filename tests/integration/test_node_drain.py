"""`mta node drain|undrain|status` on a real server: /readyz 503, new sessions refused
with 421, an open session finishes its message, delivery goes on; undrain takes
sessions again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.integration.conftest import SmtpClient, queued_id, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_admin_api import _healthy, call
from tests.integration.test_delivery import delivering, message

pytestmark = pytest.mark.integration


def test_drain_refuses_new_sessions_finishes_open_ones_and_delivery_goes_on(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"})
        wait_until(lambda: _healthy(server), 10, "the control process", server)
        assert call(server, "GET", "/readyz")[0] == 200

        async def scenario() -> None:
            open_session = await SmtpClient.connect(server.port)
            assert (await open_session.command("MAIL FROM:<a@client.test>")).code == 250
            drained = await asyncio.to_thread(server.mta, "node", "drain")
            assert b"drained" in drained.stdout
            status, _, body = await asyncio.to_thread(call, server, "GET", "/readyz")
            assert status == 503 and b"drained" in body
            refused = await SmtpClient.connect(server.port, helo=None)
            assert refused.greeting is not None and refused.greeting.code == 421, refused.greeting
            assert refused.greeting.text.startswith("4.3.2")
            await refused.close()
            # the session open before the drain finishes its message, which is delivered
            assert (await open_session.command("RCPT TO:<u@remote.test>")).code == 250
            assert (await open_session.command("DATA")).code == 354
            open_session.writer.write(message(1) + b".\r\n")
            assert queued_id(await open_session.read_reply()) is not None
            await open_session.close()

        asyncio.run(scenario())
        [got] = sink.wait_for_messages(1, timeout=15)
        assert got.recipients == ["u@remote.test"]
        state = json.loads(server.mta("node", "status", "--json").stdout)
        assert state == {"drained": True, "ready": False}

        server.mta("node", "resume")
        assert call(server, "GET", "/readyz")[0] == 200

        async def greeted() -> int:
            client = await SmtpClient.connect(server.port, helo=None)
            assert client.greeting is not None
            code = client.greeting.code
            await client.close()
            return code

        assert asyncio.run(greeted()) == 220
        assert json.loads(server.mta("node", "status", "--json").stdout) == {"drained": False, "ready": True}
        assert b"event=node_drain" in server.log_bytes() and b"event=node_undrain" in server.log_bytes()


def test_node_drain_without_a_running_server_says_so(mta_server) -> None:
    server = mta_server(start=False)
    done = server.mta("node", "drain", check=False)
    assert done.returncode == 1 and b"is it running" in done.stderr
