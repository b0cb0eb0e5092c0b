"""Event logs: one line per event to stderr, `key=value` or JSON ([log] format).

    logs.event("received", msgid=qid, client="192.0.2.1", size=1024)
    -> ts=2026-11-29T06:43:03.120Z proc=inbound pid=812 event=received msgid=... client=... size=1024
    -> {"ts": "2026-11-29T06:43:03.120Z", "proc": "inbound", "pid": 812, "event": "received", ...}

key=value: values with spaces, quotes or `=` are double-quoted with escapes, so every
line splits on spaces outside quotes (`_quote`; an int or a plain ASCII word is written
as it is without it). The message id is always the field `msgid`. The ` proc= pid=`
part is made once per process (again after `setup` or a fork).
The format is chosen once in the master (`set_format`); forked children inherit it.
A process whose lines come many per event-loop turn (the scheduler: one per outcome)
may write them once per turn (`write_each_turn(loop)`, `write_each_turn(None)` to
write the rest and stop): one write() instead of one per line; `write_waiting()` writes
them now, before an act that must follow them (the 250 after a received line). The
inbound worker gives its own end-of-turn callback (`schedule`), which writes the lines
and then its sessions' replies (workers/inbound/output.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import asyncio

from mta import procinfo

_process = "mta"
_stream: TextIO = sys.stderr
_json = False
FORMATS = ("keyvalue", "json")
_schedule: Callable[[], None] | None = None  # write_each_turn: lines wait for the end of the turn
_waiting: list[str] = []
_waiting_lock = threading.Lock()  # append + "the first?" and take-all, each one step across threads
_loop: asyncio.AbstractEventLoop | None = None  # write_each_turn's loop, and its thread
_loop_thread = 0


def set_format(name: str) -> None:
    global _json
    _json = name == "json"


def setup(process: str, stream: TextIO | None = None) -> None:
    global _process, _stream, _head
    _process = process
    _head = ""
    if stream is not None:
        _stream = stream


def event(name: str, **fields: Any) -> None:
    now = time.time()
    stamp = _second_stamp(int(now)) + _MILLIS[int(now % 1 * 1000)]
    if _json:
        record = {"ts": stamp, "proc": _process, "pid": procinfo.pid(), "event": name}
        record.update((k, v if isinstance(v, (int, float, bool)) else str(v))
                      for k, v in fields.items() if v is not None)
        _emit(json.dumps(record, ensure_ascii=False) + "\n")
        return
    line = f"ts={stamp}{_head or _new_head()}{name}"
    for key, value in fields.items():
        if value is None:
            continue
        # The usual values, an int (digits and a sign) or a plain ASCII word (an address, an
        # id), read as they are without _quote: it would return them unchanged.
        if type(value) is int or (type(value) is str and _plain(value) is not None):
            line += f" {key}={value}"
        else:
            line += f" {key}={_quote(value)}"
    _emit(line + "\n")


_head = ""  # " proc=... pid=... event=" of this process, made at its first line after setup or a fork


def _new_head() -> str:
    global _head
    _head = f" proc={_process} pid={procinfo.pid()} event="
    return _head


def _forked() -> None:
    global _head
    _head = ""


os.register_at_fork(after_in_child=_forked)


def write_each_turn(loop: asyncio.AbstractEventLoop | None, schedule: Callable[[], None] | None = None) -> None:
    """Lines from now on go out together at the end of each turn of `loop` (None: the
    lines waiting go out now, and each later line at once). Called on the loop's thread.
    `schedule`, called on the loop's thread for the first line waiting, makes
    write_waiting() run at the end of the turn (by default loop.call_soon(write_waiting)).
    A first line from another thread (the pickup's executor, a writer thread) has it
    called through loop.call_soon_threadsafe: that wakes the loop, and call_soon from
    another thread would touch libuv's handles off the loop."""
    global _schedule, _loop, _loop_thread
    if loop is None:
        _schedule = None
        write_waiting()
    else:
        _schedule = schedule or (lambda: loop.call_soon(write_waiting))
        _loop, _loop_thread = loop, threading.get_ident()


def _emit(text: str) -> None:
    if _schedule is None:
        _stream.write(text)
        _stream.flush()
        return
    with _waiting_lock:  # (another thread may log meanwhile: one of the two schedules the write)
        _waiting.append(text)
        first = len(_waiting) == 1
    if first:
        if threading.get_ident() == _loop_thread:
            _schedule()
        else:
            assert _loop is not None  # (set with _schedule)
            _loop.call_soon_threadsafe(_schedule)


def write_waiting() -> None:
    """The lines waiting for the end of the turn, written now (nothing without write_each_turn)."""
    if not _waiting:
        return
    with _waiting_lock:  # taken whole: a line added after it schedules the next write
        text = "".join(_waiting)
        _waiting.clear()
    _stream.write(text)
    _stream.flush()


_stamped = (-1, "")


def _second_stamp(second: int) -> str:
    """The timestamp up to the second, formatted once per second."""
    global _stamped
    if _stamped[0] != second:
        _stamped = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return _stamped[1]


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # the stamp's end, by millisecond
_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_plain = re.compile(r'[!#-<>-\[\]-~]+').fullmatch  # printable ASCII but space, '"', '=' and '\\'


def _quote(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if text and text.isprintable() and _NEEDS_QUOTES.search(text) is None:
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if not escaped.isprintable():  # usually it is (a reply text with spaces): no per-character pass
        escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'
