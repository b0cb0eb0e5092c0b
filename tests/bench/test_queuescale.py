"""bench/run --queue-scale at a tiny N, and the counting sink's tell-apart mode it relies on.

Proves the mode runs end to end on this checkout (fill, restart, idle, views, ingest,
drain) and that what it reports holds: every filled message arrives exactly once, and
a repeat would be seen. No speed is asserted.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"
MTA_PROCESSES = {"master", "inbound#1", "scheduler#1", "delivery#1", "control#1"}

pytestmark = pytest.mark.integration


def test_queue_scale_fills_restarts_and_drains_every_message_once(tmp_path: Path) -> None:
    out = tmp_path / "queue-scale.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run"), "--queue-scale", "200", "--idle-seconds", "1", "--due-at-start", "20",
         "--messages", "100", "--warmup", "10", "--sessions", "10", "--quiet", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    reference, row = json.loads(out.read_text())["queue_scale"]["rows"]

    assert reference["queued"] == 0 and "fill" not in reference and "drain" not in reference
    assert reference["ingest"]["accepted"] == 100 and reference["ingest"]["e2e_per_second"] is not None

    assert row["fill"]["messages"] == 200 and row["fill"]["due_now"] == 20
    # Started on the filled spool: greeted, the scheduler loaded, the due ones went out first.
    assert row["greeting_seconds"] is not None and row["scheduler_ready_seconds"] is not None
    assert row["first_dispatch_seconds"] is not None and row["due_arrived_seconds"] is not None
    assert MTA_PROCESSES <= set(row["after_start"]) and MTA_PROCESSES <= set(row["idle"]["cpu_share"])
    assert all(v > 0 for v in row["idle"]["rss_anon_bytes"].values())
    # Each view is measured and answered, or not built in this checkout (then not run).
    for view in row["views"].values():
        assert view is None or view["status"] in (0, 200), view
    assert row["ingest"]["accepted"] == 100 and row["ingest"]["arrived"] == 100
    # The destination came back: every filled message at the sink, none twice.
    drained = row["drain"]
    assert drained["retry"]["status"] == 0
    assert drained["arrived_distinct"] == 200 and drained["duplicates"] == 0 and not drained["timed_out"]
    assert drained["remaining"] == 180 and drained["per_second"] is not None

    report = done.stdout.decode()
    assert "| 0 (reference) |" in report and "| 200 |" in report and "200/200 / 0" in report
    assert "mta queue retry --domain scale.test" in report


def test_counting_sink_tells_messages_apart_by_header_and_counts_repeats(tmp_path: Path) -> None:
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(BENCH / "sink.py"), "--port", str(port), "--count",
                             "--ids", "X-Bench-Fill"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                assert time.monotonic() < deadline, "the sink did not listen"
                time.sleep(0.05)
        with client:
            for value in ("a-1", "a-2", "a-1", None):  # a-1 twice; one message without the header
                header = f"X-Bench-Fill: {value}\r\n" if value else ""
                client.sendmail("s@client.test", ["u@scale.test"],
                                f"From: <s@client.test>\r\n{header}Subject: x\r\n\r\n.dot line\r\nbody\r\n")
    finally:
        sink.terminate()
        stdout, _ = sink.communicate(timeout=10)
    assert stdout.split(b"\r")[-2] == b"mesg=4 ids=2 dups=1"
