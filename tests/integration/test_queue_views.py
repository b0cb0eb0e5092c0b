"""Queue views that page (issue 15): `mta queue list` and GET /api/queue stream in
arrival order with filters, pages with cursors, `mta queue shape`, and the control
process answering /healthz and /metrics while a big listing streams.

Real `mta serve`, real HTTP over loopback, spools written beforehand with chosen ids
(tests/mta/queuefill.py), and the CLI as a subprocess; the same CLI output must come
whether the server runs (through the API) or not (from the spool).
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from mta import queueview
from mtaqueue.backend_lmdb import LmdbBackend
from tests.integration.conftest import MtaServer, wait_until
from tests.integration.test_admin_api import bearer, call, control_address
from tests.mta.queuefill import message, msgid, spool

pytestmark = pytest.mark.integration

TOKEN = "views-token-0123456789abcdef"
T0 = time.time() - 86400  # a day ago: every message is old enough for the last shape bucket but one


def start(server: MtaServer) -> MtaServer:
    server.start()
    wait_until(lambda: _answers(server, "/healthz"), 15, "the control process", server)
    return server


def _answers(server: MtaServer, path: str) -> bool:
    try:
        return call(server, "GET", path, headers=bearer(TOKEN))[0] == 200
    except OSError:
        return False


def api_json(server: MtaServer, path: str) -> tuple[int, object]:
    status, _, body = call(server, "GET", path, headers=bearer(TOKEN))
    return status, json.loads(body)


def mixed(n: int) -> list:  # type: ignore[type-arg]
    """Message i: to x.test (ready) when i % 3 == 0, else to y.test (deferred) and Z.Test. (held);
    every tenth from Boss@Corp.test."""
    return [message(T0 + i, i, [("a@x.test", "ready")] if i % 3 == 0 else
                    [("b@y.test", "deferred"), (f"c{i}@Z.Test.", "held")],
                    sender="Boss@Corp.test" if i % 10 == 0 else "s@client.test") for i in range(n)]


def test_a_big_listing_streams_while_health_and_metrics_answer(mta_server) -> None:
    count = 20_000  # about 14 MB of JSON: far more than the socket buffers hold
    server = mta_server(start=False, control={"token": TOKEN})
    spool(server.spool, (message(T0 + i, i, [(f"u{i}@far.test", "deferred")]) for i in range(count))).close()
    start(server)
    host, port = control_address(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: the server must wait for us
    sock.connect((host, port))
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.sock = sock
    try:
        conn.request("GET", "/api/queue", headers=bearer(TOKEN))
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        first = response.read1(65536)
        assert first.startswith(b"[\n {\n  \"id\": \"" + msgid(T0, 0).encode())
        # The listing is under way and we take no more of it: the control process serves the rest.
        for path in ("/healthz", "/metrics", "/api/queue?limit=1", "/api/queue/summary"):
            assert call(server, "GET", path, headers=bearer(TOKEN))[0] == 200, path
        listed = json.loads(first + response.read())
    finally:
        conn.close()
    assert [e["id"] for e in listed] == [msgid(T0 + i, i) for i in range(count)]
    assert listed[-1]["recipients"][0]["address"] == f"u{count - 1}@far.test"


def test_pages_with_cursors_give_the_listing_and_bad_parameters_get_a_400(mta_server) -> None:
    server = mta_server(start=False, control={"token": TOKEN})
    spool(server.spool, mixed(1234)).close()
    start(server)
    status, everything = api_json(server, "/api/queue")
    assert status == 200 and [e["id"] for e in everything] == [msgid(T0 + i, i) for i in range(1234)]  # type: ignore[union-attr]
    for query, expected in (("limit=100", everything),
                            ("limit=7&state=held&domain=z.test.", [e for e in everything if e["recipients"][-1]["state"] == "held"]),  # type: ignore[index,union-attr]
                            ("limit=1000&sender=BOSS", [e for e in everything if e["sender"].startswith("Boss")])):  # type: ignore[index,union-attr]
        got, cursor, pages = [], None, 0
        while True:
            status, page = api_json(server, f"/api/queue?{query}" + (f"&cursor={cursor}" if cursor else ""))
            assert status == 200, page
            got += page["messages"]  # type: ignore[index]
            pages += 1
            cursor = page["next_cursor"]  # type: ignore[index]
            if cursor is None:
                break
        assert got == expected, query
    assert pages == 1  # the boss's 124 messages fit one page of 1000
    status, streamed = api_json(server, "/api/queue?state=ready&recipient=A%40X")
    assert [e["id"] for e in streamed] == [msgid(T0 + i, i) for i in range(0, 1234, 3)]  # type: ignore[union-attr]

    _, first = api_json(server, "/api/queue?limit=5&domain=y.test")
    cursor = first["next_cursor"]  # type: ignore[index]
    _, same = api_json(server, f"/api/queue?limit=5&cursor={cursor}")  # the cursor carries its filters
    _, again = api_json(server, f"/api/queue?limit=5&domain=Y.TEST&cursor={cursor}")
    assert same == again and same["messages"][0]["id"] == msgid(T0 + 8, 8)  # type: ignore[index]
    for query, error in (("limit=0", "limit must be"), ("limit=5001", "limit must be"), ("limit=ten", "limit must be"),
                         ("state=frozen", "state must be one of"), ("colour=red", "unknown or repeated parameter"),
                         ("domain=a&domain=b", "unknown or repeated parameter"), ("cursor=xyz", "not a cursor"),
                         (f"limit=5&domain=x.test&cursor={cursor}", "other filters"), ("limit", "name=value")):
        status, answer = api_json(server, f"/api/queue?{query}")
        assert status == 400 and error in answer["error"], (query, answer)  # type: ignore[index]

    status, summary = api_json(server, "/api/queue/summary")
    assert status == 200 and summary == {"x.test": {"ready": 412}, "y.test": {"deferred": 822}, "z.test": {"held": 822}}
    assert api_json(server, "/api/domains") == (200, summary)


LISTINGS = [
    (),
    ("--json",),
    ("--limit", "4"),
    ("--json", "--limit", "2", "--state", "held"),
    ("--domain", "Z.TEST.", "--limit", "3"),
    ("--state", "ready", "--sender", "boss"),
    ("--recipient", "C1", "--json"),
    ("--domain", "nowhere.test"),
    ("--limit", "1000", "--state", "active"),
]


def test_the_cli_lists_the_same_through_the_api_and_from_the_spool(mta_server) -> None:
    server = mta_server(start=False, control={"token": TOKEN})
    spool(server.spool, mixed(40)).close()
    start(server)
    online = [server.mta("queue", "list", *args).stdout for args in LISTINGS]
    assert b"event=api method=GET path=/api/queue status=200" in server.log_bytes()
    server.stop()
    offline = [server.mta("queue", "list", *args).stdout for args in LISTINGS]
    assert online == offline
    text = dict(zip(LISTINGS, (out.decode() for out in online)))
    assert text[()].splitlines()[-1] == "-- 40 message(s), 800 bytes"
    assert text[()].count("<s@client.test>") + text[()].count("<Boss@Corp.test>") == 40
    assert text[("--limit", "4")].splitlines()[-1] == "-- 4 message(s), 80 bytes (--limit 4: there may be more)"
    held = json.loads(text[("--json", "--limit", "2", "--state", "held")])
    assert [e["id"] for e in held] == [msgid(T0 + 1, 1), msgid(T0 + 2, 2)]
    assert [line[:21] for line in text[("--domain", "Z.TEST.", "--limit", "3")].splitlines()[1:] if line[0] != " "] \
        [:3] == [msgid(T0 + i, i) for i in (1, 2, 4)]
    assert text[("--state", "ready", "--sender", "boss")].count("<Boss@Corp.test>") == 2  # messages 0 and 30
    assert {e["id"] for e in json.loads(text[("--recipient", "C1", "--json")])} == \
        {msgid(T0 + i, i) for i in (1, 10, 11, 13, 14, 16, 17, 19)}
    assert text[("--domain", "nowhere.test")].startswith("no queued message matches --domain nowhere.test (")
    assert text[("--limit", "1000", "--state", "active")].startswith("no queued message matches --state active")
    assert json.loads(text[("--json",)]) == [queueview.envelope_json(m.envelope) for m in mixed(40)]


def test_queue_shape_counts_messages_by_destination_and_age(mta_server) -> None:
    server = mta_server(start=False, control={"token": TOKEN})
    now = time.time()
    ages = [1, 1, 3, 12, 12, 12, 100, 2000]  # minutes
    spool(server.spool, [message(now - m * 60, i, [("a@slow.test", "deferred")] + ([("b@fast.test", "ready")] if m < 5
                                                                                      else []))
                         for i, m in enumerate(ages)]).close()
    for running in (False, True):  # the spool's index either way
        if running:
            start(server)
        shape = json.loads(server.mta("queue", "shape", "--json").stdout)
        assert shape["total"] == {"messages": 11, "buckets": [6, 0, 3, 0, 0, 1, 0, 0, 0, 1]}
        assert [(d["destination"], d["messages"]) for d in shape["destinations"]] == [("slow.test", 8), ("fast.test", 3)]
        table = server.mta("queue", "shape").stdout.decode().splitlines()
        assert table[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
        assert table[2].split() == ["slow.test", "8", "3", "0", "3", "0", "0", "1", "0", "0", "0", "1"]


def test_offline_bulk_operations_go_in_batches_with_progress(mta_server) -> None:
    server = mta_server(start=False, control={"token": TOKEN})
    spool(server.spool, mixed(2500)).close()
    done = server.mta("queue", "hold", "--all")
    assert done.stdout.decode() == "hold: 2500 message(s) (server not running: applied to the spool)\n"
    assert done.stderr.decode().splitlines()[0] == "held 1000/2500"
    done = server.mta("queue", "release", "--domain", "Y.Test.")
    assert done.stdout.decode() == "release: 1666 message(s) (server not running: applied to the spool)\n"
    assert done.stderr.decode().splitlines()[0] == "released 1000"  # a domain's total is not known up front
    backend = LmdbBackend(str(server.spool), 256 * 1024 * 1024)
    try:
        assert backend.totals() | {"messages": 0} == {"ready": 1666 * 2, "deferred": 0, "held": 834, "messages": 0}
    finally:
        backend.close()
    assert server.mta("queue", "delete", "--domain", "x.test").stdout.startswith(b"delete: 834 message(s)")
    assert json.loads(server.mta("queue", "shape", "--json").stdout)["total"]["messages"] == 1666 * 2
