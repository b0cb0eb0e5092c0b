"""A real Prometheus (Debian `prometheus`, installed by `make test`) scrapes a running mta."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import SmtpClient, free_port, queued_id
from tests.integration.test_metrics import control_url

pytestmark = pytest.mark.integration


def test_prometheus_scrapes_the_accepted_messages_counter(mta_server, tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: `make test` installs it")
        pytest.skip("prometheus is not installed (Debian package `prometheus`; make test installs it)")
    server = mta_server()
    target = control_url(server, "").removeprefix("http://")

    async def three() -> None:
        client = await SmtpClient.connect(server.port)
        for n in range(3):
            assert queued_id(await client.send_mail("a@client.test", [f"u{n}@local.test"], b"Subject: p\r\n\r\nx\r\n"))
        await client.close()
    asyncio.run(three())

    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mta\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    query = urllib.parse.urlencode({"query": 'sum(mta_inbound_messages_total{job="mta"})'})
    value = None
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and value != 3.0:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=2) as r:
                    result = json.loads(r.read())["data"]["result"]
            except OSError:
                continue
            value = float(result[0]["value"][1]) if result else None
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    assert value == 3.0, (tmp_path / "prometheus.log").read_text()[-2000:]
