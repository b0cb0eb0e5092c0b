"""The three-node example in deploy/cluster/: each node's mta.toml passes `mta config check`
and differs from the others only where a node must; HAProxy's servers, health checks and
PROXY headers match the nodes' listeners; Prometheus scrapes every node's control listener
with its [cluster] node name as `node`; the redis.conf runs, keeps nothing on disk, never
evicts, and takes the password the nodes' URL carries. And the example running on lo
(127.20.0.x for 10.20.0.x, free ports, paths in the test's directory): HAProxy spreads the
sessions with the client's address in PROXY v2, the nodes count one window in Redis, a
drained node leaves HAProxy's rotation and `mta queue transfer` empties it into mx1."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from mta.config import Config, load, split_hostport
from tests.integration.conftest import (
    REPO_ROOT,
    MtaServer,
    free_port,
    run_mta,
    wait_until,
)
from tests.integration.test_metrics import get, sample
from tests.integration.tlscerts import make_pki
from tests.redisserver import REDIS_SERVER

pytestmark = pytest.mark.integration

CLUSTER = Path(REPO_ROOT) / "deploy" / "cluster"
NODES = ("mx1", "mx2", "mx3")
PROMETHEUS = Path(REPO_ROOT) / "deploy" / "prometheus" / "prometheus.yml"


def node_config(name: str) -> Config:
    return load(str(CLUSTER / f"{name}.toml"))


def node_specific_cleared(config: Config) -> Config:
    """The config with what may differ between nodes blanked: name, addresses, source."""
    return dataclasses.replace(
        config, source="",
        server=dataclasses.replace(config.server, hostname=""),
        listener=tuple(dataclasses.replace(li, address=f"*:{li.port}") for li in config.listener),
        cluster=dataclasses.replace(config.cluster, node=""),
        control=dataclasses.replace(config.control, listen="", allowed_hosts=()))


def test_each_node_config_passes_config_check(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")  # the example's /etc/mta/tls files, made here
    for name in NODES:
        text = (CLUSTER / f"{name}.toml").read_text()
        assert "/etc/mta/tls/fullchain.pem" in text and "/etc/mta/tls/privkey.pem" in text
        here = tmp_path / f"{name}.toml"
        here.write_text(text.replace("/etc/mta/tls/fullchain.pem", str(pki.cert))
                        .replace("/etc/mta/tls/privkey.pem", str(pki.key)))
        done = run_mta("config", "check", "-c", str(here), check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert b"configuration OK" in done.stdout


def test_the_nodes_differ_only_in_name_addresses_and_share_one_redis() -> None:
    configs = {name: node_config(name) for name in NODES}
    first = node_specific_cleared(configs["mx1"])
    for name, config in configs.items():
        assert node_specific_cleared(config) == first, f"{name}.toml differs from mx1.toml beyond its node lines"
        assert config.cluster.node == name
        assert config.server.hostname == f"{name}.example.com"
        assert config.control.allowed_hosts == (f"{name}.example.com",)
        host = split_hostport(config.control.listen)[0]
        assert host not in ("127.0.0.1", "0.0.0.0"), "Prometheus and HAProxy reach the control port from elsewhere"
        assert {split_hostport(li.address)[0] for li in config.listener} == {host}
        proxied = {li.port: li for li in config.listener if li.proxy_protocol}
        assert sorted(proxied) == [25, 587]  # what HAProxy sends; 2525 takes the other nodes' transfers
        assert {str(n) for li in proxied.values() for n in li.trusted_proxies} == {"10.20.0.2/32"}
    assert len({c.control.listen for c in configs.values()}) == 3
    assert first.cluster.redis.startswith("redis://") and first.cluster.on_redis_down == "local"
    haproxy = ipaddress.ip_address("10.20.0.2")
    assert not any(haproxy in n for n in first.relay.mynetworks), "HAProxy must not be in mynetworks"
    for config in configs.values():  # every node may relay to every other (mta queue transfer)
        address = ipaddress.ip_address(split_hostport(config.control.listen)[0])
        assert any(address in n for n in first.relay.mynetworks)


def haproxy_backends() -> dict[str, dict[str, list[str]]]:
    """backend name -> {"servers": ["host:port", ...], "default-server": [the line]}."""
    backends: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in (CLUSTER / "haproxy.cfg").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = backends.setdefault(words[1], {"servers": [], "default-server": [], "check": []}) \
                if words[0] == "backend" else None
        elif current is not None and words[0] == "server":
            current["servers"].append(words[2])
        elif current is not None and words[0] == "default-server":
            current["default-server"] = words[1:]
        elif current is not None and words[0] == "http-check":
            current["check"].append(" ".join(words[1:]))
    return backends


def test_haproxy_sends_proxy_v2_to_every_node_listener_and_checks_readyz() -> None:
    configs = [node_config(name) for name in NODES]
    backends = haproxy_backends()
    assert set(backends) == {"mta_smtp", "mta_submission"}
    for backend, port in (("mta_smtp", 25), ("mta_submission", 587)):
        servers = backends[backend]["servers"]
        assert sorted(servers) == sorted(li.address for c in configs for li in c.listener if li.port == port)
        default = backends[backend]["default-server"]
        control_ports = {split_hostport(c.control.listen)[1] for c in configs}
        assert "send-proxy-v2" in default and "check" in default
        assert {int(default[default.index("port") + 1])} == control_ports
        assert backends[backend]["check"] == ["send meth GET uri /readyz", "expect status 200"]
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if haproxy is None:
        pytest.fail("haproxy is missing: apt-get install haproxy (make test-deps)")
    result = subprocess.run([haproxy, "-c", "-f", str(CLUSTER / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_node_control_listener_with_its_node_label() -> None:
    doc = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [job for job in doc["scrape_configs"] if job["job_name"] == "mta"]
    scraped = {target: group["labels"]["node"] for group in job["static_configs"] for target in group["targets"]}
    assert scraped == {node_config(name).control.listen: name for name in NODES}
    assert job["metrics_path"] == "/metrics"


def test_redis_conf_keeps_nothing_on_disk_never_evicts_and_takes_the_nodes_password(tmp_path: Path) -> None:
    """redis-server run with the example's file, only its address moved to a loopback port."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail(f"{REDIS_SERVER} is missing: apt-get install redis-server (make test-deps)")
    url = urlsplit(node_config("mx1").cluster.redis)
    assert (url.hostname, url.port) == ("10.20.0.5", 6379)
    assert re.search(r"^bind 10\.20\.0\.5\b", (CLUSTER / "redis.conf").read_text(), re.MULTILINE)
    port = free_port()
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([REDIS_SERVER, str(CLUSTER / "redis.conf"), "--bind", "127.0.0.1",
                                 "--port", str(port), "--dir", str(tmp_path)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=url.password, socket_timeout=5)
        for _ in range(100):
            if proc.poll() is not None:
                pytest.fail(f"redis-server refused the example's redis.conf: {log.read_text()}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        assert client.ping() is True
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
        client.set("mta:test", "1", ex=10)
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert not list(tmp_path.glob("*.rdb")) and not list(tmp_path.glob("appendonly*")), "Redis wrote to disk"


# --- the example running: three nodes, HAProxy and Redis on loopback addresses ------------

LOOPBACK_NET = "127.20.0."  # 10.20.0.x of the example, on lo: 127.20.0.2 HAProxy, .5 Redis, .11-.13 the nodes
CLIENT = "127.20.0.99"  # a client of the balancer
PORTS = (25, 587, 2525, 9025, 6379)


class Node(MtaServer):
    """A node of the example: its listeners take PROXY headers on 127.20.0.x, so it is ready
    when its control listener says so, not when 127.0.0.1 greets."""

    def _wait_greeting(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while get(self, "/readyz")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not become ready within {timeout} s\n{self.log_tail()}")
            time.sleep(0.1)


def on_loopback(text: str, ports: dict[int, int], paths: dict[str, str]) -> str:
    """An example file moved onto lo: 10.20.0.x -> 127.20.0.x, each port to a free one,
    each /etc or /var path into the test's directory."""
    text = text.replace("10.20.0.", LOOPBACK_NET)
    for port, free in ports.items():
        text = re.sub(rf"(?<=[:\s]){port}\b(?!\.)", str(free), text)
    for path, here in paths.items():
        text = text.replace(path, here)
    return text


def smtp_send(port: int, rcpt: str, n: int) -> str:
    """One message through the balancer from CLIENT; the final reply line."""
    with socket.create_connection((LOOPBACK_NET + "2", port), timeout=20, source_address=(CLIENT, 0)) as sock:
        stream = sock.makefile("rwb")

        def reply() -> str:
            while True:
                line = stream.readline().decode()
                if line[3:4] != "-":
                    return line.strip()

        def say(command: str) -> str:
            stream.write(command.encode() + b"\r\n")
            stream.flush()
            return reply()

        assert reply().startswith("220"), "no greeting through HAProxy"
        assert say("EHLO client.test").startswith("250")
        assert say("MAIL FROM:<sender@client.test>").startswith("250")
        assert say(f"RCPT TO:<{rcpt}>").startswith("250")
        assert say("DATA").startswith("354")
        done = say(f"Subject: cluster {n}\r\nMessage-ID: <c{n}@client.test>\r\n\r\nbody {n}\r\n.")
        say("QUIT")
        return done


def connects_from(node: Node, client: str) -> int:
    """Sessions the node logged from `client` (JSON log lines)."""
    count = 0
    for line in node.log_bytes().decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            count += record.get("event") == "connect" and record.get("client") == client
    return count


def background(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_the_example_runs_behind_haproxy_with_shared_windows_drain_and_transfer(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if haproxy is None or shutil.which(REDIS_SERVER) is None:
        pytest.fail("haproxy and redis-server are needed: make test-deps")
    ports = {port: free_port() for port in PORTS}
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "users").write_text("")
    (tmp_path / "control.token").write_text("t" * 40 + "\n")
    (tmp_path / "control.token").chmod(0o600)
    files: dict[str, Path] = {}
    for name in (*NODES, "haproxy.cfg", "redis.conf"):
        source = CLUSTER / (f"{name}.toml" if name in NODES else name)
        paths = {"/etc/mta/tls/fullchain.pem": str(pki.cert), "/etc/mta/tls/privkey.pem": str(pki.key),
                 "/etc/mta/users": str(tmp_path / "users"), "/etc/mta/control.token": str(tmp_path / "control.token"),
                 "/var/spool/mta": str(tmp_path / name / "spool"), "/var/cache/mta": str(tmp_path / name / "cache"),
                 "/var/lib/mta/metrics": str(tmp_path / name / "metrics")}
        # On lo every address is in 127/8: mynetworks keeps the host's own 127.0.0.1 only, so
        # CLIENT is a stranger to the nodes, as a client on the internet is.
        text = on_loopback(source.read_text(), ports, paths).replace('"127.0.0.0/8"', '"127.0.0.1/32"')
        settings = "\n".join(line.split("#")[0] for line in text.splitlines())
        assert not re.search(r"10\.20\.|/etc/|/var/", settings), f"{name}: a setting was not moved"
        files[name] = tmp_path / source.name
        files[name].write_text(text)
    # HAProxy's connections to lo come from 127.0.0.1 unless told: from its own address, as in production.
    # maxconn 20000 needs 40000 descriptors, beyond a test machine's hard limit (20000 here).
    files["haproxy.cfg"].write_text(files["haproxy.cfg"].read_text().replace(
        "default-server send-proxy-v2", f"default-server source {LOOPBACK_NET}2 send-proxy-v2").replace(
        "maxconn 20000", "maxconn 1000").replace("bind :", f"bind {LOOPBACK_NET}2:"))  # its own host in production
    started: list[subprocess.Popen[bytes]] = []
    nodes: list[Node] = []
    try:
        started.append(background([REDIS_SERVER, str(files["redis.conf"]), "--dir", str(tmp_path)],
                                  tmp_path / "redis.log"))
        for name in NODES:
            (tmp_path / name).mkdir()
            nodes.append(Node(files[name], ports[25], tmp_path / name / "spool", tmp_path / f"{name}.log").start(60))
        started.append(background([haproxy, "-db", "-f", str(files["haproxy.cfg"])], tmp_path / "haproxy.log"))
        time.sleep(5)  # HAProxy's first checks (inter 2s, rise 2) pass
        replies = [smtp_send(ports[25], "postmaster@example.com", n) for n in range(6)]
        assert all(r.startswith("250") for r in replies), replies
        seen = [connects_from(node, CLIENT) for node in nodes]
        assert sum(seen) == 6 and sum(1 for n in seen if n) >= 2, seen  # balanced, the real client seen
        for node, n in zip(nodes, seen):  # a node with mail went through Redis on both sides
            if n:
                wait_until(lambda node=node: all(
                    sample(get(node, "/metrics")[1], "mta_cluster_redis_up", side=side) == 1
                    for side in ("inbound", "delivery")), 30, "Redis up on both sides", node)
        client = redis.Redis(host=LOOPBACK_NET + "5", port=ports[6379], password="change-this-password")
        assert int(client.get(f"mta:rate:conn/ip/{CLIENT}") or 0) == 6  # one window for all nodes
        client.close()

        mx2 = nodes[1]
        mx2.mta("node", "drain")
        assert get(mx2, "/readyz")[0] == 503
        time.sleep(6)  # inter 2s x fall 2: HAProxy takes mx2 out
        before = connects_from(mx2, CLIENT)
        replies = [smtp_send(ports[25], "postmaster@example.com", n) for n in range(6, 12)]
        assert all(r.startswith("250") for r in replies), replies
        assert connects_from(mx2, CLIENT) == before, "HAProxy still sent sessions to the drained node"
        queued = {m["id"] for m in mx2.queue_list()}
        assert len(queued) == before  # the LMTP server of the example is not there: all deferred
        moved = mx2.mta("queue", "transfer", "--to", f"{LOOPBACK_NET}11:{ports[2525]}", "--all")
        assert mx2.queue_list() == [], moved.stderr.decode()
        assert len(nodes[0].queue_list()) == connects_from(nodes[0], CLIENT) + len(queued)
    finally:
        for node in nodes:
            node.stop()
        for proc in started:
            proc.terminate()
            proc.wait(10)
