"""The inbound worker's system calls per session, seen from the kernel (strace -f): how
replies leave (one write per group, at once for a client that waits, the close after
QUIT) and no getpid() in the session's own path.

Replies: the server runs under strace; clients one after another:
- a pipelined group that waits for the commit (MAIL, RCPT, BDAT LAST with its data, in
  one packet): its three replies, in order, in one write, after the commit;
- a client that does not pipeline (each command alone, waiting for its reply): each reply
  comes without the client sending more;
- QUIT, alone and followed by more input: the client reads 221 and the end of the
  connection, never a reset; after a QUIT alone the socket is closed at once (no
  half-close and wait for the client's EOF), after QUIT and more it lingers as before.

Event log lines: written once per turn of the worker's loop, so the lines one batch of
input makes (two recipients refused in one pipelined group) leave in one write; but a
message's received line is written before its 250 leaves.

getpid: CPython 3.11's asyncio.get_running_loop() (and current_task, asyncio.timeout,
sleep, wait_for, Future() without a loop) asks the kernel for the pid on every call; the
session uses the worker's loop kept in its WorkerContext instead.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id
from tests.integration.test_fsync import Syscall, parse_strace
from workers.link import HEARTBEAT_SECONDS, LOAD_REPORT_SECONDS

pytestmark = pytest.mark.integration

REPLY_SECONDS = 5.0  # a reply the client waits for comes long before this
CONTENT = b"Subject: chunked\r\n\r\none chunk\r\n"


def _socket_calls(calls: list[Syscall], marker: str) -> list[Syscall]:
    """The calls on the socket of the session whose replies include `marker` (by the socket's
    inode, strace -y: descriptor numbers are reused by later sessions)."""
    marked = next(c for c in calls if c.name in ("write", "writev") and marker in c.text)
    return [c for c in calls if c.path == marked.path]


async def _reply_within(client: SmtpClient, line: str) -> str:
    client.writer.write(line.encode() + b"\r\n")
    return str(await asyncio.wait_for(client.read_reply(), REPLY_SECONDS))


async def _sessions(port: int) -> dict[str, str]:
    found: dict[str, str] = {}
    pipelined = await SmtpClient.connect(port)
    pipelined.writer.write(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@local.test>\r\n"
                           + f"BDAT {len(CONTENT)} LAST\r\n".encode() + CONTENT)
    got = [await asyncio.wait_for(pipelined.read_reply(), REPLY_SECONDS) for _ in range(3)]
    assert [r.code for r in got] == [250, 250, 250], got
    assert got[0].text.startswith("2.1.0") and got[1].text.startswith("2.1.5"), got
    found["bdat"] = queued_id(got[2]) or ""
    assert found["bdat"], got
    assert (await _reply_within(pipelined, "QUIT")).startswith("221 ")
    assert await asyncio.wait_for(pipelined.reader.read(), REPLY_SECONDS) == b""  # closed, no reset
    pipelined.writer.close()

    waiting = await SmtpClient.connect(port)
    assert (await _reply_within(waiting, "MAIL FROM:<c@client.test>")).startswith("250 2.1.0")
    assert (await _reply_within(waiting, "RCPT TO:<d@local.test>")).startswith("250 2.1.5")
    assert (await _reply_within(waiting, "DATA")).startswith("354 ")
    last = await _reply_within(waiting, "Subject: one by one\r\n\r\nbody\r\n.")
    assert last.startswith("250 2.0.0 Ok: queued as "), last
    found["waiting"] = last.rsplit(" ", 1)[-1]
    waiting.writer.write(b"QUIT\r\nNOOP\r\n")  # more after QUIT: the server lingers, never resets
    assert str(await asyncio.wait_for(waiting.read_reply(), REPLY_SECONDS)).startswith("221 ")
    assert await asyncio.wait_for(waiting.reader.read(), REPLY_SECONDS) == b""
    waiting.writer.close()
    return found


def test_replies_leave_once_per_group_at_once_when_awaited_and_quit_closes_at_once(
        mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not on PATH (`make test-deps` installs it)")
    trace_path = tmp_path / "strace.txt"
    server = mta_server(wrapper=[strace, "-f", "-tt", "-y", "-s", "4096", "-e",
                                 "trace=write,writev,read,shutdown,close", "-o", str(trace_path)])
    ids = asyncio.run(_sessions(server.port))
    assert server.stop() == 0, server.log_tail()
    calls = parse_strace(trace_path.read_text(errors="replace"))

    bdat = _socket_calls(calls, f"queued as {ids['bdat']}")
    replies = [c for c in bdat if c.name in ("write", "writev")]
    group = next(c for c in replies if ids["bdat"] in c.text)
    assert group.text.index("250 2.1.0") < group.text.index("250 2.1.5") < group.text.index("250 2.0.0"), \
        f"the group's replies did not leave in one write: {[c.text[:90] for c in replies]}"
    assert len(replies) == 4, [c.text[:90] for c in replies]  # 220, EHLO, the group, 221
    logged = next(c for c in calls if c.name in ("write", "writev") and f"event=received msgid={ids['bdat']}" in c.text)
    assert logged.end < group.start, "the 250 left before its received line was written (lines wait for the turn's end)"
    assert not [c for c in bdat if c.name == "shutdown"], "a QUIT alone: closed at once, no half-close"
    assert [c for c in bdat if c.name == "close"], "the session's socket was never closed"

    waiting = _socket_calls(calls, f"queued as {ids['waiting']}")
    assert len([c for c in waiting if c.name in ("write", "writev")]) == 7  # 220, EHLO, MAIL, RCPT, DATA, 250, 221
    assert [c for c in waiting if c.name == "shutdown"], "QUIT and more: the linger (half-close) is gone"


SESSIONS = 20
# The master's hand-off (workers/inbound/main.py on_frame and _adopt) still looks the loop
# up once each per connection; the session itself (protocol.py, session.py) never does.
HANDOFF_GETPIDS = 2


def test_a_session_asks_for_no_pid(mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not on PATH (`make test-deps` installs it)")
    trace_path = tmp_path / "strace.txt"
    server = mta_server(wrapper=[strace, "-f", "-tt", "-y", "-s", "64", "-e", "trace=getpid,write",
                                 "-o", str(trace_path)])
    for n in range(SESSIONS):
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30) as smtp:
            code, text = smtp.sendmail(f"s{n}@client.test", [f"r{n}@local.test"],
                                       f"Subject: {n}\r\n\r\nbody\r\n".encode()), ""
            assert code == {}, text  # every recipient accepted
    assert server.stop() == 0, server.log_tail()

    text = trace_path.read_text(errors="replace")
    calls = parse_strace(text)
    replies = [c for c in calls if c.name == "write" and "socket:" in c.path
               and ('"220 mx.test' in c.text or '"221 ' in c.text)]
    worker = replies[-1].tid  # the inbound worker's loop thread (it answered the last QUIT)
    first = min(c.start for c in replies if c.tid == worker and '"220 ' in c.text)
    last = replies[-1].start
    asked = [c for c in calls if c.name == "getpid" and c.tid == worker and first <= c.start <= last]
    lines = text.splitlines()
    seconds = _clock(lines[last]) - _clock(lines[first])
    # Not per session: the worker's timers (its load report and heartbeat, workers/link.py)
    # and, once, the notifier's connection to the scheduler (asyncio.open_unix_connection).
    once = seconds * (1 / LOAD_REPORT_SECONDS + 1 / HEARTBEAT_SECONDS) + 12
    assert len(asked) <= HANDOFF_GETPIDS * SESSIONS + once, \
        (f"{len(asked)} getpid calls in {SESSIONS} sessions over {seconds:.2f} s: a per-connection "
         "path calls asyncio's loop lookup")


def _clock(line: str) -> float:
    """The -tt time of a strace -f line ("PID HH:MM:SS.micro ..."), in seconds."""
    hours, minutes, seconds = line.split()[1].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


async def _two_refused_recipients(port: int) -> None:
    client = await SmtpClient.connect(port)
    client.writer.write(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<first@elsewhere.test>\r\n"
                        b"RCPT TO:<second@elsewhere.test>\r\n")
    got = [await asyncio.wait_for(client.read_reply(), REPLY_SECONDS) for _ in range(3)]
    assert [r.code // 100 for r in got] == [2, 5, 5], got  # relay denied: not in mynetworks
    assert (await _reply_within(client, "QUIT")).startswith("221 ")
    client.writer.close()


def test_log_lines_of_one_turn_leave_in_one_write(mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not on PATH (`make test-deps` installs it)")
    trace_path = tmp_path / "strace.txt"
    server = mta_server(wrapper=[strace, "-f", "-tt", "-y", "-s", "8192", "-e", "trace=write,writev", "-o", str(trace_path)])
    asyncio.run(_two_refused_recipients(server.port))
    assert server.stop() == 0, server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert "rcpt=first@elsewhere.test" in log and "rcpt=second@elsewhere.test" in log, server.log_tail()

    calls = parse_strace(trace_path.read_text(errors="replace"))
    first = next(c for c in calls if "event=rejected" in c.text and "rcpt=first@elsewhere.test" in c.text)
    assert "rcpt=second@elsewhere.test" in first.text, \
        f"the two refusals of one pipelined group were written apart: {first.text[:300]}"


def test_a_handed_over_connection_is_named_once(mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    """The worker adopts the master's descriptor without a socket.socket of its own (whose
    constructor checks it with a getsockname): the one getsockname per session is uvloop's
    transport learning its names. Sessions work and leave no descriptor behind."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not on PATH (`make test-deps` installs it)")
    trace_path = tmp_path / "strace.txt"
    server = mta_server(wrapper=[strace, "-f", "-tt", "-y", "-e", "trace=getsockname,write", "-o", str(trace_path)])
    for n in range(SESSIONS):
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30) as smtp:
            assert smtp.sendmail(f"s{n}@client.test", [f"r{n}@local.test"], f"Subject: {n}\r\n\r\nbody\r\n") == {}
    assert server.stop() == 0, server.log_tail()

    calls = parse_strace(trace_path.read_text(errors="replace"))
    workers = {c.tid for c in calls if c.name == "write" and '"221 ' in c.text}  # the loops that answered QUIT
    named = [c for c in calls if c.name == "getsockname" and c.tid in workers and "AF_INET" in c.text]
    # One per session (uvloop's), and the start-up probe's connection; two each before.
    assert SESSIONS <= len(named) <= SESSIONS + 2, \
        f"{len(named)} getsockname calls on TCP sockets for {SESSIONS} sessions"
