"""Event logs: one line per event, `key=value`, to stderr.

    logs.event("received", msgid=qid, client="192.0.2.1", size=1024)
    -> ts=2026-11-29T06:43:03.120Z proc=inbound pid=812 event=received msgid=... client=... size=1024

Values with spaces, quotes or `=` are double-quoted with escapes, so every line
splits on spaces outside quotes. The message id is always logged as `msgid=`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

_process = "mta"
_stream: TextIO = sys.stderr


def setup(process: str, stream: TextIO | None = None) -> None:
    global _process, _stream
    _process = process
    if stream is not None:
        _stream = stream


def event(name: str, **fields: Any) -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    parts = [f"ts={stamp}", f"proc={_process}", f"pid={os.getpid()}", f"event={name}"]
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
