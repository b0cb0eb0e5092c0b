"""Per-destination queue gauges on a live scrape: the top destinations and "other" add up to
mta_queue_recipients, and destinations that leave the top leave the scrape."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id, wait_until
from tests.integration.test_metrics import get, sample
from workers.scheduler.tally import TOP_DESTINATIONS

pytestmark = pytest.mark.integration

ROW = re.compile(r'^mta_destination_recipients\{destination="([^"]+)",state="([^"]+)"\} (\S+)$', re.M)
STATES = ("ready", "active", "deferred")


def destination_rows(text: str) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for name, state, value in ROW.findall(text):
        rows.setdefault(name, {})[state] = float(value)
    return rows


def queue(server: MtaServer, mails: list[list[str]]) -> list[str]:
    async def send() -> list[str]:
        client = await SmtpClient.connect(server.port)
        ids = []
        for n, rcpts in enumerate(mails):
            msgid = queued_id(await client.send_mail("s@client.test", rcpts, f"Subject: g{n}\r\n\r\nx\r\n".encode()))
            assert msgid is not None
            ids.append(msgid)
        await client.close()
        return ids
    return asyncio.run(send())


def scrape_when(server: MtaServer, ready: int, held: int = 0) -> str:
    """The first scrape whose gauges show `ready` ready and `held` held recipients (they
    update every 2 s: a scrape right after a change may still show the counts before it)."""
    def scrape() -> str | None:
        text = get(server, "/metrics")[1]
        shown = sum(row.get("ready", 0) for row in destination_rows(text).values())
        if sample(text, "mta_queue_recipients", state="held") != held:
            return None
        return text if sample(text, "mta_queue_recipients", state="ready") == ready == shown else None
    return wait_until(scrape, 15, f"{ready} ready and {held} held recipients in the gauges", server)


def test_top_destinations_and_other_add_up_and_leavers_leave_the_scrape(mta_server) -> None:
    first = [f"d{n:02}.test" for n in range(TOP_DESTINATIONS + 4)]
    second = [f"e{n:02}.test" for n in range(TOP_DESTINATIONS + 4)]
    # [delivery] workers = 0: everything stays ready, as behind a destination that is down.
    server = mta_server(relay={"relay_domains": first + second}, domains={"d13.test": {"concurrency": 2}})
    wait_until(lambda: get(server, "/healthz")[0] == 200, 10, "the control process", server)

    # d<n> gets n + 1 recipients; one more message is held (held recipients are not broken down).
    queue(server, [[f"u{k}@{d}" for k in range(n + 1)] for n, d in enumerate(first)])
    [held] = queue(server, [["h1@d00.test", "h2@d13.test"]])
    server.mta("queue", "hold", held)
    ready = sum(range(1, len(first) + 1))
    text = scrape_when(server, ready, held=2)
    rows = destination_rows(text)
    top = [f"d{n:02}.test" for n in range(len(first) - 1, len(first) - 1 - TOP_DESTINATIONS, -1)]
    assert set(rows) == {*top, "other"}
    for n, d in enumerate(first):
        if d in top:
            assert rows[d] == {"ready": n + 1, "active": 0, "deferred": 0}
    assert rows["other"]["ready"] == sum(range(1, len(first) - TOP_DESTINATIONS + 1))
    for state in STATES:  # the rows add up to the queue
        assert sum(row[state] for row in rows.values()) == sample(text, "mta_queue_recipients", state=state)
    assert sample(text, "mta_queue_recipients", state="held") == 2
    for d in top:
        assert sample(text, "mta_destination_connections", destination=d) == 0  # no delivery workers
        # the window a destination starts with: min(initial_concurrency 5, its concurrency)
        assert sample(text, "mta_destination_connection_limit", destination=d) == (2 if d == "d13.test" else 5)

    # A second wave, bigger: the first wave's destinations fall into "other" and leave the scrape.
    queue(server, [[f"u{k}@{e}" for k in range(n + 20)] for n, e in enumerate(second)])
    ready += sum(range(20, 20 + len(second)))
    text = scrape_when(server, ready, held=2)
    rows = destination_rows(text)
    assert set(rows) == {*(f"e{n:02}.test" for n in range(len(second) - 1, len(second) - 1 - TOP_DESTINATIONS, -1)),
                         "other"}
    names = set(re.findall(r'destination="([^"]+)"', text))
    assert len(names) == TOP_DESTINATIONS + 1  # every per-destination series, all three metrics
    for state in STATES:
        assert sum(row[state] for row in rows.values()) == sample(text, "mta_queue_recipients", state=state)
