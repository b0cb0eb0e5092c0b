"""The soak's processes: the mta under test, and the next hop that defers everything.

Mta: `python3 -m mta serve` in its own session (procs.Server), configured for the
soak (mtaconf base, `hostname = "mta.soak"`): soak.test routed to the counting sink,
defer.test to the DeferPeer, one delivery worker with short back-offs (15-60 s),
[control] on its own loopback port (its /metrics, and the admin API the soak deletes
through, with a bearer token of this run's), a dead [dns]. It reports its processes by title (master, inbound#N,
scheduler#1, ...), its metrics, and its spool's size on disk.

DeferPeer: smtp-sink answering 450 to every RCPT (`-r RCPT`), or, without
smtp-sink, a port where nothing listens (connection refused: deferred as well).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from mtaconf import dead_dns, mta_launch, write_config
from peers import SMTP_SINK
from procs import HOST, Server, free_port, greets, kill_pids, log, wait_greeting
from procstat import mta_processes

SINK_DOMAIN: Final = "soak.test"
DEFER_DOMAIN: Final = "defer.test"
STOP_GRACE_SECONDS: Final = 15.0  # above the config's drain_timeout_seconds
HTTP_TIMEOUT_SECONDS: Final = 10.0
SPOOL_FILES: Final = ("data.mdb", "lock.mdb")
METRIC_LINE: Final = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)")


class Mta:
    """mta in its own session; stopped by process group."""

    def __init__(self, workdir: Path, workers: int, sink_port: int, defer_port: int):
        self.port = free_port()
        self.control_port = free_port()
        self.spool = workdir / "spool"
        self.workers = workers
        self._token = secrets.token_urlsafe(32)  # the admin API always wants one
        config = write_config(
            workdir, self.port, workers, hostname="mta.soak",
            relay={"relay_domains": [SINK_DOMAIN, DEFER_DOMAIN]},
            delivery={"workers": 1, "min_backoff_seconds": 15, "max_backoff_seconds": 60},
            **{f'domains."{SINK_DOMAIN}"': {"concurrency": 20},
               "routes": {SINK_DOMAIN: f"{HOST}:{sink_port}", DEFER_DOMAIN: f"{HOST}:{defer_port}"},
               "dns": dead_dns(),
               "control": {"listen": f"{HOST}:{self.control_port}", "metrics_dir": str(workdir / "metrics"),
                           "token": self._token}})
        launch = mta_launch(config, workers)
        launch.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # mta serve sets it from metrics_dir
        # No proxy for our own loopback HTTP (urllib honours *_proxy variables).
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.server = Server("mta", launch, workdir, self.port, stop_grace_seconds=STOP_GRACE_SECONDS)
        self.proc = self.server.proc

    def expected_titles(self) -> set[str]:
        return {"master", "scheduler#1", "delivery#1", "control#1",
                *(f"inbound#{n}" for n in range(1, self.workers + 1))}

    def processes(self) -> dict[str, int]:
        """Title (without the generation) -> pid, for every mta process of the group."""
        return mta_processes(self.proc.pid)

    def wait_ready(self, timeout: float, stop: threading.Event) -> str | None:
        """None once it greets, serves /metrics and runs every expected process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop.is_set():
                return "interrupted while starting"
            if self.proc.poll() is not None:
                return f"mta exited with status {self.proc.returncode} while starting"
            if (greets(self.port) and self.expected_titles() <= set(self.processes())
                    and self.scrape() is not None):
                return None
            time.sleep(0.2)
        return (f"not ready within {timeout:.0f}s (greeting on {HOST}:{self.port}, /metrics "
                f"on {HOST}:{self.control_port}, processes {sorted(self.expected_titles())})")

    def scrape(self) -> dict[str, float] | None:
        """name or name{labels} -> value from /metrics; None if it does not answer."""
        try:
            with self._http.open(f"http://{HOST}:{self.control_port}/metrics",
                                 timeout=HTTP_TIMEOUT_SECONDS) as answer:
                text = answer.read().decode(errors="replace")
        except (OSError, urllib.error.URLError):
            return None
        values = {}
        for line in text.splitlines():
            match = METRIC_LINE.match(line)
            if match:
                try:
                    values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
                except ValueError:
                    continue  # not a sample line
        return values

    def delete_domain(self, domain: str) -> int | str:
        """POST /api/queue/delete {"domain": ...}: the count deleted, or why it failed."""
        request = urllib.request.Request(
            f"http://{HOST}:{self.control_port}/api/queue/delete", method="POST",
            data=json.dumps({"domain": domain}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
        try:
            with self._http.open(request, timeout=HTTP_TIMEOUT_SECONDS) as answer:
                return int(json.loads(answer.read())["count"])
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}: {exc.read()[:200]!r}"
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            return repr(exc)

    def spool_bytes(self) -> tuple[int, int]:
        """(on disk: st_blocks * 512, apparent: st_size) of the LMDB files, summed."""
        disk = apparent = 0
        for name in SPOOL_FILES:
            try:
                st = os.stat(self.spool / name)
            except FileNotFoundError:
                continue
            disk += st.st_blocks * 512
            apparent += st.st_size
        return disk, apparent

    def alive(self) -> bool:
        return self.server.alive()

    def stop(self) -> None:
        """SIGTERM the process group (the master drains), SIGKILL what is left."""
        self.server.stop()

    def stderr_tail(self) -> str:
        return self.server.log_tail()


class DeferPeer:
    """The next hop of defer.test: smtp-sink answering 450 to every RCPT, or, without
    smtp-sink, a port where nothing listens (connection refused: deferred as well)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        if not SMTP_SINK.exists():
            self.kind = "closed port (connection refused)"
            return
        argv = [str(SMTP_SINK), *(["-u", "nobody"] if os.geteuid() == 0 else []),
                "-r", "RCPT", f"{HOST}:{self.port}", "256"]
        with open(workdir / "defer-sink.stderr", "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        self.kind = "smtp-sink -r RCPT (450 to every RCPT)"

    def wait_ready(self, timeout: float) -> str | None:
        if self.proc is None:
            return None
        why = wait_greeting(self.port, timeout, self.proc)
        return None if why is None else f"smtp-sink: {why}"

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
            kill_pids([self.proc.pid], sig)
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
        log(f"smtp-sink pid {self.proc.pid} did not exit after SIGKILL")
