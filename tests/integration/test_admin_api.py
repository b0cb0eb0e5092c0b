"""The admin API against what a browser page, a DNS-rebinding page or a local user can send.

Real `mta serve`, real HTTP over loopback (http.client, which lets us set Host, Origin
and Content-Type as a browser would); the queue is checked through `mta queue` after
each attempt, so "refused" means the queue did not change.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import stat
import tomllib
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id, wait_until

pytestmark = pytest.mark.integration

TOKEN = "configured-token-0123456789"
BODY = b"Subject: secret\r\n\r\nthe quarterly figures\r\n"


def control_address(server: MtaServer) -> tuple[str, int]:
    assert server.config_path is not None
    host, _, port = tomllib.loads(server.config_path.read_text())["control"]["listen"].rpartition(":")
    return host, int(port)


def call(server: MtaServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, sent as given (a Host in `headers` replaces the real one): status, headers, body."""
    host, port = control_address(server)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start(server: MtaServer) -> list[str]:
    """Wait for the control process; queue two messages; their ids."""
    wait_until(lambda: _healthy(server), 10, "the control process", server)

    async def two() -> list[str]:
        client = await SmtpClient.connect(server.port)
        ids = [queued_id(await client.send_mail("s@client.test", [rcpt], BODY)) for rcpt in ("a@local.test",
                                                                                            "b@local.test")]
        await client.close()
        return ids  # type: ignore[return-value]

    return asyncio.run(two())


