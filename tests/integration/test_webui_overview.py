"""GET /api/overview: the web UI's live figures move with the mail the test sends.

Real `mta serve` delivering to a real SMTP sink that accepts, defers (450) and refuses
(550) by recipient; the figures are read as the page reads them, with its session cookie.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, mailbox, message, send_all
from tests.integration.webclient import call, login, wait_for_control

pytestmark = pytest.mark.integration

TOKEN = "configured-token-0123456789"


def overview(server: MtaServer, headers: dict[str, str]) -> dict[str, Any]:
    answer = call(server, "GET", "/api/overview", headers=headers)
    assert answer.status == 200, answer
    return answer.json()


def summed(figures: dict[str, Any], name: str) -> int:
    return sum(row[name] for row in figures["minutes"])


def test_the_overview_counts_what_was_accepted_delivered_deferred_and_bounced(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"},
                            control={"token": TOKEN})
        mailbox(tmp_path, "local.test", "sender")
        wait_for_control(server)
        headers, _ = login(server, {"token": TOKEN})
        before = overview(server, headers)
        assert [summed(before, n) for n in ("accepted", "delivered", "deferred", "bounced")] == [0, 0, 0, 0]
        assert before["queue"]["messages"] == 0 and before["oldest_age_seconds"] is None
        assert before["health"] == {"ready": True, "draining": False, "drained": False, "crash_looping": []}
        row = before["minutes"][-1]
        assert row["t"] % 60 == 0 and row["t"] <= before["now"] < row["t"] + 60

        asyncio.run(send_all(server.port, [
            ("sender@local.test", ["ok@remote.test"], message(1)),
            ("sender@local.test", ["r550-gone@remote.test"], message(2)),
            ("sender@local.test", ["r450-later@remote.test"], message(3)),
        ]))
        sink.wait_for_messages(1, timeout=15)

        def moved() -> dict[str, Any] | None:
            now = overview(server, headers)
            counts = [summed(now, n) for n in ("accepted", "delivered", "deferred", "bounced")]
            waiting = now["queue"]["deferred"] == 1 and any(d["domain"] == "remote.test" for d in now["destinations"])
            return now if counts[0] == 3 and min(counts[1:]) >= 1 and waiting else None
        now = wait_until(moved, 30, "the overview to show the mail sent", server)
        assert len(now["minutes"]) <= 60 and [r["t"] for r in now["minutes"]] == sorted({r["t"] for r in now["minutes"]})
        assert now["queue"]["messages"] >= 1 and now["queue"]["bytes"] > 0 and now["oldest_age_seconds"] > 0
        [remote] = [d for d in now["destinations"] if d["domain"] == "remote.test"]
        assert remote["recipients"] == 1 and remote["limit"] >= 1 and remote["connections"] >= 0

        async def with_a_session_open() -> list[dict[str, Any]]:
            client = await SmtpClient.connect(server.port)
            try:
                return wait_until(lambda: [w for w in overview(server, headers)["inbound"] if w["sessions"]], 10,
                                  "an open inbound session in the overview", server)
            finally:
                await client.close()
        [busy] = asyncio.run(with_a_session_open())
        assert busy["worker"] == "inbound#1" and busy["sessions"] == 1 and busy["pid"] > 0
        # Only inbound workers (every process reports the sessions gauge, the others at 0).
        assert sorted(w["worker"] for w in overview(server, headers)["inbound"]) == ["inbound#1"]
    # Bearer clients read it too; nobody else does.
    assert call(server, "GET", "/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    assert call(server, "GET", "/api/overview").status == 401
