"""The three-node example in deploy/cluster/: each node's mta.toml passes `mta config check`
and differs from the others only where a node must; HAProxy's servers, health checks and
PROXY headers match the nodes' listeners; Prometheus scrapes every node's control listener
with its [cluster] node name as `node`; the redis.conf runs, keeps nothing on disk, never
evicts, and takes the password the nodes' URL carries."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from mta.config import Config, load, split_hostport
from tests.integration.conftest import REPO_ROOT, free_port, run_mta
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
    assert re.search(r"^bind 10\.20\.0\.5\b", (CLUSTER / "redis.conf").read_text(), re.M)
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
