"""The delivery worker's and the scheduler's per-message system calls, seen by strace.

Python 3.11's asyncio asks the kernel for the pid (getpid) on every get_running_loop():
asyncio.timeout, current_task(), Queue waits, sleep(), ensure_future(), each one per
reply, per job or per write round. Both processes keep their loop instead; this test
holds them there: strace -c on each while 200 messages are relayed to a sink counts
under one getpid per message in the delivery worker (about 10 with an asyncio.timeout
per reply) and under a quarter of one in the scheduler (about 0.6 before).
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
LIMITS = {"delivery#": 1.0, "scheduler": 0.25}  # getpid calls per message, at most


def child(server: MtaServer, title: str) -> int:
    found = [pid for pid, t in children_of(server.master_pid).items() if title in t]
    assert len(found) == 1, found
    return found[0]


def getpid_calls(summary: str) -> int:
    """The getpid count from an `strace -c` summary (0 when it made none)."""
    found = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?getpid$", summary, re.MULTILINE)
    return int(found.group(1)) if found else 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_delivery_and_the_scheduler_rarely_ask_for_their_pid(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"far.test": f"{sink.address}:{sink.port}"})
        asyncio.run(send_all(server.port, [("a@client.test", ["u@far.test"], message(0))]))
        sink.wait_for_messages(1, timeout=20)  # the session and its connection are set up
        outs = {title: tmp_path / f"strace-{title}.txt" for title in LIMITS}
        tracers = [subprocess.Popen(["strace", "-c", "-f", "-e", "trace=getpid", "-o", str(out),
                                     "-p", str(child(server, title))], stderr=subprocess.DEVNULL)
                   for title, out in outs.items()]
        try:
            time.sleep(1.0)  # strace attaches (it says so on stderr, but only with -v)
            mails = [("a@client.test", [f"u{n}@far.test"], message(n)) for n in range(MESSAGES)]
            asyncio.run(send_all(server.port, mails, sessions=10))
            sink.wait_for_messages(1 + MESSAGES, timeout=60)
            wait_until(lambda: server.queue_list() == [], 20, "an empty spool", server)
        finally:
            for tracer in tracers:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=20)
        calls = {title: getpid_calls(out.read_text()) for title, out in outs.items()}
        assert all(calls[title] < limit * MESSAGES for title, limit in LIMITS.items()), \
            f"getpid calls for {MESSAGES} messages: {calls}"
