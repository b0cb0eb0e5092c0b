"""Three mta nodes as one deployment: each in its own network namespace, behind one HAProxy,
sharing one Redis, delivering to one sink (issue 20's deployment test).

Topology (tests/integration/netns.py builds it per module run and removes it, even on failure):

    root namespace (pytest)            hub namespace, bridge br0 10.77.S.2
      clients 10.77.S.1, .9  ---veth---  HAProxy :25  (mode tcp, roundrobin, send-proxy-v2 to :2526,
      sink    10.77.S.1:2500              option httpchk GET /readyz on :8025, inter 300 ms)
                                        Redis :6379
                                          |-- veth -- n1 namespace 10.77.S.11
                                          |-- veth -- n2 namespace 10.77.S.12
                                          `-- veth -- n3 namespace 10.77.S.13

Each node (`mta serve` under `ip netns exec`): SMTP :2525 (plain: greeting checks and
`mta queue transfer` between nodes), :2526 (PROXY v2 from the hub only, AUTH offered without
TLS), control :8025; [cluster] redis on the hub; routes to the sink for three domains:
conc.test (concurrency = 4), rate.test (max_messages_per_second = 10), drain.test. The
client's address reaches the nodes in the PROXY header; the greeting names the node
(n1.test ...), so a test knows where HAProxy sent it.

Scenarios: cluster-wide concurrency and message rate under load through HAProxy, Redis
stopped and back, AUTH failures spread over the nodes locking the address out on all (these
four fail when the limits are the nodes' own, without [cluster]); a node drained under load
(HAProxy's health check on /readyz) and its queue transferred, every message once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    REPO_ROOT,
    MtaServer,
    SmtpClient,
    _env,
    queued_id,
    server_config,
    toml_dumps,
    wait_until,
)
from tests.integration.netns import NetnsUnavailable, Topology
from tests.integration.sink import SmtpSink, reply_for
from tests.integration.test_delivery import FAST_RETRY
from tests.integration.test_metrics import get, sample
from tests.integration.test_security import users_file
from tests.redisserver import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.integration

NODES = 3
FRONT_PORT, SMTP_PORT, PROXIED_PORT, CONTROL_PORT, REDIS_PORT, SINK_PORT = 25, 2525, 2526, 8025, 6379, 2500
ATTACKER_HOST = 9  # a second client address on the root's veth
CONC, RATE, DRAIN = "conc.test", "rate.test", "drain.test"
CONCURRENCY, RATE_PER_SECOND = 4, 10.0
MAX_AUTH_FAILURES = 4

HAPROXY_CONFIG = """\
global
    stats socket {socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp
    bind {hub}:{front}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk GET /readyz
    default-server send-proxy-v2 check port {control} inter 300ms fall 2 rise 2
{servers}
"""


@dataclass
class Cluster:
    topo: Topology
    redis: RedisServer
    nodes: list[MtaServer]
    haproxy_socket: Path

    def node_named(self, name: str) -> MtaServer:
        return self.nodes[int(name[1:]) - 1]

    def haproxy_status(self) -> dict[str, str]:
        """HAProxy's view of each node: UP, DOWN, ... (its `show stat`)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.haproxy_socket))
            sock.sendall(b"show stat\n")
            text = b""
            while chunk := sock.recv(65536):
                text += chunk
        lines = text.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "nodes"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_haproxy(self, want: dict[str, str], timeout: float = 15) -> None:
        wait_until(lambda: all(self.haproxy_status().get(k, "").startswith(v) for k, v in want.items()),
                   timeout, f"HAProxy to see {want} (sees {self.haproxy_status()})")


def node_config(topo: Topology, i: int, spool: Path, redis: RedisServer, users: Path) -> str:
    me = topo.node(i)
    sink = f"{topo.client}:{SINK_PORT}"
    return toml_dumps(server_config(
        SMTP_PORT, spool,
        server={"hostname": f"n{i + 1}.test", "inbound_workers": 1, "drain_timeout_seconds": 2},
        listener=[{"address": f"{me}:{SMTP_PORT}"},
                  {"address": f"{me}:{PROXIED_PORT}", "proxy_protocol": True, "trusted_proxies": [f"{topo.hub}/32"],
                   "auth": True, "auth_plaintext": True}],
        control={"listen": f"{me}:{CONTROL_PORT}", "token": "netns-test-token"},  # needed beyond loopback
        relay={"relay_domains": [CONC, RATE, DRAIN], "mynetworks": [f"{topo.node(j)}/32" for j in range(NODES)]},
        delivery={"workers": 1, "max_messages_per_connection": 2, "connection_idle_seconds": 0.2, **FAST_RETRY},
        domains={CONC: {"concurrency": CONCURRENCY}, RATE: {"max_messages_per_second": RATE_PER_SECOND}},
        routes={CONC: sink, RATE: sink, DRAIN: sink},
        cluster={"redis": redis.url, "node": f"n{i + 1}", "on_redis_down": "local"},
        auth={"users_file": str(users), "max_failures": MAX_AUTH_FAILURES, "lockout_seconds": 600,
              "slow_after_failures": 10},
    ))


def start_haproxy(topo: Topology, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "haproxy.sock"
    servers = "\n".join(f"    server n{i + 1} {topo.node(i)}:{PROXIED_PORT}" for i in range(NODES))
    config = tmp / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(socket=sock, hub=topo.hub, front=FRONT_PORT, control=CONTROL_PORT,
                                            servers=servers))
    with open(tmp / "haproxy.log", "wb") as log:
        proc = subprocess.Popen([*topo.exec_prefix(topo.hub_ns), "haproxy", "-f", str(config), "-db"],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    return proc, sock


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    for tool in ("haproxy", REDIS_SERVER):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `make test-deps` installs it")
    tmp = tmp_path_factory.mktemp("netns")
    topo = Topology(NODES, extra_client_hosts=(ATTACKER_HOST,))
    try:
        topo.up()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    with contextlib.ExitStack() as stack:  # in reverse: HAProxy, the nodes, Redis, the namespaces
        stack.callback(topo.down)
        redis = RedisServer(tmp / "redis", host=topo.hub, port=REDIS_PORT, wrapper=topo.exec_prefix(topo.hub_ns))
        stack.callback(redis.stop)
        redis.start()
        users = users_file(tmp, alice="correct horse")
        nodes = []
        for i in range(NODES):
            config = tmp / f"n{i + 1}.toml"
            config.write_text(node_config(topo, i, tmp / f"spool{i + 1}", redis, users))
            node = MtaServer(config, SMTP_PORT, tmp / f"spool{i + 1}", tmp / f"n{i + 1}.log",
                             wrapper=topo.exec_prefix(topo.node_ns[i]), host=topo.node(i),
                             cli_wrapper=topo.exec_prefix(topo.node_ns[i]))
            stack.callback(node.stop)
            nodes.append(node.start())
        proc, sock = start_haproxy(topo, tmp)
        stack.callback(stop_process, proc)
        made = Cluster(topo, redis, nodes, sock)
        wait_until(sock.exists, 10, f"HAProxy's stats socket ({(tmp / 'haproxy.log').read_text()})")
        made.wait_haproxy({f"n{i + 1}": "UP" for i in range(NODES)})
        yield made


# --- clients through HAProxy ------------------------------------------------------------------

def mails(tag: str, domain: str, n: int) -> list[tuple[str, list[str], bytes]]:
    return [("a@client.test", [f"u{i}@{domain}"],
             f"Message-ID: <{tag}{i}@client.test>\r\nSubject: {tag} {i}\r\n\r\nbody\r\n".encode()) for i in range(n)]


async def connect(c: Cluster, source: str | None = None, node: str | None = None) -> tuple[SmtpClient, str]:
    """A session through HAProxy that a node greeted with 220 (`node`: that one): (client, node name)."""
    for _ in range(40):
        client = await SmtpClient.connect(FRONT_PORT, helo=None, host=c.topo.hub, source=source)
        assert client.greeting is not None
        name = client.greeting.text.split(".")[0]
        if client.greeting.code == 220 and node in (None, name):
            reply = await client.command("EHLO client.test")
            assert reply.code == 250, reply
            return client, name
        await client.close()  # a drained node's 421 (HAProxy has not seen it yet), or not the one wanted
        await asyncio.sleep(0.05)
    raise AssertionError(f"no 220 from {node or 'any node'} through HAProxy")


async def load(c: Cluster, todo: list[tuple[str, list[str], bytes]], sessions: int, per_session: int,
               pause: float = 0.0) -> dict[str, str]:
    """Send the mails in `todo` through HAProxy, `per_session` per connection, until it is empty
    (a test may empty it to stop): {Message-ID: the node that accepted it}."""
    accepted: dict[str, str] = {}

    async def worker() -> None:
        while todo:
            client, name = await connect(c)
            try:
                for _ in range(per_session):
                    if not todo:
                        break
                    sender, rcpts, data = todo.pop(0)
                    reply = await client.send_mail(sender, rcpts, data)
                    assert queued_id(reply) is not None, (name, reply)
                    accepted[message_id(data)] = name
                    await asyncio.sleep(pause)
            finally:
                await client.close()

    await asyncio.gather(*(worker() for _ in range(sessions)))
    return accepted


def message_id(data: bytes) -> str:
    found = re.search(rb"Message-ID: <([^>]+)>", data)
    assert found is not None, data[:200]
    return found.group(1).decode()


def message_ids(sink: SmtpSink) -> Counter[str]:
    return Counter(message_id(m.data) for m in sink.messages)


def delivered_by(sink: SmtpSink) -> Counter[str]:
    """The node whose Received header is on top of each message at the sink."""
    return Counter(m.group(1).decode() for s in sink.messages if (m := re.search(rb"by (n\d)\.test", s.data)))


def metrics(node: MtaServer) -> str:
    status, text = get(node, "/metrics")
    assert status == 200, text
    return text


def accepted_count(node: MtaServer) -> float:
    return sample(metrics(node), "mta_inbound_messages_total")


def all_once(sink: SmtpSink, expected: set[str]) -> None:
    ids = message_ids(sink)
    assert set(ids) == expected, (expected - set(ids), set(ids) - expected)
    assert set(ids.values()) == {1}, {k: v for k, v in ids.items() if v > 1}


def queues_empty(c: Cluster) -> None:
    for node in c.nodes:
        wait_until(lambda n=node: n.queue_list() == [], 30, "an empty queue", node)


# --- the scenarios ---------------------------------------------------------------------------

def test_a_destinations_concurrency_holds_for_three_nodes_under_load(cluster: Cluster) -> None:
    with SmtpSink(cluster.topo.client, SINK_PORT, delay_seconds=0.05) as sink:
        todo = mails("conc", CONC, 300)
        accepted = asyncio.run(load(cluster, todo, sessions=30, per_session=10))
        assert sorted(set(accepted.values())) == ["n1", "n2", "n3"], accepted  # HAProxy spread the load
        sink.wait_for_messages(300, timeout=90)
        queues_empty(cluster)
        time.sleep(0.5)
        all_once(sink, {f"conc{i}@client.test" for i in range(300)})
        assert sink.peak_connections <= CONCURRENCY, sink.peak_connections  # each node alone: up to 3 x 4
        by_node = delivered_by(sink)
        assert sorted(by_node) == ["n1", "n2", "n3"] and sum(by_node.values()) == 300, by_node


def test_a_destinations_message_rate_holds_for_three_nodes(cluster: Cluster) -> None:
    total = 60  # a burst of 10, then 50 at 10 a second: about 5 s
    with SmtpSink(cluster.topo.client, SINK_PORT) as sink:
        accepted = asyncio.run(load(cluster, mails("rate", RATE, total), sessions=30, per_session=2))
        assert sorted(set(accepted.values())) == ["n1", "n2", "n3"], accepted
        got = sink.wait_for_messages(total, timeout=30)
        times = sorted(m.received_at for m in got)
        burst = int(RATE_PER_SECOND)
        measured = (total - 1 - burst) / (times[-1] - times[burst])  # after the bucket's burst
        assert abs(measured - RATE_PER_SECOND) <= 0.1 * RATE_PER_SECOND, measured  # each node alone: ~3 x 10
        all_once(sink, {f"rate{i}@client.test" for i in range(total)})
        assert sorted(delivered_by(sink)) == ["n1", "n2", "n3"]


def test_redis_stopped_falls_back_on_each_nodes_own_limits_and_is_shared_again_when_back(cluster: Cluster) -> None:
    with SmtpSink(cluster.topo.client, SINK_PORT, delay_seconds=0.05) as sink:
        cluster.redis.stop()
        try:
            asyncio.run(load(cluster, mails("down", CONC, 60), sessions=6, per_session=10))
            sink.wait_for_messages(60, timeout=60)  # mail flows on each node's own limits
            for node in cluster.nodes:
                text = metrics(node)
                assert sample(text, "mta_cluster_redis_up", side="delivery") == 0, node.log_tail()
                assert sample(text, "mta_cluster_shared_decisions_total", limit="concurrency", result="local") > 0
                assert b"event=cluster_redis_down" in node.log_bytes()
        finally:
            cluster.redis.start()  # empty: every lease and bucket starts over
        for node in cluster.nodes:
            wait_until(lambda n=node: sample(metrics(n), "mta_cluster_redis_up", side="delivery") == 1, 20,
                       "the node to see Redis again", node)
        queues_empty(cluster)
        sink.peak_connections = sink.current_connections  # the peak of what follows
        asyncio.run(load(cluster, mails("back", CONC, 120), sessions=12, per_session=10))
        sink.wait_for_messages(180, timeout=60)
        queues_empty(cluster)
        time.sleep(0.5)
        assert sink.peak_connections <= CONCURRENCY, sink.peak_connections
        all_once(sink, {f"down{i}@client.test" for i in range(60)} | {f"back{i}@client.test" for i in range(120)})


def test_auth_failures_spread_over_three_nodes_lock_the_address_out_on_all(cluster: Cluster) -> None:
    attacker, other = cluster.topo.address(ATTACKER_HOST), cluster.topo.client

    async def auth(node: str, source: str, password: str) -> str:
        client, _ = await connect(cluster, source=source, node=node)
        reply = await client.auth_plain("alice", password)
        client.writer.close()  # a 421 closed it already
        with contextlib.suppress(OSError, ConnectionError):
            await client.writer.wait_closed()
        return str(reply)

    async def scenario() -> dict[str, list[str]]:
        # One failure on each node (the address as HAProxy's PROXY v2 header gives it), then a fourth.
        failures = [await auth(n, attacker, f"guess{n}") for n in ("n1", "n2", "n3", "n1")]
        right = [await auth(n, attacker, "correct horse") for n in ("n1", "n2", "n3")]
        return {"failures": failures, "right": right, "other": [await auth("n2", other, "correct horse")]}

    out = asyncio.run(scenario())
    assert [r[:9] for r in out["failures"]] == ["535 5.7.8"] * 3 + ["421 4.7.0"], out  # alone: 2 on n1, below 4
    assert all(r.startswith("421 4.7.0") for r in out["right"]), out  # even the password, on every node
    assert out["other"][0].startswith("235"), out
    for node in cluster.nodes:
        assert f"client={attacker}".encode() in node.log_bytes()
    refused = sum(sample(metrics(n), "mta_cluster_shared_decisions_total", limit="auth_lockout", result="refused")
                  for n in cluster.nodes)
    assert refused >= 3, refused


def transfer(c: Cluster, i: int, to: str) -> subprocess.CompletedProcess[bytes]:
    """`mta queue transfer --all` run on node i itself (in its namespace)."""
    return subprocess.run([*c.topo.exec_prefix(c.topo.node_ns[i]), sys.executable, "-m", "mta", "queue", "transfer",
                           "-c", str(c.nodes[i].config_path), "--to", to, "--all"], cwd=REPO_ROOT, env=_env(),
                          check=False, capture_output=True, timeout=120)


def test_a_drained_node_gets_no_new_sessions_finishes_its_own_and_its_queue_moves(cluster: Cluster) -> None:
    one, two = cluster.nodes[0], cluster.nodes[1]
    refusing = SmtpSink(cluster.topo.client, SINK_PORT, mail_rule=lambda sender: reply_for(451))
    todo = mails("drain", DRAIN, 2000)  # more than the time allows: emptied to stop the load
    counts: dict[str, float] = {}

    async def scenario() -> dict[str, str]:
        opened, _ = await connect(cluster, node="n1")  # a session on n1 before the drain
        assert (await opened.command("MAIL FROM:<a@client.test>")).code == 250
        flowing = asyncio.create_task(load(cluster, todo, sessions=6, per_session=2, pause=0.05))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(one.mta, "node", "drain")
        assert (await opened.command(f"RCPT TO:<open@{DRAIN}>")).code == 250  # the open session finishes
        assert (await opened.command("DATA")).code == 354
        opened.writer.write(b"Message-ID: <open@client.test>\r\nSubject: open\r\n\r\nbody\r\n.\r\n")
        assert queued_id(await opened.read_reply()) is not None
        await opened.close()
        await asyncio.to_thread(cluster.wait_haproxy, {"n1": "DOWN", "n2": "UP", "n3": "UP"})
        await asyncio.sleep(1.0)  # sessions HAProxy gave n1 before that end
        counts["n1"], counts["others"] = accepted_count(one), sum(map(accepted_count, cluster.nodes[1:]))
        await asyncio.sleep(3.0)
        assert todo, "the load ended too soon to tell"
        counts["n1 after"], counts["others after"] = accepted_count(one), sum(map(accepted_count, cluster.nodes[1:]))
        todo.clear()
        return await flowing

    try:
        with refusing:
            accepted = asyncio.run(scenario())
            assert counts["n1 after"] == counts["n1"], counts  # no new session reached the drained node
            assert counts["others after"] > counts["others"] + 10, counts  # while the load went on
            held = {e["id"] for e in one.queue_list()}
            assert held, "n1 holds no queue to transfer"
            done = transfer(cluster, 0, f"{cluster.topo.node(1)}:{SMTP_PORT}")
            assert done.returncode == 0, done.stderr.decode()
            assert f"transferred {len(held)} message(s)".encode() in done.stdout, done.stdout
            assert one.queue_list() == []
            refusing.mail_rule = lambda sender: None  # the sink accepts from now on
            refusing.wait_for_messages(len(accepted) + 1, timeout=60)
            queues_empty(cluster)
            time.sleep(1.0)
            all_once(refusing, set(accepted) | {"open@client.test"})
            assert b"origin=n1.test" in two.log_bytes()
    finally:
        one.mta("node", "resume")
        cluster.wait_haproxy({"n1": "UP"})
