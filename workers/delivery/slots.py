"""Connection slots: at most `max_connections_per_host` sessions per MX host in this process.

A Hop is one target (host name, address, port); its `key` (address:port) is what the
limit counts. HostSlots is taken before connecting and given back when the session
closes or fails to open; a session waiting for a full host waits on `wait`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Hop:
    host: str
    address: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"


class HostSlots:
    """At most `limit` sessions per MX host (address:port) in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used: dict[str, int] = {}
        self._freed = asyncio.Condition()

    def try_take(self, key: str) -> bool:
        if self._used.get(key, 0) >= self.limit:
            return False
        self._used[key] = self._used.get(key, 0) + 1
        return True

    async def wait(self, key: str, timeout: float) -> None:
        """Until a slot of `key` is free (not taken: try_take again) or `timeout` passes."""
        try:
            async with asyncio.timeout(timeout), self._freed:
                await self._freed.wait_for(lambda: self._used.get(key, 0) < self.limit)
        except TimeoutError:
            return

    def give(self, key: str) -> None:
        left = self._used.get(key, 1) - 1
        if left > 0:
            self._used[key] = left
        else:
            self._used.pop(key, None)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()
