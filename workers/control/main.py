"""The control process: a small HTTP/1.1 server on [control] listen.

  GET /metrics  the merged prometheus-client multiprocess view of every mta process
  GET /healthz  200 while this process runs
  GET /readyz   200 while mta accepts mail; 503 from the start of a drain, which the
                master announces with SIGUSR1 *before* it closes the listeners, so a
                load balancer stops sending first

One request per connection (Connection: close); requests are bounded in size and time.
SIGTERM exits (the master sends it once every other child is gone).
"""

from __future__ import annotations

import asyncio
import signal
import socket

from mta import logs, metrics
from mta.config import Config, split_hostport
from workers.link import MasterLink

MAX_REQUEST_BYTES = 8192
REQUEST_SECONDS = 5.0


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    import uvloop

    logs.setup("control")
    return uvloop.run(Control(config, channel).serve())


class Control:
    def __init__(self, config: Config, channel: socket.socket) -> None:
        self.config = config
        self.channel = channel
        self.draining = False
        self._stop = asyncio.Event()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        host, port = split_hostport(self.config.control.listen)
        server = await asyncio.start_server(self._on_client, host, port, reuse_address=True)
        link = MasterLink(self.channel, lambda: {"state": "ready", "active": 0}, self._stop.set)
        link.start()
        loop.add_signal_handler(signal.SIGUSR1, self._drain)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        logs.event("listening", address=self.config.control.listen, role="control")
        await self._stop.wait()
        server.close()
        await server.wait_closed()
        return 0

    def _drain(self) -> None:
        self.draining = True
        logs.event("readyz", ready=False, reason="drain")

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_SECONDS)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        status, body, kind = self._route(method, path)
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (status, kind, len(body)) + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the client left: nothing to tell it
        writer.close()

    def _route(self, method: bytes, path: bytes) -> tuple[bytes, bytes, bytes]:
        text = b"text/plain; charset=utf-8"
        if method != b"GET":
            return b"405 Method Not Allowed", b"only GET\n", text
        if path == b"/metrics":
            return b"200 OK", metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
        if path == b"/healthz":
            return b"200 OK", b"ok\n", text
        if path == b"/readyz":
            return (b"503 Service Unavailable", b"draining\n", text) if self.draining else (b"200 OK", b"ready\n", text)
        return b"404 Not Found", b"not found\n", text
