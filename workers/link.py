"""The child side of the master's channel: heartbeats, acknowledgements, master-gone.

Every worker process keeps one MasterLink. It says Hello (mta/messages.py: this build's
PROTOCOL_VERSION), then sends a Status every HEARTBEAT_SECONDS from the event loop (a
blocked loop goes silent and the master replaces the process), queues messages the
channel cannot take right now (an acknowledgement must never be lost), and hands
received messages with their file descriptors to `on_frame`, which raises
messages.MessageError (before it takes the descriptors) for a kind it does not take.
When the master goes away, or sends what is not a message for us (logged: a bug),
`on_master_gone` runs once.
With `report_drops`, a status also goes out within LOAD_REPORT_SECONDS of the load
falling below the last one sent (an inbound worker: the master's session caps must see
sessions end promptly, not at the next heartbeat; rises reach it with each `Took`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from mta import frames, logs, messages
from mta.messages import Message

HEARTBEAT_SECONDS = 1.0
LOAD_REPORT_SECONDS = 0.1


class MasterLink:
    def __init__(self, channel: socket.socket, status: Callable[[], messages.Status],
                 on_master_gone: Callable[[], None],
                 on_frame: Callable[[Message, list[int]], None] | None = None,
                 report_drops: bool = False) -> None:
        self._channel = channel
        self._status = status
        self._on_master_gone = on_master_gone
        self._on_frame = on_frame
        self._unsent: list[Message] = []
        self._gone = False
        self._report_drops = report_drops
        self._reported = 0  # the `active` of the last message that carried one

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._channel.fileno(), self._readable)
        self.send(messages.hello("child"))
        self._beat()
        if self._report_drops:
            self._watch_load()

    def stop_reading(self) -> None:
        if not self._gone:
            asyncio.get_running_loop().remove_reader(self._channel.fileno())

    def send(self, message: Message) -> None:
        if self._gone:
            return
        if isinstance(message, (messages.Status, messages.Took, messages.Refused)):
            self._reported = message.active
        self._unsent.append(message)
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
        self.send(self._status())

    def _beat(self) -> None:
        if not self._gone:
            self.send_status()
            asyncio.get_running_loop().call_later(HEARTBEAT_SECONDS, self._beat)

    def _watch_load(self) -> None:
        if self._gone:
            return
        if self._status().active < self._reported:
            self.send_status()
        asyncio.get_running_loop().call_later(LOAD_REPORT_SECONDS, self._watch_load)

    def _readable(self) -> None:
        while True:
            try:
                got = frames.recv_frame(self._channel)
            except BlockingIOError:
                return
            except messages.MessageError as exc:
                self._bad_frame(exc)
                return
            except OSError:
                got = None
            if got is None:
                self._master_gone()
                return
            message, fds = got
            try:
                if self._on_frame is None:
                    raise messages.unexpected(message, "from the master")
                self._on_frame(message, fds)
            except messages.MessageError as exc:
                for fd in fds:
                    os.close(fd)
                self._bad_frame(exc)
                return

    def _bad_frame(self, exc: messages.MessageError) -> None:
        """A bug (the master is of this build: it forked us): trust this channel no more."""
        logs.event(exc.event, peer="master", error=str(exc))
        self._master_gone()
