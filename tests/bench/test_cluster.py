"""bench/run --cluster with tiny numbers, and the check that keeps it honest.

Proves the mode runs end to end on this checkout (two mta nodes per phase, a private
redis-server, the counting sink), that the cluster phase really went through Redis on
every shared path of both nodes while the local phase never touched it, and that a run
whose shared limits did not run, or decided locally, is refused. No speed is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"
LIMITS = ("concurrency", "connection_rate", "message_rate", "rate", "recipient_rate")

pytestmark = pytest.mark.integration


def test_cluster_mode_measures_both_phases_and_counts_redis_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run"), "--cluster", "--messages", "40", "--warmup", "5", "--sessions", "4",
         "--timeout-seconds", "60", "--quiet", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    rows = {row["phase"]: row for row in json.loads(out.read_text())["cluster"]["rows"]}
    assert list(rows) == ["local", "cluster"]
    runs = {phase: row["runs"][0] for phase, row in rows.items()}
    for phase, run in runs.items():
        assert run["ok"] and run["error"] is None, (phase, run["error"])
        result = run["result"]
        assert result["accepted"] == result["arrived"] == 40, phase
        assert result["server_cpu_us_per_message"] > 0 and result["e2e_per_second"] > 0
    local, cluster = runs["local"]["result"], runs["cluster"]["result"]
    assert local["redis_round_trips_per_message"] == 0 and local["redis_calls_by_command"] == {}
    assert local["decisions"] == {"a": {}, "b": {}}
    # Per message at least the three inbound windows (connect, MAIL, RCPT: one script each).
    assert cluster["redis_round_trips_per_message"] >= 3
    assert cluster["redis_calls_by_command"]["evalsha"] >= 3
    for node in ("a", "b"):
        allowed = {key.split(":")[0] for key, n in cluster["decisions"][node].items()
                   if key.endswith(":allowed") and n > 0}
        assert allowed >= set(LIMITS), (node, cluster["decisions"][node])
        assert cluster["decisions"][node]["message_rate:allowed"] == 20  # its half of the messages
    report = done.stdout.decode()
    assert "| local |" in report and "| cluster |" in report and "Redis round trips/msg" in report
    assert "evalsha" in report


def test_a_cluster_run_whose_shared_limits_did_not_run_or_went_local_fails() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from cluster import decisions_check
    finally:
        sys.path.remove(str(BENCH))
    every = {(limit, "allowed"): 10.0 for limit in LIMITS}
    assert decisions_check("cluster", {"a": every, "b": every}) is None
    assert decisions_check("local", {"a": {}, "b": {}}) is None
    missing = decisions_check("cluster", {"a": every, "b": {k: v for k, v in every.items() if k[0] != "rate"}})
    assert missing is not None and "node b" in missing and "rate" in missing
    local = decisions_check("cluster", {"a": {**every, ("message_rate", "local"): 3.0}, "b": every})
    assert local is not None and "Redis was down" in local
    stray = decisions_check("local", {"a": {("concurrency", "allowed"): 1.0}, "b": {}})
    assert stray is not None and "without [cluster]" in stray
