"""The CLI's side of a running server: its admin API on [control] listen, and the
scheduler's socket when the API does not answer.

With [control] tls_cert_file the API is HTTPS: the server must present that certificate
(pinned: no CA or name check, the listen address is seldom the certificate's name).

Every call returns None when nothing listens there (the server is stopped, or its
control process is not up yet): the caller then falls back, as `mta queue` always has.
ControlError for everything else that stops the command: a refused or unreadable token
(naming [control] token), an unexpected status, an answer that broke off, a scheduler
of another build or one that went quiet.

Long answers never wait on a total timeout, only on silence: a listing is read as it
streams (listing(): items of the JSON array one by one, constant memory), and a bulk
operation's progress (the scheduler's CommandProgress frames, or the API's NDJSON lines
{"done", "total"} that relay them) goes to `on_progress` as it comes.
"""

from __future__ import annotations

import codecs
import http.client
import json
import socket
import ssl
import typing
from collections.abc import Callable, Iterator
from typing import Any

from mta import admintoken, frames, messages
from mta.config import Config, split_hostport

CONTROL_CONNECT_SECONDS = 5.0  # nothing accepts on [control] listen by then: the server is stopped
CONTROL_QUIET_SECONDS = 120.0  # the longest silence in an answer of the admin API
SCHEDULER_QUIET_SECONDS = 10.0  # the longest silence of the scheduler (bulk operations report each second)
READ_BYTES = 65536
NDJSON = "application/x-ndjson"

Progress = Callable[[int, int], None]  # (done, total; 0 when unknown)
_Answer = typing.TypeVar("_Answer", bound=messages.Message)


class ControlError(Exception):
    """The admin API or the scheduler answered, but not with what the command needs (or broke off)."""


def request(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None, *,
            expect: tuple[int, ...]) -> tuple[int, bytes] | None:
    """One request to the admin API: (status, body), or None when nothing accepts there."""
    response = _open(cfg, method, path, body, expect)
    if response is None:
        return None
    with _reading(cfg, method, path):
        return response.status, response.read()


def listing(cfg: Config, query: str) -> Iterator[dict[str, Any]] | None:
    """GET /api/queue?query, streamed: the messages one by one; None when nothing listens."""
    path = "/api/queue" + (f"?{query}" if query else "")
    response = _open(cfg, "GET", path, None, (200,))
    return None if response is None else _array_items(cfg, path, response)


def command(cfg: Config, op: str, which: dict[str, Any], on_progress: Progress) -> int | None:
    """POST /api/queue/OP, progress relayed as it comes: the count, or None when nothing
    listens there or the API answers 503 (its scheduler is not running)."""
    path = f"/api/queue/{op}"
    response = _open(cfg, "POST", path, which, (200, 503), accept=NDJSON)
    if response is None:
        return None
    with _reading(cfg, "POST", path):
        if response.status == 503:
            return None
        while line := response.readline():
            answer = json.loads(line)
            if "error" in answer:
                raise ControlError(f"{_where(cfg)}: POST {path}: {answer['error']}")
            if "count" in answer:
                return int(answer["count"])
            on_progress(int(answer["done"]), int(answer["total"]))
    raise ControlError(f"{_where(cfg)} ended POST {path} without a count: see the server's log")


