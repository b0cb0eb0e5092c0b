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
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    if _json:
        record = {"ts": stamp, "proc": _process, "pid": procinfo.pid(), "event": name}
        record.update((k, v if isinstance(v, (int, float, bool)) else str(v))
                      for k, v in fields.items() if v is not None)
        _stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        _stream.flush()
        return
    parts = [f"ts={stamp}", f"proc={_process}", f"pid={procinfo.pid()}", f"event={name}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    _stream.write(" ".join(parts) + "\n")
    _stream.flush()


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'