def _healthy(server: MtaServer) -> bool:
    try:
        return call(server, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def queued(server: MtaServer) -> list[str]:
    return sorted(e["id"] for e in server.queue_list())


def test_the_api_needs_a_token_even_on_loopback_and_the_cli_finds_the_generated_one(mta_server) -> None:
    server = mta_server(start=False)  # no [control] token
    old = os.umask(0)  # the token file is 0600 whatever the umask
    try:
        server.start()
    finally:
        os.umask(old)
    ids = start(server)
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic dXNlcjpwYXNz"}):
        status, answer, body = call(server, "GET", "/api/queue", headers=headers)
        assert status == 401 and answer["www-authenticate"].startswith("Bearer"), (status, answer)
        assert "token" in json.loads(body)["error"]
    for path in (f"/api/queue/{ids[0]}", f"/api/queue/{ids[0]}/body", "/api/domains"):
        status, _, body = call(server, "GET", path)
        assert status == 401 and b"quarterly" not in body

    token_file = server.spool / "control.token"
    st = token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    token = token_file.read_text().strip()
    assert len(token) >= 43
    status, _, body = call(server, "GET", "/api/queue", headers=bearer(token))
    assert status == 200 and sorted(e["id"] for e in json.loads(body)) == sorted(ids)
    # mta queue is told nothing: it reads the file itself, and goes through the API.
    assert queued(server) == sorted(ids)
    assert server.queue_body(ids[0]).endswith(BODY)
    assert server.mta("queue", "hold", ids[0]).stdout == b"hold: 1 message(s) (applied by the running scheduler)\n"
    wait_until(lambda: b"event=api method=POST path=/api/queue/hold status=200" in server.log_bytes(), 5,
               "the API log line", server)
    log = server.log_bytes()
    assert b"status=401 client=127.0.0.1 refused=token_missing" in log
    assert b"refused=token_wrong" in log and token.encode() not in log

    server.stop()  # the token outlives a restart
    server.start()
    wait_until(lambda: _healthy(server), 10, "the control process", server)
    assert token_file.read_text().strip() == token
    assert call(server, "GET", f"/api/queue/{ids[1]}", headers=bearer(token))[0] == 200


def test_a_configured_token_or_token_file_is_the_one_required(mta_server, tmp_path: Path) -> None:
    server = mta_server(control={"token": TOKEN})
    ids = start(server)
    assert call(server, "GET", f"/api/queue/{ids[0]}", headers=bearer(TOKEN))[0] == 200
    assert call(server, "GET", f"/api/queue/{ids[0]}", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
    assert call(server, "GET", f"/api/queue/{ids[0]}", headers=bearer(TOKEN[:-1]))[0] == 401
    assert not (server.spool / "control.token").exists()
    assert queued(server) == sorted(ids)

    (tmp_path / "etc").mkdir()
    token_file = tmp_path / "etc" / "api.token"
    other = mta_server(control={"token_file": str(token_file)})
    ids = start(other)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and not (other.spool / "control.token").exists()
    assert call(other, "GET", "/api/queue")[0] == 401
    assert call(other, "GET", "/api/queue", headers=bearer(token_file.read_text().strip()))[0] == 200
    assert queued(other) == sorted(ids)


def test_a_cross_origin_post_cannot_touch_the_queue(mta_server) -> None:
    server = mta_server()  # the default: no [control] token configured
    ids = start(server)
    host, port = control_address(server)
    everything = b'{"all": true}'
    # What any web page open in a browser on this host can send without a CORS preflight:
    # text/plain or a form, no Authorization.
    browser = {"Content-Type": "text/plain", "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert call(server, "POST", "/api/queue/delete", everything, browser)[0] == 403
    assert queued(server) == sorted(ids)
    assert call(server, "POST", "/api/queue/delete", everything, {"Content-Type": "text/plain"})[0] == 401
    token = (server.spool / "control.token").read_text().strip()
    # Even with the token: only JSON, only same-origin.
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        status, _, body = call(server, "POST", "/api/queue/delete", everything, {**bearer(token), "Content-Type": kind})
        assert status == 415 and "application/json" in json.loads(body)["error"], (kind, status)
    json_token = {**bearer(token), "Content-Type": "application/json"}
    for refused in ({"Origin": "http://evil.example"}, {"Origin": f"http://{host}:{port + 1}"},
                    {"Origin": f"https://{host}:{port}"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}):
        assert call(server, "POST", "/api/queue/delete", everything, {**json_token, **refused})[0] == 403, refused
    assert queued(server) == sorted(ids)  # untouched

    same_origin = {"Origin": f"http://{host}:{port}", "Sec-Fetch-Site": "same-origin"}
    status, _, body = call(server, "POST", "/api/queue/hold", json.dumps({"ids": [ids[0]]}).encode(),
                           {**json_token, **same_origin, "Content-Type": "application/json; charset=utf-8"})
    assert (status, json.loads(body)) == (200, {"op": "hold", "count": 1})
    status, _, body = call(server, "POST", "/api/queue/delete", json.dumps({"ids": [ids[1]]}).encode(), json_token)
    assert (status, json.loads(body)) == (200, {"op": "delete", "count": 1})
    assert [(e["id"], e["recipients"][0]["state"]) for e in server.queue_list()] == [(ids[0], "held")]
    log = server.log_bytes()
    assert b"status=403 client=127.0.0.1 refused=origin seen=http://evil.example" in log
    assert b"status=415 client=127.0.0.1 refused=content_type seen=text/plain" in log
    assert b"refused=fetch_site seen=cross-site" in log and token.encode() not in log


def test_a_foreign_host_cannot_read_a_message(mta_server) -> None:
    server = mta_server(control={"token": TOKEN})
    ids = start(server)
    host, port = control_address(server)
    body_path = f"/api/queue/{ids[0]}/body"
    # DNS rebinding: the page's own name now resolves to us, and the browser sends it as Host.
    for foreign in (f"evil.example:{port}", "evil.example", f"{host}:{port + 1}", f"localhost.evil.example:{port}"):
        status, _, body = call(server, "GET", body_path, headers={**bearer(TOKEN), "Host": foreign})
        assert status == 421 and b"quarterly" not in body and "allowed_hosts" in json.loads(body)["error"], foreign
    with socket.create_connection((host, port), timeout=10) as sock:  # HTTP/1.0, no Host at all
        sock.sendall(f"GET {body_path} HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        raw = b"".join(iter(lambda: sock.recv(65536), b""))
    assert raw.startswith(b"HTTP/1.1 421 ") and b"quarterly" not in raw
    for named in (f"{host}:{port}", host, f"localhost:{port}", "LocalHost"):  # localhost: the default allowed_hosts
        status, _, body = call(server, "GET", body_path, headers={**bearer(TOKEN), "Host": named})
        assert status == 200 and body.endswith(BODY), named
    assert call(server, "GET", "/metrics", headers={"Host": "prometheus.example"})[0] == 200  # not guarded
    assert f"refused=host seen=evil.example:{port}".encode() in server.log_bytes()

    named = mta_server(control={"token": TOKEN, "allowed_hosts": ["mta.test"]})  # replaces "localhost"
    ids = start(named)
    host, port = control_address(named)
    for name, status in (("mta.test", 200), (f"MTA.test:{port}", 200), (f"{host}:{port}", 200),
                         (f"localhost:{port}", 421), (f"mta.test:{port + 1}", 421)):
        assert call(named, "GET", f"/api/queue/{ids[0]}", headers={**bearer(TOKEN), "Host": name})[0] == status, name


def test_malformed_ids_get_a_404_or_400_reply_and_break_nothing(mta_server) -> None:
    server = mta_server(control={"token": TOKEN})
    ids = start(server)
    for path in ("/api/queue/", "/api/queue//body", "/api/queue/abc", "/api/queue/" + "A" * 600,
                 "/api/queue/" + "A" * 600 + "/body", "/api/queue/" + "G" * 21, "/api/queue/" + "0" * 21 + "/body",
                 f"/api/queue/{ids[0]}0", f"/api/queue/{ids[0]}/body/x", "/api/queue/%00"):
        status, answer, body = call(server, "GET", path, headers=bearer(TOKEN))
        assert (status, answer["content-type"]) == (404, "application/json"), path
        assert json.loads(body)["error"] in ("no such message", "no such endpoint"), path
    assert call(server, "GET", f"/api/queue/{ids[0].lower()}", headers=bearer(TOKEN))[0] == 200
    post = {**bearer(TOKEN), "Content-Type": "application/json"}
    for which in ({"ids": [""]}, {"ids": ["A" * 600]}, {"ids": "abc"}, {"ids": [ids[0], 7]}):
        status, _, body = call(server, "POST", "/api/queue/hold", json.dumps(which).encode(), post)
        assert status == 400 and "not a message id" in json.loads(body)["error"], which
    # "all" is JSON true itself: a string "false", a 1 or a list is a mistake, never every message.
    for which in ({"all": "false"}, {"all": 1}, {"all": [False]}, {"all": "no", "ids": [ids[0]]}):
        status, _, body = call(server, "POST", "/api/queue/delete", json.dumps(which).encode(), post)
        assert status == 400 and json.loads(body)["error"].startswith('name {"ids"'), which
    assert queued(server) == sorted(ids)
    # The control process and the scheduler behind it still answer.
    status, _, body = call(server, "POST", "/api/queue/hold", json.dumps({"ids": ids}).encode(), post)
    assert (status, json.loads(body)) == (200, {"op": "hold", "count": 2})
    assert queued(server) == sorted(ids)
