"""The control process: a small HTTP/1.1 server on [control] listen.

  GET /metrics  the merged prometheus-client multiprocess view of every mta process, then
                the per-destination gauges the scheduler answers to a GaugeQuery
  GET /healthz  200 while this process runs
  GET /readyz   200 while mta accepts mail; 503 from the start of a drain, which the
                master announces with SIGUSR1 *before* it closes the listeners, so a
                load balancer stops sending first; 503 while a required child is
                crash-looping (the master sends messages.Children when they change); 503
                while the node is drained (`mta node drain`)
  /api/node     GET: {"drained", "ready"}; POST /api/node/drain | /api/node/undrain asks the
                master (messages.NodeDrain) to refuse new sessions with 421 4.3.2, or to
                take them again; /readyz follows at once. The master keeps the state (a
                restarted control process is told it); a restart of `mta serve` clears it.
  /api/...      the admin API (JSON): workers/control/api.py has its routes. Always
                `Authorization: Bearer <token>`: [control] token, else the one
                mta/admintoken.py keeps in a 0600 file, or a web UI session (cookie and
                X-CSRF-Token); Host, Origin and Content-Type checked by guard.py before
                any route.
  /api/overview the web UI's live figures (workers/control/overview.py): per-minute counts of
                the last hour, sampled here from the merged counters at most once a minute
  /api/users, /api/mailboxes  `mta users` and `mta mailbox` for the web UI (accounts.py)
  /ui/...       the web UI: its page and its login (workers/control/webui.py; sessions
                and lockout: websession.py). /ui/ and /api/ replies carry the security
                headers (webui.SECURITY_HEADERS), and answer a client off loopback only
                over TLS (guard.check_transport).

With [control] tls_cert_file and tls_key_file the listener speaks HTTPS (SIGHUP loads the
certificate again into the listener's context: new connections get the new one).

One request per connection (Connection: close); requests are bounded in size (an /api/ or /ui/ body over MAX_REQUEST_BYTES: 413) and time.
A reply is sent whole (Content-Length), or, for a listing or a bulk operation's progress,
in parts as they come (chunked; a client that takes nothing for SEND_SECONDS is dropped).
Every /api/ request is logged (event=api: method, path, status, client; a refusal adds
`refused=` the check that failed and `seen=` the header it saw). The `mta queue`
commands use this API while the server runs.
SIGTERM exits (the master sends it once every other child is gone); SIGUSR1 is the
drain's announcement (above); SIGHUP reloads (reload()). The process: workers/process.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator

from mta import admintoken, frames, logs, messages, metrics
from mta.config import Config, ConfigError, split_hostport
from mta.messages import Message
from mta.spool import open_spool
from mta.tls import TlsError, control_context
from mtaqueue.backend import QueueError
from mtaqueue.cache_lmdb import LmdbCache
from workers.control.accounts import Accounts
from workers.control.api import AdminApi, Reply, json_reply
from workers.control.guard import Guard, Refusal, check_transport
from workers.control.overview import Series, figures, overview_json, worker_name
from workers.control.webui import SECURITY_HEADERS, WEBUI_DIR, WebUi, read_files
from workers.control.websession import Lockout, Sessions
from workers.process import WorkerBody, WorkerProcess, run_worker

MAX_REQUEST_BYTES = 8192
MAX_READ_BYTES = 64 * 1024  # a larger body is read to its end and answered 413; past this, the connection closes
TOO_LARGE = f"the request body is over {MAX_REQUEST_BYTES} bytes: send less (fewer senders or aliases at a time)"
REQUEST_SECONDS = 5.0
SCRAPE_ASK_SECONDS = 1.0  # a scrape waits this long for the scheduler's per-destination gauges
COMMAND_QUIET_SECONDS = 30.0  # a queue operation's longest silence (the scheduler reports progress each second)
SEND_SECONDS = 60.0  # a streamed reply's client must take each part within this


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    return run_worker(Control(config), config, channel, "control")


class Control(WorkerBody):
    kind = "control"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.draining = False
        self.crash_looping: list[str] = []  # e.g. ["scheduler#1"], as the master last told
        self.node_drained = False  # `mta node drain`, as asked or as the master last told
        self.process: WorkerProcess | None = None
        self.tls: ssl.SSLContext | None = None  # [control] tls_cert_file: HTTPS
        self.series = Series()
        self._worker_names: dict[int, str] = {}  # inbound pid -> "inbound#2" (its process title)

    async def start(self, process: WorkerProcess) -> int | None:
        self.process = process
        try:
            token = admintoken.ensure(self.config)
        except (OSError, admintoken.TokenError) as exc:  # the master restarts us after a back-off
            logs.event("api_token_error", file=admintoken.path(self.config), error=str(exc))
            return 1
        try:
            self.tls = control_context(self.config.control)
        except TlsError as exc:
            logs.event("control_tls_error", error=str(exc))
            return 1
        self.guard = Guard(self.config.control.listen, self.config.control.allowed_hosts, token, self.tls is not None)
        self.webui = WebUi(read_files(WEBUI_DIR), Sessions(self.config.control.session_seconds),
                           Lockout(self.config.auth.max_failures, self.config.auth.lockout_seconds))
        self._configure_webui(self.config)
        self.accounts = Accounts(self.config)
        self.spool = open_spool(self.config.queue)
        self.api = AdminApi(self.spool, self._ask, self._converse)
        self.cache = LmdbCache(self.config.cache.path, self.config.cache.max_size_bytes, self.config.cache.max_entries)
        host, port = split_hostport(self.config.control.listen)
        self._server = await asyncio.start_server(self._on_client, host, port, reuse_address=True, ssl=self.tls,
                                                  ssl_handshake_timeout=REQUEST_SECONDS if self.tls else None)
        self._sampler = asyncio.create_task(self._sample())
        logs.event("listening", address=self.config.control.listen, role="control")
        return None

    def retire(self) -> bool:
        """SIGUSR1: the server drains; /readyz answers 503 until we get SIGTERM."""
        self.draining = True
        logs.event("readyz", ready=False, reason="drain")
        return False

    def reload(self, config: Config) -> None:
        """The token, the allowed hosts, the certificate (same files or others: new
        connections get the new one) change in place. Another listen address, or TLS turned
        on or off, needs another listener: this process exits and the master starts one
        with the new config (the web UI's sessions end)."""
        try:
            token = admintoken.ensure(config)
            tls = control_context(config.control)
        except (OSError, admintoken.TokenError) as exc:
            raise ConfigError(f"[control] token: {exc}") from None
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
        if config.control.listen != self.config.control.listen or (tls is None) != (self.tls is None):
            assert self.process is not None
            logs.event("restarting", reason="[control] listen or TLS changed", address=config.control.listen)
            self.process.stop(shutdown=True)
            return
        if self.tls is not None:  # the listener's context: a new chain for the handshakes to come
            self.tls.load_cert_chain(config.control.tls_cert_file, config.control.tls_key_file)
        if not self.guard.check_login_token(token):
            self.webui.sessions.end_all("token")  # logged in with the old token: log in again
        self.config = config
        self.guard = Guard(config.control.listen, config.control.allowed_hosts, token, self.tls is not None)
        self._configure_webui(config)
        self.accounts.config = config

    def _configure_webui(self, config: Config) -> None:
        self.webui.tls = self.tls is not None
        self.webui.admin_users_file = config.control.admin_users_file
        self.webui.sessions.idle_seconds = config.control.session_seconds
        self.webui.lockout.max_failures = config.auth.max_failures
        self.webui.lockout.lockout_seconds = config.auth.lockout_seconds

    async def close(self) -> dict[str, object]:
        self._sampler.cancel()
        self._server.close()
        await self._server.wait_closed()
        self.spool.close()
        self.cache.close()
        return {}

    def on_frame(self, message: Message, fds: list[int]) -> None:
        for fd in fds:  # the master sends control no descriptors: never keep one
            os.close(fd)
        if isinstance(message, messages.NodeDrain):
            if message.drained != self.node_drained:
                self.node_drained = message.drained
                logs.event("readyz", ready=not (self.draining or self.crash_looping or message.drained),
                           node_drained=message.drained)
            return
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
            if not 0 <= length <= MAX_READ_BYTES:
                raise ValueError("request body too large")
            payload = await asyncio.wait_for(reader.readexactly(length), REQUEST_SECONDS) if length else b""
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError, ssl.SSLError):
            writer.close()
            return
        method, _, rest = head.partition(b"\r\n")[0].partition(b" ")
        target, _, version = rest.partition(b" ")
        path, _, query = target.partition(b"?")
        try:
            reply = await self._answer(method, path, query, headers, payload, writer)
        except Exception as exc:  # a defect: the client still gets an answer, the log the traceback
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"control: answering {method[:16]!r} {path[:200]!r}", "exception": exc})
            reply = Reply(b"500 Internal Server Error", b"internal error: the mta log has the details\n",
                          b"text/plain; charset=utf-8", SECURITY_HEADERS)
        try:
            if isinstance(reply.body, bytes):
                writer.write(_head(reply, b"Content-Length: %d\r\n" % len(reply.body)) + reply.body)
                await writer.drain()
            else:
                await _send_parts(writer, reply, reply.body, chunked=version != b"HTTP/1.0")
        except (ConnectionError, TimeoutError):
            pass  # the client left, or stopped reading: nothing more to tell it
        writer.close()

    async def _answer(self, method: bytes, path: bytes, query: bytes, headers: dict[bytes, bytes], payload: bytes,
                      writer: asyncio.StreamWriter) -> Reply:
        """The reply to one request: the API and web UI (behind the transport and request
        checks), /metrics, or the plain routes."""
        tls = self.tls
        if path.startswith(b"/api/") or path == b"/ui" or path.startswith(b"/ui/"):
            peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            client = peer[0] if isinstance(peer, tuple) else None
            refusal = check_transport(client, local[0] if isinstance(local, tuple) else None, tls is not None)
            if refusal is None and len(payload) > MAX_REQUEST_BYTES:  # read whole: the client sees the answer
                refusal = Refusal(b"413 Content Too Large", "size", TOO_LARGE, str(len(payload)))
            if refusal is not None:
                refused = json_reply(refusal.status, {"error": refusal.message})
                reply = Reply(refused.status, refused.body)
            elif path.startswith(b"/ui"):
                reply, refusal = await self.webui.answer(self.guard, method, path, headers, payload, client or "")
            else:
                reply, refusal = await self._api(method, path, query, headers, payload)
            reply = dataclasses.replace(reply, headers=reply.headers + SECURITY_HEADERS)
            logs.event("api", method=method.decode("ascii", "replace"), path=path[:200].decode("ascii", "replace"),
                       status=int(reply.status[:3]), client=client,
                       refused=refusal and refusal.reason, seen=refusal and refusal.seen)
            return reply
        if method == b"GET" and path == b"/metrics":
            return await self._metrics()
        return self._route(method, path)

    async def _api(self, method: bytes, path: bytes, query: bytes, headers: dict[bytes, bytes],
                   payload: bytes) -> tuple[Reply, Refusal | None]:
        refusal = self.guard.check_request(method, headers, await self.webui.current(headers))
        if refusal is not None:
            refused = json_reply(refusal.status, {"error": refusal.message})
            return Reply(refused.status, refused.body, headers=refusal.headers), refusal
        if method == b"GET" and path == b"/api/overview":
            return await self._overview(), None
        if (accounts := await self.accounts.answer(method, path.decode("ascii", "replace"), payload)) is not None:
            return accounts, None
        return self._node(method, path) or await self.api.answer(
            method, path.decode("ascii", "replace"), query.decode("ascii", "replace"), headers, payload), None

    async def _sample(self) -> None:
        """The overview's per-minute samples: one at each minute's start."""
        while True:
            try:
                self.series.record(time.time(), figures(metrics.merged()).totals)
            except OSError as exc:  # a metrics file vanished: the next minute's sample covers this one
                logs.event("metrics_error", error=str(exc))
            await asyncio.sleep(60.5 - time.time() % 60)

    async def _overview(self) -> Reply:
        try:
            seen = figures(metrics.merged())
        except OSError as exc:
            return json_reply(b"503 Service Unavailable", {"error": f"metrics unavailable: {exc}"})
        gauges = await self._ask(messages.GaugeQuery(), SCRAPE_ASK_SECONDS)
        for pid in seen.sessions.keys() - self._worker_names.keys():
            self._worker_names[pid] = worker_name(pid) or f"pid {pid}"
        self._worker_names = {pid: self._worker_names[pid] for pid in seen.sessions}
        health = {"ready": not (self.draining or self.crash_looping or self.node_drained), "draining": self.draining,
                  "drained": self.node_drained, "crash_looping": self.crash_looping}
        return json_reply(b"200 OK", overview_json(time.time(), self.series, seen, gauges, self._worker_names, health))

    async def _metrics(self) -> Reply:
        """The merged files, then the scheduler's per-destination snapshot (none while it is down)."""
        text = b"text/plain; charset=utf-8"
        try:
            body = metrics.render()
        except OSError as exc:  # a metrics file vanished or is unreadable: say so, stay up
            logs.event("metrics_error", error=str(exc))
            return Reply(b"500 Internal Server Error", f"metrics unavailable: {exc}\n".encode(), text)
        gauges = await self._ask(messages.GaugeQuery(), SCRAPE_ASK_SECONDS)
        if isinstance(gauges, messages.DestinationGauges):
            body += metrics.render_destinations(gauges.top, gauges.other)
        body += metrics.render_cache_entries(self.cache.entries_by_namespace())
        return Reply(b"200 OK", body, b"text/plain; version=0.0.4; charset=utf-8")

    async def _ask(self, question: Message, timeout: float = REQUEST_SECONDS) -> Message | None:
        """One question to the scheduler: its answer; None when it is not reachable."""
        answers = self._converse(question, timeout)
        try:
            return await anext(answers, None)
        finally:
            await answers.aclose()

    async def _converse(self, question: Message, quiet: float = COMMAND_QUIET_SECONDS) -> AsyncIterator[Message]:
        """The scheduler's answers to `question`: CommandProgress frames, then the last one.
        Ends early (the caller sees no last answer) when it is not reachable, breaks the
        connection or says nothing for `quiet` seconds."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.config.queue.scheduler_socket)
        except OSError:
            return
        try:
            writer.write(frames.encode_stream_frame(messages.hello("control")) + frames.encode_stream_frame(question))
            async with asyncio.timeout(quiet):
                await frames.read_hello(reader)  # a scheduler of another build is refused here
                answer = await frames.read_stream_frame(reader)
            while answer is not None:
                yield answer
                if not isinstance(answer, messages.CommandProgress):
                    return
                async with asyncio.timeout(quiet):
                    answer = await frames.read_stream_frame(reader)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        except messages.MessageError as exc:
            logs.event(exc.event, peer="scheduler", error=str(exc))
        finally:
            writer.close()

    def _node(self, method: bytes, path: bytes) -> Reply | None:
        """/api/node: the node drain (the master refuses new sessions; it keeps the state)."""
        if method == b"POST" and path in (b"/api/node/drain", b"/api/node/undrain"):
            assert self.process is not None
            self.node_drained = path.endswith(b"/drain")
            self.process.link.send(messages.NodeDrain(self.node_drained))
            logs.event("readyz", ready=not (self.draining or self.crash_looping or self.node_drained),
                       node_drained=self.node_drained)
        elif not (method == b"GET" and path == b"/api/node"):
            return None
        return json_reply(b"200 OK", {"drained": self.node_drained,
                                      "ready": not (self.draining or self.crash_looping or self.node_drained)})

    def _route(self, method: bytes, path: bytes) -> Reply:
        text = b"text/plain; charset=utf-8"
        if method != b"GET":
            return Reply(b"405 Method Not Allowed", b"only GET\n", text)
        if path == b"/healthz":
            return Reply(b"200 OK", b"ok\n", text)
        if path == b"/readyz":
            if self.draining:
                return Reply(b"503 Service Unavailable", b"draining\n", text)
            if self.crash_looping:
                return Reply(b"503 Service Unavailable", f"crash-looping: {' '.join(self.crash_looping)}\n".encode(),
                             text)
            if self.node_drained:
                return Reply(b"503 Service Unavailable", b"node drained (mta node drain)\n", text)
            return Reply(b"200 OK", b"ready\n", text)
        return Reply(b"404 Not Found", b"not found\n", text)


def _head(reply: Reply, framing: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%sConnection: close\r\n%s\r\n"
            % (reply.status, reply.kind, framing, reply.headers))


async def _send_parts(writer: asyncio.StreamWriter, reply: Reply, parts: AsyncIterator[bytes], chunked: bool) -> None:
    """A reply's parts as they come: chunked, or to an HTTP/1.0 client until the close.
    A spool error before the first part is a 500; after it, the reply breaks off."""
    try:
        part = await anext(parts, None)
    except QueueError as exc:
        logs.event("api_error", error=str(exc))
        error = json_reply(b"500 Internal Server Error", {"error": f"the spool: {exc}"})
        assert isinstance(error.body, bytes)
        writer.write(_head(error, b"Content-Length: %d\r\n" % len(error.body)) + error.body)
        return
    writer.write(_head(reply, b"Transfer-Encoding: chunked\r\n" if chunked else b""))
    try:
        while part is not None:
            writer.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            await asyncio.wait_for(writer.drain(), SEND_SECONDS)
            part = await anext(parts, None)
    except QueueError as exc:  # the client sees a reply without its end
        logs.event("api_error", error=str(exc), action="reply broken off")
        return
    if chunked:
        writer.write(b"0\r\n\r\n")
    await writer.drain()


def _headers(head: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out

