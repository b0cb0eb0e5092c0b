"""The child side of the master's channel: heartbeats, acknowledgements, master-gone.

Every worker process keeps one MasterLink. It sends `{"t": "status", "state", "active"}`
every HEARTBEAT_SECONDS from the event loop (a blocked loop goes silent and the master
replaces the process), queues frames the channel cannot take right now (an
acknowledgement must never be lost), and hands received frames with their file
descriptors to `on_frame`. When the master goes away, `on_master_gone` runs once.
With `report_drops`, a status also goes out within LOAD_REPORT_SECONDS of the load
falling below the last one sent (an inbound worker: the master's session caps must see
sessions end promptly, not at the next heartbeat; rises reach it with each `took`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from mta import frames, logs

HEARTBEAT_SECONDS = 1.0
LOAD_REPORT_SECONDS = 0.1


class MasterLink:
    def __init__(self, channel: socket.socket, status: Callable[[], dict[str, Any]],
                 on_master_gone: Callable[[], None],
                 on_frame: Callable[[dict[str, Any], list[int]], None] | None = None,
                 report_drops: bool = False) -> None:
        self._channel = channel
        self._status = status
        self._on_master_gone = on_master_gone
        self._on_frame = on_frame
        self._unsent: list[dict[str, Any]] = []
        self._gone = False
        self._report_drops = report_drops
        self._reported = 0  # the "active" of the last frame that carried one

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._channel.fileno(), self._readable)
        self._beat()
        if self._report_drops:
            self._watch_load()

    def stop_reading(self) -> None:
        if not self._gone:
            asyncio.get_running_loop().remove_reader(self._channel.fileno())

    def send(self, frame: dict[str, Any]) -> None:
        if self._gone:
            return
        self._reported = frame.get("active", self._reported)
        self._unsent.append(frame)
        try:
            while self._unsent and frames.send_frame(self._channel, self._unsent[0]):
                self._unsent.pop(0)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the channel is broken
            self._master_gone()

    def _master_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._unsent.clear()
        asyncio.get_running_loop().remove_reader(self._channel.fileno())
        logs.event("master_gone")
        self._on_master_gone()

    def send_status(self) -> None:
        self.send({"t": "status", **self._status()})

    def _beat(self) -> None:
        if not self._gone:
            self.send_status()
            asyncio.get_running_loop().call_later(HEARTBEAT_SECONDS, self._beat)

    def _watch_load(self) -> None:
        if self._gone:
            return
        if self._status().get("active", 0) < self._reported:
            self.send_status()
        asyncio.get_running_loop().call_later(LOAD_REPORT_SECONDS, self._watch_load)

    def _readable(self) -> None:
        while True:
            try:
                got = frames.recv_frame(self._channel)
            except BlockingIOError:
                return
            except OSError:
                got = None
            if got is None:
                self._master_gone()
                return
            frame, fds = got
            if self._on_frame is None:
                for fd in fds:
                    os.close(fd)
            else:
                self._on_frame(frame, fds)
