"""The event loop of every bench process: uvloop when importable, else asyncio's own.

    result = run(coro)                       # the coroutine on uvloop when it is there
    loop_name()                              # "uvloop" or "asyncio": recorded in results
    await serve_until_signalled(server)      # a bench server: "ready", SIGTERM/SIGINT, close

The stdlib loop works everywhere, only slower; results say which one ran.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # the stdlib loop works, only slower; the result records which ran
    uvloop = None

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def loop_name() -> str:
    """The running loop's kind."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


async def serve_until_signalled(server: asyncio.AbstractServer) -> None:
    """Say "ready" on stdout once listening, serve until SIGTERM or SIGINT, then stop
    listening (the caller may wait for open sessions)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
