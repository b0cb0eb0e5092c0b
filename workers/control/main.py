"""The control process: a small HTTP/1.1 server on [control] listen.

  GET /metrics  the merged prometheus-client multiprocess view of every mta process, then
                the per-destination gauges the scheduler answers to a GaugeQuery
  GET /healthz  200 while this process runs
  GET /readyz   200 while mta accepts mail; 503 from the start of a drain, which the
                master announces with SIGUSR1 *before* it closes the listeners, so a
                load balancer stops sending first; 503 while a required child is
                crash-looping (the master sends messages.Children when they change)
  the admin API (JSON; always `Authorization: Bearer <token>`: [control] token, else the
  one mta/admintoken.py keeps in a 0600 file; Host, Origin and Content-Type checked by
  guard.py before any route):
  GET  /api/queue            every queued message (mta queue list --json)
  GET  /api/queue/ID         one message (404 for an ID that is not one: mtaqueue.ids)
  GET  /api/queue/ID/body    its stored bytes (mta queue show --body)
  GET  /api/domains          recipients per destination domain and state
  POST /api/queue/OP         OP = retry | hold | release | delete; body {"ids": [...]} or
                             {"domain": "d"} or {"all": true}; applied by the scheduler

One request per connection (Connection: close); requests are bounded in size and time.
Every /api/ request is logged (event=api: method, path, status, client; a refusal adds
`refused=` the check that failed and `seen=` the header it saw). The `mta queue`
commands use this API while the server runs.
SIGTERM exits (the master sends it once every other child is gone); SIGUSR1 is the
drain's announcement (above); SIGHUP reloads (reload()). The process: workers/process.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import typing

from mta import admintoken, frames, logs, messages, metrics, queueview
from mta.config import Config, ConfigError, split_hostport
from mta.messages import Message
from mta.spool import open_spool
from mtaqueue.cache_lmdb import LmdbCache
from mtaqueue.ids import MessageId, is_id
from workers.control.guard import Guard
from workers.process import WorkerBody, WorkerProcess, run_worker

MAX_REQUEST_BYTES = 8192
REQUEST_SECONDS = 5.0
SCRAPE_ASK_SECONDS = 1.0  # a scrape waits this long for the scheduler's per-destination gauges


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    return run_worker(Control(config), config, channel, "control")


class Control(WorkerBody):
    kind = "control"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.draining = False
        self.crash_looping: list[str] = []  # e.g. ["scheduler#1"], as the master last told
        self.process: WorkerProcess | None = None

    async def start(self, process: WorkerProcess) -> int | None:
        self.process = process
        try:
            token = admintoken.ensure(self.config)
        except (OSError, admintoken.TokenError) as exc:  # the master restarts us after a back-off
            logs.event("api_token_error", file=admintoken.path(self.config), error=str(exc))
            return 1
        self.guard = Guard(self.config.control.listen, self.config.control.allowed_hosts, token)
        self.spool = open_spool(self.config.queue)
        self.cache = LmdbCache(self.config.cache.path, self.config.cache.max_size_bytes, self.config.cache.max_entries)
        host, port = split_hostport(self.config.control.listen)
        self._server = await asyncio.start_server(self._on_client, host, port, reuse_address=True)
        logs.event("listening", address=self.config.control.listen, role="control")
        return None

    def retire(self) -> bool:
        """SIGUSR1: the server drains; /readyz answers 503 until we get SIGTERM."""
        self.draining = True
        logs.event("readyz", ready=False, reason="drain")
        return False

    def reload(self, config: Config) -> None:
        """The token and the allowed hosts change in place. Another listen address needs
        another process: this one exits and the master starts one with the new config."""
        try:
            token = admintoken.ensure(config)
        except (OSError, admintoken.TokenError) as exc:
            raise ConfigError(f"[control] token: {exc}") from None
        if config.control.listen != self.config.control.listen:
            assert self.process is not None
            logs.event("restarting", reason="[control] listen changed", address=config.control.listen)
            self.process.stop(shutdown=True)
            return
        self.config = config
        self.guard = Guard(config.control.listen, config.control.allowed_hosts, token)

    async def close(self) -> dict[str, object]:
        self._server.close()
        await self._server.wait_closed()
        self.spool.close()
        self.cache.close()
        return {}

    def on_frame(self, message: Message, fds: list[int]) -> None:
        for fd in fds:  # the master sends control no descriptors: never keep one
            os.close(fd)
        if not isinstance(message, messages.Children):
            raise messages.unexpected(message, "from the master")
        failing = list(message.crash_looping)
        if failing != self.crash_looping:
            self.crash_looping = failing
            logs.event("readyz", ready=not (self.draining or failing),
                       crash_looping=",".join(self.crash_looping) or None)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_SECONDS)
            headers = _headers(head)
            length = int(headers.get(b"content-length", b"0") or 0)
            if not 0 <= length <= MAX_REQUEST_BYTES:
                raise ValueError("request body too large")
            payload = await asyncio.wait_for(reader.readexactly(length), REQUEST_SECONDS) if length else b""
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            writer.close()
            return
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        extra = b""
        if path.startswith(b"/api/"):
            refusal = self.guard.check_request(method, headers)
            if refusal is None:
                status, body, kind = await self._api(method, path.decode("ascii", "replace"), payload)
            else:
                status, body, kind = _json(refusal.status, {"error": refusal.message})
                extra = refusal.headers
            peer = writer.get_extra_info("peername")
            logs.event("api", method=method.decode("ascii", "replace"), path=path[:200].decode("ascii", "replace"),
                       status=int(status[:3]), client=peer[0] if isinstance(peer, tuple) else None,
                       refused=refusal and refusal.reason, seen=refusal and refusal.seen)
        elif method == b"GET" and path == b"/metrics":
            status, body, kind = await self._metrics()
        else:
            status, body, kind = self._route(method, path)
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                     % (status, kind, len(body), extra) + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the client left: nothing to tell it
        writer.close()

    async def _api(self, method: bytes, path: str, payload: bytes) -> tuple[bytes, bytes, bytes]:
        """A request the guard let through."""
        if method == b"GET" and path == "/api/queue":
            envelopes = list(self.spool.envelopes())
            active = await self._ask(messages.ActiveQuery())
            queueview.mark_active(envelopes, active.active if isinstance(active, messages.ActiveJobs) else {})
            return _json(b"200 OK", [queueview.envelope_json(e) for e in envelopes])
        if method == b"GET" and path == "/api/domains":
            return _json(b"200 OK", queueview.domain_summary(self.spool.envelopes()))
        parts = path.split("/")  # "", "api", "queue", ID[, "body"]
        if method == b"GET" and parts[2:3] == ["queue"] and (len(parts) == 4 or parts[4:] == ["body"]):
            msgid = MessageId(parts[3].upper())
            # Only a well-formed id reaches LMDB: an empty or overlong key is an error there, not a miss.
            if is_id(msgid) and len(parts) == 5 and (body := self.spool.body(msgid)) is not None:
                return b"200 OK", body, b"application/octet-stream"
            if is_id(msgid) and len(parts) == 4 and (envelope := self.spool.envelope(msgid)) is not None:
                return _json(b"200 OK", queueview.envelope_json(envelope))
            return _json(b"404 Not Found", {"error": "no such message"})
        op = path.removeprefix("/api/queue/")
        if method == b"POST" and op in messages.QUEUE_OPS:
            try:
                which = json.loads(payload or b"{}")
            except ValueError:
                return _json(b"400 Bad Request", {"error": "the body must be JSON"})
            if (not isinstance(which, dict) or not (which.get("ids") or which.get("domain") or which.get("all"))
                    or not isinstance(which.get("domain") or "", str)):
                return _json(b"400 Bad Request", {"error": 'name {"ids": [...]}, {"domain": "d"} or {"all": true}'})
            ids = which.get("ids") or []
            bad = [i for i in ids if not isinstance(i, str) or not is_id(i.upper())] if isinstance(ids, list) else [ids]
            if bad:
                return _json(b"400 Bad Request", {"error": f"not a message id: {str(bad[0])[:50]!r}"})
            answer = await self._ask(messages.QueueCommand(
                typing.cast(messages.QueueOp, op), tuple(i.upper() for i in ids), which.get("domain") or None,
                bool(which.get("all"))))
            if not isinstance(answer, messages.CommandResult):
                return _json(b"503 Service Unavailable", {"error": "the scheduler is not running"})
            return _json(b"200 OK", {"op": op, "count": answer.count})
        return _json(b"404 Not Found", {"error": "no such endpoint"})

    async def _metrics(self) -> tuple[bytes, bytes, bytes]:
        """The merged files, then the scheduler's per-destination snapshot (none while it is down)."""
        text = b"text/plain; charset=utf-8"
        try:
            body = metrics.render()
        except OSError as exc:  # a metrics file vanished or is unreadable: say so, stay up
            logs.event("metrics_error", error=str(exc))
            return b"500 Internal Server Error", f"metrics unavailable: {exc}\n".encode(), text
        gauges = await self._ask(messages.GaugeQuery(), SCRAPE_ASK_SECONDS)
        if isinstance(gauges, messages.DestinationGauges):
            body += metrics.render_destinations(gauges.top, gauges.other)
        body += metrics.render_cache_entries(self.cache.entries_by_namespace())
        return b"200 OK", body, b"text/plain; version=0.0.4; charset=utf-8"

    async def _ask(self, question: Message, timeout: float = REQUEST_SECONDS) -> Message | None:
        """One question to the scheduler: its answer; None when it is not reachable."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.config.queue.scheduler_socket)
        except OSError:
            return None
        try:
            writer.write(frames.encode_stream_frame(messages.hello("control")) + frames.encode_stream_frame(question))
            async with asyncio.timeout(timeout):
                await frames.read_hello(reader)  # a scheduler of another build is refused here
                return await frames.read_stream_frame(reader)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return None
        except messages.MessageError as exc:
            logs.event(exc.event, peer="scheduler", error=str(exc))
            return None
        finally:
            writer.close()

    def _route(self, method: bytes, path: bytes) -> tuple[bytes, bytes, bytes]:
        text = b"text/plain; charset=utf-8"
        if method != b"GET":
            return b"405 Method Not Allowed", b"only GET\n", text
        if path == b"/healthz":
            return b"200 OK", b"ok\n", text
        if path == b"/readyz":
            if self.draining:
                return b"503 Service Unavailable", b"draining\n", text
            if self.crash_looping:
                return b"503 Service Unavailable", f"crash-looping: {' '.join(self.crash_looping)}\n".encode(), text
            return b"200 OK", b"ready\n", text
        return b"404 Not Found", b"not found\n", text


def _headers(head: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _json(status: bytes, value: object) -> tuple[bytes, bytes, bytes]:
    return status, json.dumps(value, indent=1).encode() + b"\n", b"application/json"
