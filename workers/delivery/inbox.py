"""A delivery session's inbox: the scheduler's messages for one session, in arrival order.

asyncio.Queue would do, but on Python 3.11 every wait on one asks for the running loop,
and that is a getpid() system call; the inbox keeps its loop and makes its one waiter's
future from it. One consumer (the session's task); any number of puts.

Invariant: `_waiter` is set only while the consumer awaits an empty inbox.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        return self._items.popleft()  # IndexError when empty, as a bug should

    async def get(self) -> T:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()
