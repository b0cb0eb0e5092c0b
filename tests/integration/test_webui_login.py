"""The web UI's login, session cookie, CSRF token, lockout and security headers.

Real `mta serve`, real HTTP over loopback as a browser page sends it (webclient.py); the
queue is read back through `mta queue` after each attempt, so "refused" means unchanged.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id, wait_until
from tests.integration.webclient import CSP, Answer, call, control_address, cookie_of, login, wait_for_control
from workers.control.webui import WEBUI_DIR

pytestmark = pytest.mark.integration

TOKEN = "configured-token-0123456789"
BODY = b"Subject: hello\r\n\r\nthe figures\r\n"


def queue_one(server: MtaServer) -> str:
    async def send() -> str:
        client = await SmtpClient.connect(server.port)
        msgid = queued_id(await client.send_mail("s@client.test", ["a@local.test"], BODY))
        await client.close()
        assert msgid is not None
        return msgid
    return asyncio.run(send())


def states(server: MtaServer) -> list[str]:
    return [r["state"] for e in server.queue_list() for r in e["recipients"]]


def secure_headers(answer: Answer) -> bool:
    h = answer.headers
    return (h.get("content-security-policy") == CSP and h.get("x-content-type-options") == "nosniff"
            and h.get("referrer-policy") == "no-referrer" and h.get("x-frame-options") == "DENY"
            and h.get("cache-control") == "no-store" and h.get("cross-origin-opener-policy") == "same-origin")


def test_a_token_login_gives_a_strict_cookie_and_every_change_needs_its_csrf_token(mta_server) -> None:
    server = mta_server(control={"token": TOKEN})
    wait_for_control(server)
    msgid = queue_one(server)
    host, port = control_address(server)
    seen: list[Answer] = []

    def ask(method: str, path: str, body: object = None, **headers: str) -> Answer:
        answer = call(server, method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
        seen.append(answer)
        return answer

    moved = ask("GET", "/ui")
    assert moved.status == 301 and moved.headers["location"] == "/ui/"
    assert ask("GET", "/ui/session").status == 401
    assert ask("GET", "/api/queue?limit=10").status == 401
    wrong = ask("POST", "/ui/login", {"token": TOKEN + "x"})
    assert (wrong.status, wrong.json(), wrong.cookies) == (401, {"error": "wrong token or password"}, [])
    assert ask("POST", "/ui/login", {"user": "token", "password": TOKEN}).status == 401  # no admin users file
    good = ask("POST", "/ui/login", {"token": TOKEN})
    assert good.status == 200 and good.json()["user"] == "token"
    csrf = good.json()["csrf"]
    flags = [f.strip() for f in good.cookies[0].split(";")]
    assert flags[0].startswith("mta_session=") and len(flags[0]) > 40
    assert sorted(flags[1:]) == ["HttpOnly", "Path=/", "SameSite=Strict"]  # no Secure without TLS
    cookie = cookie_of(good)
    assert ask("GET", "/ui/session", Cookie=cookie).json() == {"user": "token", "csrf": csrf}
    listing = ask("GET", "/api/queue?limit=10", Cookie=cookie)
    assert listing.status == 200 and [m["id"] for m in listing.json()["messages"]] == [msgid]

    # A change without the CSRF token, with a wrong one, or from another origin: refused, nothing changes.
    hold = {"ids": [msgid]}
    for headers in ({}, {"X_CSRF_Token": csrf[:-1]}, {"X_CSRF_Token": ""}, {"X_CSRF_Token": csrf + "x"}):
        refused = ask("POST", "/api/queue/hold", hold, Cookie=cookie, **headers)
        assert refused.status == 403 and refused.json() == {"error": "missing or wrong X-CSRF-Token"}, headers
    for origin in ("http://evil.example", f"https://{host}:{port}", f"http://{host}:{port + 1}"):
        assert ask("POST", "/api/queue/hold", hold, Cookie=cookie, X_CSRF_Token=csrf, Origin=origin).status == 403
    assert ask("POST", "/api/queue/hold", hold, Cookie=cookie + "x", X_CSRF_Token=csrf).status == 401
    assert states(server) == ["ready"]
    done = ask("POST", "/api/queue/hold", hold, Cookie=cookie, X_CSRF_Token=csrf, Origin=f"http://{host}:{port}")
    assert (done.status, done.json()) == (200, {"op": "hold", "count": 1})
    assert states(server) == ["held"]
    # The Bearer clients (mta queue) are as before.
    assert server.mta("queue", "release", msgid).returncode == 0 and states(server) == ["ready"]

    assert ask("POST", "/ui/logout", Cookie=cookie).status == 403  # no CSRF token: still logged in
    assert ask("GET", "/ui/session", Cookie=cookie).status == 200
    out = ask("POST", "/ui/logout", Cookie=cookie, X_CSRF_Token=csrf)
    assert out.status == 204 and "Max-Age=0" in out.cookies[0] and out.cookies[0].startswith("mta_session=;")
    assert ask("GET", "/ui/session", Cookie=cookie).status == 401
    assert ask("POST", "/api/queue/hold", hold, Cookie=cookie, X_CSRF_Token=csrf).status == 401
    assert states(server) == ["ready"]
    assert all(secure_headers(a) for a in seen), [(a.status, a.headers) for a in seen if not secure_headers(a)]
    log = server.log_bytes()
    assert b"event=ui_login client=127.0.0.1 result=wrong" in log and b"result=ok user=token" in log
    assert b"refused=csrf" in log and TOKEN.encode() not in log and csrf.encode() not in log


def test_failed_logins_lock_the_address_out_after_the_limit(mta_server) -> None:
    server = mta_server(control={"token": TOKEN}, auth={"max_failures": 3, "lockout_seconds": 600})
    wait_for_control(server)
    for _ in range(3):
        assert call(server, "POST", "/ui/login", {"token": "guess"}).status == 401
    locked = call(server, "POST", "/ui/login", {"token": TOKEN})  # the right token, too late
    assert locked.status == 429 and locked.cookies == [] and secure_headers(locked)
    assert 590 <= int(locked.headers["retry-after"]) <= 600
    assert locked.json()["error"].startswith("too many failed logins from this address; try again in ")
    # Another address is not locked out; Bearer clients never are.
    assert call(server, "POST", "/ui/login", {"token": TOKEN}, source="127.0.0.2").status == 200
    assert call(server, "GET", "/api/queue?limit=1", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    assert b"event=ui_login client=127.0.0.1 result=locked" in server.log_bytes()


def test_the_page_is_served_from_a_fixed_table_and_nothing_else_is(mta_server, tmp_path: Path) -> None:
    server = mta_server(control={"token": TOKEN})
    wait_for_control(server)
    (server.spool.parent / "secret.txt").write_text("not for the web")
    for path in ("/ui/../x", "/ui/%2e%2e/", "/ui/%2e%2e/%2e%2e/etc/passwd", "/ui/..%2fsecret.txt", "/ui/./",
                 "/ui//etc/passwd", "/ui/nothing.js", "/ui/.git/config", "/uix"):
        answer = call(server, "GET", path)
        assert answer.status == 404 and b"not for the web" not in answer.body, path
        if path != "/uix":
            assert secure_headers(answer), path
    assert call(server, "DELETE", "/ui/").status == 405
    for name in ("index.html", "app.js", "app.css"):  # the page's files, as shipped
        if (WEBUI_DIR / name).is_file():
            shown = call(server, "GET", "/ui/" if name == "index.html" else f"/ui/{name}")
            assert shown.status == 200 and shown.body == (WEBUI_DIR / name).read_bytes() and secure_headers(shown)
    # A foreign Host (DNS rebinding) gets nothing either.
    assert call(server, "GET", "/ui/session", headers={"Host": "evil.example"}).status == 421
    assert call(server, "GET", "/ui/", headers={"Host": "evil.example"}).status == 421
    # A link from another site opens the page's files; its session and API stay same-origin only.
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert call(server, "GET", "/ui/", headers=cross).status == 200
    assert call(server, "GET", "/ui/session", headers=cross).status == 403
    assert call(server, "GET", "/ui/session", headers={"Origin": "http://evil.example"}).status == 403
    assert call(server, "POST", "/ui/login", {"token": TOKEN}, {"Host": "evil.example"}).status == 421
    assert call(server, "POST", "/ui/login", {"token": TOKEN}, {"Origin": "http://evil.example"}).status == 403
    assert call(server, "POST", "/ui/login", b'{"token": "%s"}' % TOKEN.encode(),
                {"Content-Type": "text/plain"}).status == 415


def test_an_admin_user_of_the_admin_users_file_logs_in_with_a_password(mta_server, tmp_path: Path) -> None:
    admins = tmp_path / "admins"
    server = mta_server(control={"token": TOKEN, "admin_users_file": str(admins)})
    wait_for_control(server)
    assert call(server, "POST", "/ui/login", {"user": "ops", "password": "s3cret pass"}).status == 401
    server.mta("users", "add", "--file", str(admins), "ops", stdin=b"s3cret pass\n")  # read at each login
    assert call(server, "POST", "/ui/login", {"user": "ops", "password": "s3cret"}).status == 401
    assert call(server, "POST", "/ui/login", {"user": "Ops", "password": "s3cret pass"}).status == 401
    headers, user = login(server, {"user": "ops", "password": "s3cret pass"})
    assert user == "ops"
    assert call(server, "GET", "/ui/session", headers={"Cookie": headers["Cookie"]}).json()["user"] == "ops"
    assert call(server, "GET", "/api/queue?limit=1", headers=headers).status == 200

    # Another admin added: the session stays. Its password changed, or the admin deleted: the session ends.
    server.mta("users", "add", "--file", str(admins), "other", stdin=b"other pass\n")
    assert call(server, "GET", "/api/queue?limit=1", headers=headers).status == 200
    server.mta("users", "passwd", "--file", str(admins), "ops", stdin=b"new pass\n")
    assert call(server, "GET", "/api/queue?limit=1", headers=headers).status == 401
    assert call(server, "GET", "/ui/session", headers={"Cookie": headers["Cookie"]}).status == 401
    by_other, _ = login(server, {"user": "other", "password": "other pass"})
    by_token, _ = login(server, {"token": TOKEN})
    server.mta("users", "delete", "--file", str(admins), "other")
    assert call(server, "GET", "/ui/session", headers={"Cookie": by_other["Cookie"]}).status == 401
    assert call(server, "POST", "/api/queue/hold", {"all": True}, headers=by_other).status == 401
    assert call(server, "GET", "/ui/session", headers={"Cookie": by_token["Cookie"]}).status == 200
    assert b"event=ui_session_end user=other" in server.log_bytes()


def test_a_new_token_on_sighup_logs_out_the_sessions_of_the_old_one(mta_server, tmp_path: Path) -> None:
    admins = tmp_path / "admins"
    server = mta_server(control={"token": TOKEN, "admin_users_file": str(admins)})
    wait_for_control(server)
    server.mta("users", "add", "--file", str(admins), "ops", stdin=b"s3cret pass\n")
    by_token, _ = login(server, {"token": TOKEN})
    by_admin, _ = login(server, {"user": "ops", "password": "s3cret pass"})
    assert server.config_path is not None
    server.config_path.write_text(server.config_path.read_text().replace(TOKEN, "the-next-token-0123456789"))
    os.kill(server.master_pid, signal.SIGHUP)
    wait_until(lambda: call(server, "GET", "/api/queue?limit=1",
                            headers={"Authorization": "Bearer the-next-token-0123456789"}).status == 200,
               10, "the new token", server)
    assert call(server, "GET", "/ui/session", headers={"Cookie": by_token["Cookie"]}).status == 401
    assert call(server, "GET", "/ui/session", headers={"Cookie": by_admin["Cookie"]}).json()["user"] == "ops"
