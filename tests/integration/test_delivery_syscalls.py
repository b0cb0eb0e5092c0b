"""The delivery worker's per-message system calls, seen by strace on the running worker.

Python 3.11's asyncio asks the kernel for the pid (getpid) on every get_running_loop():
asyncio.timeout, current_task(), Queue waits, each one per reply or per job. The worker
keeps its loop instead; this test holds it there: strace -c on the delivery worker
while it relays 200 messages to a sink counts under one getpid per message (it was
about 11 per message with an asyncio.timeout per reply).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, message, send_all
from tests.integration.test_master import children_of

pytestmark = pytest.mark.integration

MESSAGES = 200


def delivery_worker(server: MtaServer) -> int:
    found = [pid for pid, title in children_of(server.master_pid).items() if "delivery#" in title]
    assert len(found) == 1, found
    return found[0]


def getpid_calls(summary: str) -> int:
    """The getpid count from an `strace -c` summary (0 when it made none)."""
    found = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?getpid$", summary, re.MULTILINE)
    return int(found.group(1)) if found else 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_delivery_asks_for_its_pid_less_than_once_per_message(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"far.test": f"{sink.address}:{sink.port}"})
        asyncio.run(send_all(server.port, [("a@client.test", ["u@far.test"], message(0))]))
        sink.wait_for_messages(1, timeout=20)  # the session and its connection are set up
        out = tmp_path / "strace.txt"
        tracer = subprocess.Popen(["strace", "-c", "-f", "-e", "trace=getpid", "-o", str(out),
                                   "-p", str(delivery_worker(server))], stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)  # strace attaches (it says so on stderr, but only with -v)
            mails = [("a@client.test", [f"u{n}@far.test"], message(n)) for n in range(MESSAGES)]
            asyncio.run(send_all(server.port, mails, sessions=10))
            sink.wait_for_messages(1 + MESSAGES, timeout=60)
            wait_until(lambda: server.queue_list() == [], 20, "an empty spool", server)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=20)
        calls = getpid_calls(out.read_text())
        assert calls < MESSAGES, f"{calls} getpid calls for {MESSAGES} messages:\n{out.read_text()}"
