"""A small HTTP(S) client for the control listener, as a browser page talks to it: one
request per call, the Host, Origin, Cookie and X-CSRF-Token headers as given."""

from __future__ import annotations

import http.client
import json
import ssl
import tomllib
from dataclasses import dataclass
from typing import Any

from tests.integration.conftest import MtaServer, wait_until

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    cookies: list[str]  # every Set-Cookie line

    def json(self) -> Any:
        return json.loads(self.body)


def control_address(server: MtaServer) -> tuple[str, int]:
    assert server.config_path is not None
    host, _, port = tomllib.loads(server.config_path.read_text())["control"]["listen"].rpartition(":")
    return host, int(port)


def call(server: MtaServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         tls: ssl.SSLContext | None = None, source: str | None = None, host: str | None = None) -> Answer:
    """One request; a dict or list body is sent as JSON (Content-Type: application/json)."""
    listen_host, port = control_address(server)
    connect_to = host or listen_host
    source_address = (source, 0) if source else None
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(connect_to, port, timeout=20, context=tls, source_address=source_address)
    else:
        conn = http.client.HTTPConnection(connect_to, port, timeout=20, source_address=source_address)
    sent = dict(headers or {})
    data = body
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, data, sent)
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(),
                      response.headers.get_all("Set-Cookie") or [])
    finally:
        conn.close()


def cookie_of(answer: Answer) -> str:
    """'mta_session=...' from a login's Set-Cookie."""
    assert answer.cookies, answer
    return answer.cookies[0].partition(";")[0]


def login(server: MtaServer, credentials: dict[str, str], **kw: Any) -> tuple[dict[str, str], str]:
    """Log in: the headers a page then sends (Cookie, X-CSRF-Token), and the user shown."""
    answer = call(server, "POST", "/ui/login", credentials, **kw)
    assert answer.status == 200, (answer.status, answer.body)
    return {"Cookie": cookie_of(answer), "X-CSRF-Token": answer.json()["csrf"]}, answer.json()["user"]


def wait_for_control(server: MtaServer, **kw: Any) -> None:
    def up() -> bool:
        try:
            return call(server, "GET", "/healthz", **kw).status == 200
        except OSError:
            return False
    wait_until(up, 15, "the control process", server)
