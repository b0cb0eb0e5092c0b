"""Event log lines: key=value quoting and the JSON format."""

import asyncio
import io
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import logs


def capture(fmt: str, **fields: object) -> str:
    out = io.StringIO()
    logs.setup("test", stream=out)
    logs.set_format(fmt)
    try:
        logs.event("received", **fields)
    finally:
        logs.set_format("keyvalue")
        logs.setup("test", stream=sys.stderr)
    return out.getvalue()


def test_keyvalue_quotes_what_would_split_and_skips_none() -> None:
    line = capture("keyvalue", msgid="ABC", reply='550 5.1.1 "no" such=user', size=10, gone=None)
    assert line.endswith(' msgid=ABC reply="550 5.1.1 \\"no\\" such=user" size=10\n')
    assert "gone" not in line and "event=received" in line


def test_json_is_one_object_per_line() -> None:
    line = capture("json", msgid="ABC", reply="250 ok\nsecond", size=10, gone=None)
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["event"] == "received" and record["msgid"] == "ABC" and record["size"] == 10
    assert record["reply"] == "250 ok\nsecond" and "gone" not in record and record["proc"] == "test"


def split_fields(line: str) -> dict[str, str]:
    """What a logfmt reader does: split on spaces outside double quotes, undo the escapes."""
    out = {}
    for key, quoted, bare in re.findall(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))(?= |\n)', line):
        out[key] = re.sub(r'\\(["\\])', r"\1", quoted) if quoted else bare
    return out


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(" '\"=\\\\ab\n\x7fé"), max_size=12) | st.text(max_size=40))
def test_keyvalue_any_value_reads_back_as_one_field(value: str) -> None:
    line = capture("keyvalue", reply=value, size=1)
    assert line.count("\n") == 1 and line.endswith(" size=1\n")
    fields = split_fields(line)
    assert set(fields) == {"ts", "proc", "pid", "event", "reply", "size"}
    printable = all(c.isprintable() for c in value)
    if printable:
        assert fields["reply"] == value
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_of_one_turn_go_out_in_one_write_in_order() -> None:
    out = CountingStream()
    seen: list[tuple[int, str]] = []

    async def main() -> None:
        logs.write_each_turn(asyncio.get_running_loop())
        for n in range(5):
            logs.event("delivered", n=n)
        seen.append((out.writes, out.getvalue()))  # nothing yet: the turn is not over
        await asyncio.sleep(0.01)
        seen.append((out.writes, out.getvalue()))
        logs.event("late", n=5)
        logs.write_each_turn(None)  # what waits goes out now, later lines at once
        seen.append((out.writes, out.getvalue()))
        logs.event("stopped")
        seen.append((out.writes, out.getvalue()))

    logs.setup("test", stream=out)
    try:
        asyncio.run(main())
    finally:
        logs.write_each_turn(None)
        logs.setup("test", stream=sys.stderr)
    assert seen[0] == (0, "")
    assert seen[1][0] == 1 and [split_fields(line)["n"] for line in seen[1][1].splitlines(keepends=True)] == list("01234")
    assert seen[2][0] == 2 and seen[2][1].splitlines()[-1].endswith("event=late n=5")
    assert seen[3][0] == 3 and seen[3][1].endswith("event=stopped\n")


class TimedStream(io.StringIO):
    """The log stream: when (time.monotonic()) each write was made."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def write(self, text: str) -> int:
        self.times.append(time.monotonic())
        return super().write(text)


def line_from_a_thread_while_the_loop_sleeps(schedule: Callable[[asyncio.AbstractEventLoop], object],
                                             run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run) -> float:
    """Seconds from a line logged by another thread (a writer thread's) to its write, while
    the loop sleeps with nothing else to wake it for 3 s. `schedule(loop)` sets up the
    turn's writes."""
    out = TimedStream()
    logged: list[float] = []

    async def main() -> None:
        schedule(asyncio.get_running_loop())

        def log() -> None:
            time.sleep(0.3)  # the loop is asleep in its poll by now
            logged.append(time.monotonic())
            logs.event("from_a_thread")

        threading.Thread(target=log).start()
        await asyncio.sleep(3)

    logs.setup("test", stream=out)
    try:
        run(main())
    finally:
        logs.write_each_turn(None)
        logs.setup("test", stream=sys.stderr)
    assert "event=from_a_thread" in out.getvalue() and logged and out.times
    return out.times[0] - logged[0]


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_line_logged_from_another_thread_wakes_the_loop_to_write_it(
        run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    assert line_from_a_thread_while_the_loop_sleeps(logs.write_each_turn, run) < 1.5  # not at its next wake-up


def test_lines_logged_by_a_thread_and_the_loop_at_once_are_all_written() -> None:
    """The first line waiting schedules the turn's write: with a thread logging while the
    loop logs and writes, every line is still written (none left waiting unscheduled)."""
    out = io.StringIO()
    counts: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        logs.write_each_turn(loop)
        stop = threading.Event()

        def other() -> None:
            while not stop.is_set():
                logs.event("from_thread")
                counts.append(1)

        thread = threading.Thread(target=other)
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads between nearly any two bytecodes
        try:
            thread.start()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                for _ in range(20):
                    logs.event("from_loop")
                await asyncio.sleep(0)
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(previous)
        for _ in range(5):
            await asyncio.sleep(0.01)

    logs.setup("test", stream=out)
    try:
        uvloop.run(main())
        waiting = len(logs._waiting)  # before write_each_turn(None) would write them
    finally:
        logs.write_each_turn(None)
        logs.setup("test", stream=sys.stderr)
    assert waiting == 0, f"{waiting} lines left waiting with no write scheduled"
    assert out.getvalue().count("event=from_thread") == len(counts)


@given(st.integers())
def test_an_int_field_reads_as_its_digits_unquoted(value: int) -> None:
    line = capture("keyvalue", size=value, flag=True)
    assert line.endswith(f" size={value} flag=True\n") and split_fields(line)["size"] == logs._quote(value)


def test_a_forked_child_writes_its_own_pid_and_process_name() -> None:
    import os

    out = io.StringIO()
    logs.setup("parent", stream=out)
    try:
        logs.event("before")  # the parent's line head is made now; the child must not reuse it
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child (no setup of its own): its line through the pipe, then gone without pytest's teardown
            logs.event("after")
            os.write(write, out.getvalue().splitlines(keepends=True)[-1].encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            child_line = pipe.read()
        logs.event("again")
    finally:
        logs.setup("test", stream=sys.stderr)
    parent_lines = out.getvalue().splitlines()
    assert [split_fields(line)["pid"] for line in parent_lines] == [str(os.getpid())] * 2
    assert split_fields(child_line)["pid"] == str(pid) and split_fields(child_line)["event"] == "after"


@given(st.text(alphabet=st.characters(max_codepoint=0x7f)) | st.text())
def test_a_value_written_as_it_is_reads_the_same_as_quoted(value: str) -> None:
    """event() writes a plain ASCII word without _quote, the reference: only where _quote leaves it as it is."""
    line = capture("keyvalue", reply=value)
    assert line.endswith(f" reply={logs._quote(value)}\n")
    if logs._plain(value) is not None:
        assert logs._quote(value) == value
