"""bench/run --content with tiny numbers, and the check that keeps it honest.

Proves the mode runs end to end on this checkout (a fresh mta per configuration, the
real clamd and libmilter peers, the slow-milter part) and that every configuration's
stages really ran, as mta's own counters say; and that a run whose stage did nothing,
or something else, is refused. No speed is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"
CONFIGS = ["none", "attachments", "antivirus", "milter", "footer", "dkim-rsa", "dkim-ed25519", "all", "milter-slow"]

pytestmark = pytest.mark.integration


def test_content_mode_measures_every_configuration_with_its_stages_checked(tmp_path: Path) -> None:
    out = tmp_path / "content.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run"), "--content", "--messages", "20", "--warmup", "3", "--sessions", "4",
         "--slow-milter-sessions", "8", "--slow-milter-rounds", "2", "--quiet", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    doc = json.loads(out.read_text())["content"]
    assert 10000 <= doc["message_bytes"] <= 10600
    rows = {row["config"]: row for row in doc["rows"]}
    assert list(rows) == CONFIGS
    for config, row in rows.items():
        (run,) = row["runs"]
        assert run["ok"] and run["error"] is None, (config, run["error"])
        result = run["result"]
        messages = 16 if config == "milter-slow" else 20
        assert result["accepted"] == messages, config
        assert result["server_cpu_us_per_message"] > 0
    decisions = {config: rows[config]["runs"][0]["result"]["decisions"] for config in CONFIGS}
    assert decisions["none"] == {}
    assert decisions["attachments"] == {"attachments:pass": 20}
    assert decisions["antivirus"] == {"antivirus:clean": 20}
    assert decisions["milter"] == {"milter:changed": 20}
    assert decisions["footer"] == {"footer:added": 20}
    assert decisions["dkim-rsa"] == decisions["dkim-ed25519"] == {"dkim:signed": 20}
    assert decisions["all"] == {"attachments:pass": 20, "antivirus:clean": 20, "milter:changed": 20,
                                "footer:added": 20, "dkim:signed": 20}
    slow = rows["milter-slow"]["runs"][0]["result"]
    assert decisions["milter-slow"] == {"milter:changed": 16}
    assert slow["overlapped_per_second"] == 40 and slow["serial_per_second"] == 5

    report = done.stdout.decode()
    assert "| dkim-ed25519 |" in report and "| all |" in report
    assert "Milter round trips off the event loop" in report and "of N / delay" in report


def test_a_stage_that_did_not_run_or_decided_otherwise_fails_the_run() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from content import decisions_check
    finally:
        sys.path.remove(str(BENCH))
    before = {("milter", "changed"): 5.0}
    assert decisions_check("milter", before, {("milter", "changed"): 25.0}, 20) is None
    assert decisions_check("none", {}, {}, 20) is None
    silent = decisions_check("footer", {}, {}, 20)
    assert silent is not None and "counted nothing" in silent and "footer:added=20" in silent
    failed = decisions_check("milter", before, {("milter", "changed"): 15.0, ("milter", "failed"): 10.0}, 20)
    assert failed is not None and "milter:failed=10" in failed
    stray = decisions_check("dkim-rsa", {}, {("dkim", "signed"): 20.0, ("footer", "added"): 20.0}, 20)
    assert stray is not None and "footer:added=20" in stray


def test_a_slow_milter_whose_waits_queue_up_fails_the_run() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from content import overlap_check
    finally:
        sys.path.remove(str(BENCH))
    assert overlap_check(64.0, 20) is None  # 20 sessions x 0.2 s, overlapped: up to 100 msg/s
    blocked = overlap_check(5.0, 20)  # one wait at a time: 1 / 0.2 s
    assert blocked is not None and "did not overlap" in blocked and "100 msg/s" in blocked
