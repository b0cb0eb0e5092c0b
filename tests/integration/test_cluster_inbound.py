"""Shared inbound limits ([cluster] redis): two real `mta serve` nodes, each its own port, spool
and cache, with one private redis-server. AUTH failures spread over both lock the address out on
both; a per-IP message rate holds across both; Redis stopped -> on_redis_down (local: each node's
own limits; tempfail: 4xx), shown in the metrics; Redis back -> shared again; nothing accepted lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    MtaServer,
    Reply,
    SmtpClient,
    queued_id,
    wait_until,
)
from tests.integration.test_metrics import get, sample
from tests.integration.test_security import MSG, drop, pki, secure_server, users_file  # noqa: F401 (fixture)
from tests.integration.tlscerts import Pki
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

# Clients outside mynetworks (empty), one loopback address per phase of a test.
ATTACKER, SENDER, DURING, AFTER = "127.0.0.9", "127.0.0.10", "127.0.0.11", "127.0.0.12"


def two_nodes(mta_server, tmp_path: Path, pki: Pki, redis: RedisServer, on_redis_down: str = "local",
              **sections: Any) -> list[tuple[MtaServer, dict[str, int]]]:
    auth = {"users_file": str(users_file(tmp_path, alice="correct horse")), "slow_after_failures": 10,
            "max_failures": 4, "lockout_seconds": 600}
    return [secure_server(mta_server, tmp_path, pki, cluster={"redis": redis.url, "on_redis_down": on_redis_down},
                          auth=auth, **sections) for _ in range(2)]


def metrics(server: MtaServer) -> str:
    status, text = get(server, "/metrics")
    assert status == 200, text
    return text


async def send(port: int, source: str) -> Reply:
    client = await SmtpClient.connect(port, source=source)
    reply = await client.send_mail("a@x.test", ["r@local.test"], MSG)
    await client.close()
    return reply


def sends(port: int, source: str, count: int) -> list[Reply]:
    return [asyncio.run(send(port, source)) for _ in range(count)]


def codes(replies: list[Reply]) -> list[str]:
    return [str(r)[:9] for r in replies]


def queued(replies: list[Reply]) -> set[str]:
    """The queue ids of the 250s among `replies`."""
    return {msgid for msgid in map(queued_id, replies) if msgid is not None}


async def greeting(port: int, source: str, tls: Any = None) -> str:
    client = await SmtpClient.connect(port, helo=None, source=source, tls=tls)
    text = str(client.greeting)
    await drop(client)
    return text


def test_a_per_ip_connection_rate_holds_across_nodes(mta_server, tmp_path: Path, pki: Pki,
                                                     redis_server: RedisServer) -> None:
    (one, _), (two, _) = two_nodes(mta_server, tmp_path, pki, redis_server,
                                   rate={"window_seconds": 120, "connections_per_window": 3})
    greetings = [asyncio.run(greeting(node.port, SENDER)) for node in (one, two, one, two, one)]
    assert [g[:9] for g in greetings] == ["220 mx.te"] * 3 + ["421 4.7.0"] * 2, greetings
    assert asyncio.run(greeting(two.port, DURING)).startswith("220")  # per address
    assert sample(metrics(one), "mta_cluster_shared_decisions_total", limit="connection_rate", result="refused") == 1


def test_auth_failures_spread_over_two_nodes_lock_the_address_out_on_both(
        mta_server, tmp_path: Path, pki: Pki, redis_server: RedisServer) -> None:
    (one, one_ports), (two, two_ports) = two_nodes(mta_server, tmp_path, pki, redis_server)

    async def guesses(port: int, count: int) -> list[str]:
        client = await SmtpClient.connect(port, tls=pki.client_context(), source=ATTACKER)
        replies = [str(await client.auth_plain("alice", f"guess{i}")) for i in range(count)]
        await drop(client)
        return replies

    async def login(port: int, source: str) -> str:
        client = await SmtpClient.connect(port, tls=pki.client_context(), source=source)
        reply = str(await client.auth_plain("alice", "correct horse"))
        await drop(client)
        return reply

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        # A session opened before the lockout: its AUTH afterwards asks the cluster.
        waiting = await SmtpClient.connect(two_ports["smtps"], tls=pki.client_context(), source=ATTACKER)
        # 2 + 1 failures: each node alone has fewer than max_failures = 4; the cluster has 3.
        out["guesses"] = await guesses(one_ports["smtps"], 2) + await guesses(two_ports["smtps"], 1)
        out["fourth"] = (await guesses(one_ports["smtps"], 1))[0]
        out["waiting"] = str(await waiting.auth_plain("alice", "correct horse"))  # even the right password
        await drop(waiting)
        tls = pki.client_context()
        out["greetings"] = [await greeting(ports["smtps"], ATTACKER, tls) for ports in (one_ports, two_ports)]
        out["greetings"] += [await greeting(ports["submission"], ATTACKER) for ports in (one_ports, two_ports)]
        out["port25"] = await greeting(two.port, ATTACKER)  # mail still flows
        out["other"] = await login(two_ports["smtps"], SENDER)
        return out

    out = asyncio.run(scenario())
    assert all(r.startswith("535 5.7.8") for r in out["guesses"]), out
    assert out["fourth"].startswith("421 4.7.0"), out  # locked out
    assert out["waiting"].startswith("421 4.7.0"), out
    assert all(g.startswith("421 4.7.0") for g in out["greetings"]), out
    assert out["port25"].startswith("220") and out["other"].startswith("235"), out
    assert sample(metrics(two), "mta_cluster_shared_decisions_total", limit="auth_lockout", result="refused") >= 1
    assert sample(metrics(one), "mta_cluster_redis_up", side="inbound") == 1


def test_a_per_ip_message_rate_holds_across_nodes_and_redis_down_falls_back_on_each_nodes_own(
        mta_server, tmp_path: Path, pki: Pki, redis_server: RedisServer) -> None:
    nodes = two_nodes(mta_server, tmp_path, pki, redis_server,
                      rate={"window_seconds": 120, "messages_per_window": 2})
    (one, _), (two, _) = nodes
    accepted: list[Reply] = []

    # Shared: 2 per address for the cluster, whichever node takes them.
    replies = sends(one.port, SENDER, 1) + sends(two.port, SENDER, 1)
    refused = sends(one.port, SENDER, 1) + sends(two.port, SENDER, 1)
    assert codes(replies) == ["250 2.0.0"] * 2 and codes(refused) == ["450 4.7.1"] * 2, replies + refused
    accepted += replies

    # Redis stopped, on_redis_down = "local": each node enforces the window alone (2 per node).
    redis_server.stop()
    replies = sends(one.port, DURING, 3) + sends(two.port, DURING, 3)
    assert codes(replies) == ["250 2.0.0", "250 2.0.0", "450 4.7.1"] * 2, replies
    accepted += replies
    for node in (one, two):
        text = metrics(node)
        assert sample(text, "mta_cluster_redis_up", side="inbound") == 0
        assert sample(text, "mta_cluster_shared_decisions_total", limit="message_rate", result="local") == 3
    assert b"event=cluster_redis_down" in one.log_bytes()

    # Redis back (empty): shared again once the nodes' probes see it.
    redis_server.start()
    for node in (one, two):
        wait_until(lambda node=node: sample(metrics(node), "mta_cluster_redis_up", side="inbound") == 1, 10,
                   "the node to see Redis again", node)
    replies = sends(two.port, AFTER, 1) + sends(one.port, AFTER, 1)
    refused = sends(two.port, AFTER, 1)
    assert codes(replies + refused) == ["250 2.0.0", "250 2.0.0", "450 4.7.1"], replies + refused
    accepted += replies

    # Nothing accepted is lost: every 250's message is in one of the spools.
    ids = queued(accepted)
    assert len(ids) == 2 + 4 + 2
    stored = set(one.spool_snapshot().envelopes) | set(two.spool_snapshot().envelopes)
    assert ids <= stored, ids - stored


def test_redis_down_tempfail_answers_4xx_then_shared_again(mta_server, tmp_path: Path, pki: Pki,
                                                          redis_server: RedisServer) -> None:
    (one, one_ports), (two, _) = two_nodes(mta_server, tmp_path, pki, redis_server, "tempfail",
                                           rate={"messages_per_window": 5})

    async def mail_and_auth(source: str) -> tuple[Reply, str]:
        client = await SmtpClient.connect(one_ports["smtps"], tls=pki.client_context(), source=source)
        auth = str(await client.auth_plain("alice", "correct horse"))
        await drop(client)
        return await send(one.port, source), auth

    redis_server.stop()
    mail, auth = asyncio.run(mail_and_auth(DURING))
    assert str(mail).startswith("451 4.3.0") and auth.startswith("454 4.7.0"), (mail, auth)
    text = metrics(one)
    assert sample(text, "mta_cluster_redis_up", side="inbound") == 0
    assert sample(text, "mta_cluster_shared_decisions_total", limit="message_rate", result="tempfail") == 1
    assert sample(text, "mta_auth_attempts_total", result="cluster_unavailable") == 1

    redis_server.start()
    wait_until(lambda: sample(metrics(one), "mta_cluster_redis_up", side="inbound") == 1, 10,
               "the node to see Redis again", one)
    mail, auth = asyncio.run(mail_and_auth(AFTER))
    assert str(mail).startswith("250 2.0.0") and auth.startswith("235"), (mail, auth)
    assert set(one.spool_snapshot().envelopes) == queued([mail])
    assert not two.spool_snapshot().envelopes
