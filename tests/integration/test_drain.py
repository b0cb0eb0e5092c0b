"""Every worker kind's process life (workers/process.py) with real processes: a delivery
in progress at SIGTERM finishes and is recorded once, a blocked scheduler or delivery
worker leaves its stack in the log, SIGHUP reloads the control process in place."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_admin_api import bearer, call
from tests.integration.test_delivery import delivering, message, send_all
from tests.integration.test_master import children_of

pytestmark = pytest.mark.integration


def child(server: MtaServer, kind: str) -> int | None:
    """The pid of the server's `kind` child (`scheduler`, `delivery`, `control`), READY."""
    for pid, title in children_of(server.master_pid).items():
        if f"{kind}#" in title and re.search(rb'event=ready child="%s#\d+ gen\d+" child_pid=%d' % (kind.encode(), pid),
                                             server.log_bytes()):
            return pid
    return None


def test_a_delivery_in_progress_at_sigterm_completes_once(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", delay_seconds=2) as sink:  # answers each final dot after 2 s
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"})
        [msgid] = asyncio.run(send_all(server.port, [("a@client.test", ["u@remote.test"], message(1))]))
        sink.wait_until(lambda: "DATA" in sink.verbs(), 10)
        time.sleep(0.5)  # the content is out; the sink holds its reply
        assert sink.messages == []  # (recorded when it replies)
        os.kill(server.master_pid, signal.SIGTERM)
        stopped = time.monotonic()
        assert server.proc is not None
        assert server.proc.wait(20) == 0
        assert time.monotonic() - stopped < 10  # the delivery's 2 s, not the 30 s drain timeout
        server.proc = None
        log = server.log_bytes().decode()
        assert f"event=delivered msgid={msgid} rcpt=u@remote.test" in log, server.log_tail()
        assert "event=deferred" not in log
        assert len(sink.messages) == 1
        assert server.spool_snapshot().envelopes == {}  # the outcome was written before the scheduler exited

        server.start()  # nothing left to deliver: no second copy
        wait_until(lambda: child(server, "delivery"), 15, "a delivery worker", server)
        with pytest.raises(TimeoutError):
            sink.wait_for_messages(2, timeout=4)
        assert server.queue_list() == []


def test_a_delivery_longer_than_the_drain_timeout_is_cut_at_the_deadline_and_stays_queued(mta_server) -> None:
    with SmtpSink("127.0.0.2", delay_seconds=60) as sink:
        server = mta_server(server={"inbound_workers": 1, "drain_timeout_seconds": 2},
                            relay={"relay_domains": ["remote.test"], "mynetworks": ["127.0.0.1/32"]},
                            delivery={"workers": 1}, routes={"remote.test": f"{sink.address}:{sink.port}"})
        [msgid] = asyncio.run(send_all(server.port, [("a@client.test", ["u@remote.test"], message(1))]))
        sink.wait_until(lambda: "DATA" in sink.verbs(), 10)
        time.sleep(0.5)
        os.kill(server.master_pid, signal.SIGTERM)
        stopped = time.monotonic()
        assert server.proc is not None
        assert server.proc.wait(20) == 0
        # At the deadline the connection is dropped (no QUIT the sink would not read),
        # well before the master's own limit (drain timeout + 5 s) kills anyone.
        assert time.monotonic() - stopped < 2 + 2
        server.proc = None
        assert "killing_children" not in server.log_bytes().decode()
        [envelope] = server.spool_snapshot().envelopes.values()
        assert envelope.id == msgid and envelope.recipients[0].state == "ready"
        assert envelope.recipients[0].attempts == 0  # no outcome: delivered again after the restart


@pytest.mark.parametrize("kind", ["delivery", "scheduler"])
def test_a_blocked_worker_leaves_its_stack_in_the_log(mta_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str) -> None:
    monkeypatch.setenv("MTA_TEST_HOOKS", "1")
    server = mta_server(server={"inbound_workers": 1, "heartbeat_timeout_seconds": 2}, delivery={"workers": 1})
    victim = wait_until(lambda: child(server, kind), 15, f"a ready {kind}", server)
    os.kill(victim, signal.SIGUSR2)  # the hook: time.sleep(3600) on its event loop
    wait_until(lambda: b'child_pid=%d status="signal SIGABRT"' % victim in server.log_bytes(), 15,
               f"the {kind}'s SIGABRT", server)
    log = server.log_bytes().decode()
    assert re.search(rf'event=heartbeat_lost child="{kind}#1 gen1" child_pid={victim}', log)
    stack = log[log.index("Fatal Python error: Aborted"):]
    # faulthandler's dump of every thread; the blocked one ends in the hook, and its
    # first frames are this kind's run() (so the stack is that process's).
    assert re.search(r"Current thread 0x[0-9a-f]+ \(most recent call first\):\n", stack), stack[:2000]
    assert re.search(r'  File ".*workers/process\.py", line \d+ in _block_loop_for_tests\n', stack), stack[:2000]
    assert re.search(rf'  File ".*workers/{kind}/main\.py", line \d+ in run\n', stack), stack[:2000]
    wait_until(lambda: (pid := child(server, kind)) and pid != victim, 15, f"a new {kind}", server)


def test_sighup_reloads_the_control_process_in_place(mta_server) -> None:
    server = mta_server()
    control = wait_until(lambda: child(server, "control"), 15, "the control process", server)
    assert call(server, "GET", "/readyz")[0] == 200
    assert server.config_path is not None
    text = server.config_path.read_text()
    server.config_path.write_text(text.replace("[control]\n", '[control]\ntoken = "reloaded-token-0123456789"\n'))
    os.kill(server.master_pid, signal.SIGHUP)
    wait_until(lambda: re.search(rb"proc=control pid=%d event=reload " % control, server.log_bytes()), 10,
               "the control process's reload", server)
    assert call(server, "GET", "/api/queue", headers=bearer("reloaded-token-0123456789"))[0] == 200
    assert child(server, "control") == control  # the same process: /readyz never went away
    assert b'exited child="control' not in server.log_bytes()
