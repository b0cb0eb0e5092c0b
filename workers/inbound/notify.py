"""Tell the scheduler about newly committed messages, batched, best effort.

After each durable commit the inbound worker calls `new(msgid)`; ids collected during
one event loop iteration go out as one `messages.New` on the scheduler's Unix socket, at
the turn's end with the sessions' replies (the worker's TurnWriter, output.py)
(after a Hello on each new connection); while it is unreachable they wait (up to
MAX_PENDING). A lost notification costs latency, never mail: the scheduler loads the
spool when it starts and rescans the due index periodically.
"""

from __future__ import annotations

import asyncio

from mta import frames, messages
from mtaqueue.ids import MessageId
from workers.inbound.output import TurnWriter

RECONNECT_SECONDS = 1.0
MAX_PENDING = 100_000  # ids kept while the scheduler is unreachable


class SchedulerNotifier:
    def __init__(self, path: str, turns: TurnWriter) -> None:
        self._path = path
        self._turns = turns
        self._ids: list[str] = []
        self._writer: asyncio.StreamWriter | None = None
        self._connecting = False
        self._marked = False  # marked on the TurnWriter: write_turn runs at this turn's end

    def new(self, msgid: MessageId) -> None:
        self._ids.append(msgid)
        self._mark()

    def _mark(self) -> None:
        if not self._marked:
            self._marked = True
            self._turns.mark(self)

    def write_turn(self) -> None:
        self._marked = False
        writer = self._writer
        if writer is None or writer.is_closing():
            self._writer = None
            if len(self._ids) > MAX_PENDING:  # the scheduler finds them when it (re)starts or rescans
                del self._ids[:-MAX_PENDING]
            self._connect_soon()
            return
        writer.write(frames.encode_stream_frame(messages.New(tuple(self._ids))))
        self._ids = []

    def _connect_soon(self) -> None:
        if not self._connecting:
            self._connecting = True
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _reader, self._writer = await asyncio.open_unix_connection(self._path)
            self._writer.write(frames.encode_stream_frame(messages.hello("inbound")))
        except OSError:  # the scheduler is (re)starting: try again while ids wait
            await asyncio.sleep(RECONNECT_SECONDS)
        self._connecting = False
        if self._ids:
            self._mark()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
