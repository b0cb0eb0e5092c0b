"""The deploy files: every metric the dashboard and the alerts query is one a running mta
really exports; the alert rules pass promtool; the systemd unit reloads and stops as the
master expects."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.integration.conftest import REPO_ROOT, MtaServer, SmtpClient, wait_until
from tests.integration.dns_fixtures import dns_server  # noqa: F401
from tests.integration.dns_server import DnsServer
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import mailbox, message, send_all
from tests.integration.test_delivery_mx import mx_relay, shared_port
from tests.integration.test_master import inbound_workers
from tests.integration.test_metrics import get, sample
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

DEPLOY = Path(REPO_ROOT) / "deploy"
DASHBOARD = DEPLOY / "grafana" / "mta.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
UNIT = DEPLOY / "systemd" / "mta.service"
METRIC = re.compile(r"\bmta_[a-z0-9_]+")


# --- expressions ---------------------------------------------------------------------------

def _exprs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs_in(item)


def dashboard_exprs() -> list[str]:
    return list(_exprs_in(json.loads(DASHBOARD.read_text())))


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"] if "expr" in rule]


def exported_names(exposition: str) -> set[str]:
    """Names as they appear in the exposition: samples, plus the HELP/TYPE lines (a labelled
    family is announced there), plus _bucket/_sum/_count of every histogram announced."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            parts = line.split()
            names.add(parts[2])
            if line.startswith("# TYPE ") and len(parts) > 3 and parts[3] == "histogram":
                names.update(parts[2] + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_files_hold_expressions() -> None:
    dash = dashboard_exprs()
    alerts = alert_exprs()
    assert len(dash) >= 15 and len(alerts) >= 6
    used = {name for expr in dash for name in METRIC.findall(expr)}
    wanted = {  # what the dashboard must show (the brief)
        "mta_inbound_messages_total", "mta_delivery_recipients_total", "mta_queue_recipients",
        "mta_queue_messages", "mta_queue_oldest_message_age_seconds", "mta_scheduler_bounces_total",
        "mta_inbound_rejected_total", "mta_delivery_latency_seconds_bucket", "mta_dns_cache_hits_total",
        "mta_dns_cache_misses_total", "mta_master_children", "mta_master_restarts_total",
        "mta_queue_commit_seconds_bucket", "mta_inbound_active_sessions", "mta_queue_stored_bytes",
        "mta_queue_limit_bytes"}
    assert wanted <= used, wanted - used
    documented = set(re.findall(r"`(mta_[a-z0-9_]+)`", (Path(REPO_ROOT) / "docs" / "metrics.md").read_text()))
    for name in used | {n for e in alerts for n in METRIC.findall(e)}:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in documented or base in documented, f"{name} is not in docs/metrics.md"


def defined_series() -> dict[str, tuple[str, ...]]:
    """Every series name mta/metrics.py defines (a counter's with _total, a histogram's
    _bucket/_sum/_count; _bucket also takes `le`), with the label names it carries."""
    import mta.metrics
    from prometheus_client.metrics import MetricWrapperBase
    series: dict[str, tuple[str, ...]] = {}
    for metric in vars(mta.metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = tuple(metric._labelnames)
        if metric._type == "counter":
            series[metric._name + "_total"] = labels
        elif metric._type == "histogram":
            series.update({metric._name + "_bucket": (*labels, "le"), metric._name + "_sum": labels,
                           metric._name + "_count": labels})
        else:
            series[metric._name] = labels
    return series


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"]]


def test_the_dashboard_picks_nodes_by_the_node_label_prometheus_gives_them() -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert "instance" not in variables
    assert variables["node"]["query"]["query"] == "label_values(mta_master_children, node)"
    assert variables["node"]["includeAll"] and variables["node"]["allValue"] == ".*"
    for expr in dashboard_exprs():
        assert "$instance" not in expr and "by (instance" not in expr, expr
        selectors = re.findall(r"\bmta_[a-z0-9_]+(\{[^}]*\})?", expr)
        assert selectors and all('node=~"$node"' in s for s in selectors), f"not filtered by $node: {expr}"
    prometheus = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert re.search(r"labels: \{service: mta, node: mx1\}", prometheus)


def test_the_cluster_row_shows_redis_and_the_shared_limits_as_mta_defines_them() -> None:
    panels = dashboard_panels()
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    assert [panels[i]["title"] for i in rows] == ["Cluster"]
    cluster = [t["expr"] for p in panels[rows[0] + 1:] for t in p["targets"]]
    used = {name for expr in cluster for name in METRIC.findall(expr)}
    assert used == {"mta_cluster_redis_up", "mta_cluster_redis_outages_total",
                    "mta_cluster_shared_decisions_total", "mta_cluster_lease_wait_seconds_bucket"}
    defined = defined_series()
    for expr in cluster:
        for name in METRIC.findall(expr):
            assert name in defined, f"{name} is not defined in mta/metrics.py"
        for grouping in re.findall(r"by \(([^)]*)\)", expr):  # every label grouped by exists
            for label in (g.strip() for g in grouping.split(",")):
                assert label == "node" or any(label in defined[n] for n in METRIC.findall(expr)), (label, expr)
    assert any("histogram_quantile(0.99" in e for e in cluster)
    assert any("by (limit, result)" in e for e in cluster)
    assert all(p["gridPos"]["y"] > panels[rows[0]]["gridPos"]["y"] for p in panels[rows[0] + 1:])


# Counted only after an event the test does not cause (a Redis outage); the cluster row
# test checks that mta/metrics.py defines them.
EXPORTED_AFTER_AN_EVENT = {"mta_cluster_redis_outages_total"}


def test_every_queried_metric_is_exported_by_a_running_mta(mta_server, tmp_path: Path, redis_server: RedisServer,  # noqa: F811
                                                           dns_server: DnsServer) -> None:  # noqa: F811
    port = shared_port(["127.0.0.2"])
    with SmtpSink("127.0.0.2", port) as sink:
        dns_server.mx("remote.test", (10, "mx.remote.test"), ttl=300)
        dns_server.host("mx.remote.test", "127.0.0.2", ttl=300)
        # No connection kept between messages: the second message's session looks the MX
        # up again (a DNS cache hit) instead of riding the first one's connection.
        server: MtaServer = mx_relay(mta_server, tmp_path, dns_server, port, ["remote.test"],
                                     delivery={"connection_idle_seconds": 0},
                                     policy={"dnsbl": ["bl.test"]},  # exports the DNSBL series
                                     cluster={"redis": redis_server.url, "node": "mx1"})  # the cluster row
        mailbox(tmp_path, "local.test", "sender")
        wait_until(lambda: get(server, "/readyz")[0] == 200, 10, "the control process", server)
        # one at a time: the first MX lookup misses the DNS cache, the second hits it
        asyncio.run(send_all(server.port, [("sender@local.test", ["a@remote.test"], message(1))]))
        sink.wait_for_messages(1, timeout=15)
        asyncio.run(send_all(server.port, [
            ("sender@local.test", ["b@remote.test", "r550-c@remote.test"], message(2)),  # a bounce
            ("x@client.test", ["sender@local.test"], message(3))]))                      # Maildir

        async def refused() -> None:
            client = await SmtpClient.connect(server.port)
            await client.command("MAIL FROM:<x@client.test>")
            assert (await client.command("RCPT TO:<nobody@local.test>")).code == 550
            await client.close()
        asyncio.run(refused())
        victim = min(inbound_workers(server.master_pid))  # a restart for mta_master_restarts_total
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: sample(get(server, "/metrics")[1], "mta_master_restarts_total", kind="inbound") >= 1
                   and sample(get(server, "/metrics")[1], "mta_scheduler_bounces_total") >= 1
                   and sample(get(server, "/metrics")[1], "mta_dns_cache_hits_total") >= 1,
                   40, "restart, bounce and cache hit counted", server)
        status, text = get(server, "/metrics")
        assert status == 200
    exported = exported_names(text)
    missing: dict[str, list[str]] = {}
    for source, exprs in (("deploy/grafana/mta.json", dashboard_exprs()),
                          ("deploy/prometheus/alerts.yml", alert_exprs())):
        for expr in exprs:
            names = METRIC.findall(expr)
            for name in names:
                if name not in exported and name not in EXPORTED_AFTER_AN_EVENT:
                    missing.setdefault(f"{source}: {name}", []).append(expr)
    assert not missing, f"queried but not exported: {json.dumps(missing, indent=1)}\nexported: {sorted(exported)}"


def test_promtool_accepts_the_rules_and_the_config() -> None:
    promtool = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin:/usr/local/bin")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; add it to TEST_DEBS in the Makefile)")
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_systemd_unit_reloads_with_hup_and_stops_the_master_first() -> None:
    unit: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            unit.setdefault(key.strip(), []).append(value.strip())
    assert any("kill -HUP $MAINPID" in v for v in unit["ExecReload"]), unit["ExecReload"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Type"] == ["simple"]
    assert unit["ExecStart"] == ["/usr/local/bin/mta serve -c /etc/mta/mta.toml"]
    # systemd SIGKILLs the cgroup after TimeoutStopSec: it must outlast the drain (30 s default)
    assert int(unit["TimeoutStopSec"][0]) > 30
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert "PROMETHEUS_MULTIPROC_DIR" not in "".join(unit.get("Environment", []))


def test_haproxy_config_is_valid_when_haproxy_is_installed() -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    cfg = DEPLOY / "haproxy" / "haproxy.cfg"
    text = cfg.read_text()
    assert "send-proxy-v2" in text and "uri /readyz" in text and "check port 9025" in text
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    result = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