def ask_scheduler(cfg: Config, question: messages.Message, answer: type[_Answer],
                  on_progress: Progress | None = None) -> _Answer | None:
    """One question to the running scheduler: its answer (CommandProgress frames before it
    go to `on_progress`); None when it is not running. ControlError when it speaks another
    build's messages, or is silent for SCHEDULER_QUIET_SECONDS."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SCHEDULER_QUIET_SECONDS)
    try:
        sock.connect(cfg.queue.scheduler_socket)
    except OSError:
        sock.close()
        return None
    where = f"the scheduler at {cfg.queue.scheduler_socket}"
    with sock:
        try:
            sock.sendall(frames.encode_stream_frame(messages.hello("cli")) + frames.encode_stream_frame(question))
            hello = frames.recv_stream_frame(sock)  # one of another build is refused here
            if not isinstance(hello, messages.Hello):
                raise messages.unexpected(hello, "before a Hello")
            while isinstance(got := frames.recv_stream_frame(sock), messages.CommandProgress) and on_progress:
                on_progress(got.done, got.total)
            if not isinstance(got, answer):
                raise messages.unexpected(got, f"for a {type(question).__name__}")
        except TimeoutError:
            raise ControlError(f"{where} said nothing for {SCHEDULER_QUIET_SECONDS:.0f} s: see its log "
                               "(event=...) and try again") from None
        except (ConnectionError, messages.MessageError) as exc:
            raise ControlError(f"{where}: {exc}") from None
        return got


def _where(cfg: Config) -> str:
    return f"the admin API on [control] listen {cfg.control.listen}"


def _open(cfg: Config, method: str, path: str, body: dict[str, Any] | None, expect: tuple[int, ...],
          accept: str | None = None) -> http.client.HTTPResponse | None:
    """Send one request; its response with the headers read, its status one of `expect`."""
    host, port = split_hostport(cfg.control.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard listener: ask it on loopback
    conn: http.client.HTTPConnection
    if cfg.control.tls_cert_file:
        conn = http.client.HTTPSConnection(host, port, timeout=CONTROL_CONNECT_SECONDS, context=_pinning_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=CONTROL_CONNECT_SECONDS)
    try:
        conn.connect()
    except ssl.SSLError as exc:
        conn.close()
        raise ControlError(f"{_where(cfg)}: TLS failed: {exc}") from None
    except OSError:
        conn.close()
        return None
    if cfg.control.tls_cert_file:
        _check_pin(cfg, conn)
    headers = {"Content-Type": "application/json"} | ({"Accept": accept} if accept else {})
    try:
        token = admintoken.read(cfg)
    except (OSError, admintoken.TokenError) as exc:
        conn.close()
        raise ControlError(f"cannot read the token of {_where(cfg)}: {exc}: run this as the user mta runs as "
                           "(or root), or set [control] token") from None
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with _reading(cfg, method, path):
        assert conn.sock is not None
        conn.sock.settimeout(CONTROL_QUIET_SECONDS)
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        response = conn.getresponse()  # it owns the socket from here (Connection: close)
    if response.status == 401:
        response.close()
        given = (f"the [control] token of {cfg.source}" if cfg.control.token else
                 f"the token in {admintoken.path(cfg)}" if token is not None else
                 f"no token (no [control] token in {cfg.source}, no file {admintoken.path(cfg)})")
        raise ControlError(f"{_where(cfg)} refused {given}: set [control] token to the running server's token")
    if response.status not in expect:
        with _reading(cfg, method, path):
            data = response.read(200)
        response.close()
        raise ControlError(f"{_where(cfg)} answered {method} {path} with {response.status}: "
                           f"{data.decode('utf-8', 'replace')}")
    return response


def _pinning_context() -> ssl.SSLContext:
    """TLS to our own server: the certificate is checked against [control] tls_cert_file
    (_check_pin), not a CA and a name (the listener's address is seldom the certificate's name)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _check_pin(cfg: Config, conn: http.client.HTTPConnection) -> None:
    """The server must present the first certificate of [control] tls_cert_file."""
    try:
        with open(cfg.control.tls_cert_file, encoding="ascii", errors="replace") as f:
            pem = f.read()
        expected = ssl.PEM_cert_to_DER_cert(pem[:pem.index("-----END CERTIFICATE-----") + 25])
    except (OSError, ValueError) as exc:
        conn.close()
        raise ControlError(f"cannot read [control] tls_cert_file {cfg.control.tls_cert_file} to check the server: "
                           f"{exc}: run this as the user mta runs as (or root)") from None
    assert isinstance(conn.sock, ssl.SSLSocket)
    if conn.sock.getpeercert(binary_form=True) != expected:
        conn.close()
        raise ControlError(f"{_where(cfg)} presented another certificate than [control] tls_cert_file "
                           f"{cfg.control.tls_cert_file}: is another server listening there?")


class _reading:
    """Turns a failed or broken-off exchange into a ControlError naming the request."""

    def __init__(self, cfg: Config, method: str, path: str) -> None:
        self.what = f"{_where(cfg)} did not answer {method} {path.partition('?')[0]}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            raise ControlError(f"{self.what}: {exc}") from exc
        return False


def _array_items(cfg: Config, path: str, response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The items of the JSON array the response streams, each as soon as it is whole."""
    decoder, text = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buffer, pos, opened = "", 0, False
    try:
        while True:
            with _reading(cfg, "GET", path):
                data = response.read1(READ_BYTES)
            buffer = buffer[pos:] + text.decode(data, final=not data)
            pos = 0
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n,":  # between items
                    pos += 1
                if pos == len(buffer):
                    break
                if not opened:
                    if buffer[pos] != "[":
                        raise ControlError(f"{_where(cfg)} answered GET {path} with no JSON array")
                    opened, pos = True, pos + 1
                    continue
                if buffer[pos] == "]":
                    return
                try:
                    item, pos = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as exc:
                    if not data:  # the stream has ended: this item never will
                        raise ControlError(f"{_where(cfg)} broke off GET {path}: {exc}") from None
                    break  # the item is not whole yet
                yield item
            if not data:
                raise ControlError(f"{_where(cfg)} broke off GET {path} before the end of the listing")
    finally:
        response.close()
