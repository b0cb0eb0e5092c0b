"""Event logs: one line per event to stderr, `key=value` or JSON ([log] format).

    logs.event("received", msgid=qid, client="192.0.2.1", size=1024)
    -> ts=2026-11-29T06:43:03.120Z proc=inbound pid=812 event=received msgid=... client=... size=1024
    -> {"ts": "2026-11-29T06:43:03.120Z", "proc": "inbound", "pid": 812, "event": "received", ...}

key=value: values with spaces, quotes or `=` are double-quoted with escapes, so every
line splits on spaces outside quotes. The message id is always the field `msgid`.
The format is chosen once in the master (`set_format`); forked children inherit it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, TextIO

from mta import procinfo

_process = "mta"
_stream: TextIO = sys.stderr
_json = False
FORMATS = ("keyvalue", "json")


def set_format(name: str) -> None:
    global _json
    _json = name == "json"


def setup(process: str, stream: TextIO | None = None) -> None:
    global _process, _stream
    _process = process
    if stream is not None:
        _stream = stream


def event(name: str, **fields: Any) -> None:
    now = time.time()
    stamp = f"{_second_stamp(int(now))}.{int(now % 1 * 1000):03d}Z"
    if _json:
        record = {"ts": stamp, "proc": _process, "pid": procinfo.pid(), "event": name}
        record.update((k, v if isinstance(v, (int, float, bool)) else str(v))
                      for k, v in fields.items() if v is not None)
        _stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        _stream.flush()
        return
    line = f"ts={stamp} proc={_process} pid={procinfo.pid()} event={name}"
    for key, value in fields.items():
        if value is not None:
            line += f" {key}={_quote(value)}"
    _stream.write(line + "\n")
    _stream.flush()


_stamped = (-1, "")


def _second_stamp(second: int) -> str:
    """The timestamp up to the second, formatted once per second."""
    global _stamped
    if _stamped[0] != second:
        _stamped = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return _stamped[1]


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def _quote(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if text and text.isprintable() and _NEEDS_QUOTES.search(text) is None:
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if not escaped.isprintable():  # usually it is (a reply text with spaces): no per-character pass
        escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'
