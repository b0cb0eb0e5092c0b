"""The web UI's users and mailboxes: changes over the API land in the files the server
reads (a user added here logs in over SMTP AUTH), under the rules of `mta users` and
`mta mailbox`, and only with the session's CSRF token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mta.users import User, hash_password, save_users
from tests.integration.conftest import MtaServer, SmtpClient
from tests.integration.test_security import secure_server
from tests.integration.tlscerts import Pki, make_pki
from tests.integration.webclient import Answer, call, login

pytestmark = pytest.mark.integration

TOKEN = "configured-token-0123456789"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def smtp_auth(port: int, pki: Pki, user: str, password: str) -> str:
    async def session() -> str:
        client = await SmtpClient.connect(port, helo=None, tls=pki.client_context())
        await client.command("EHLO client.test")
        reply = str(await client.auth_plain(user, password))
        await client.close()
        return reply
    return asyncio.run(session())


def test_users_added_changed_and_deleted_over_the_api(mta_server, tmp_path: Path, pki: Pki) -> None:
    users = tmp_path / "smtp-users"
    save_users(str(users), {"alice": User("alice", hash_password("correct horse"), ())})
    server, ports = secure_server(mta_server, tmp_path, pki, auth={"users_file": str(users)},
                                  control={"token": TOKEN})
    headers, _ = login(server, {"token": TOKEN})

    def post(path: str, body: object, **extra: str) -> Answer:
        return call(server, "POST", path, body, {**headers, **extra})

    listed = call(server, "GET", "/api/users", headers={"Cookie": headers["Cookie"]})
    assert listed.json() == {"users": [{"name": "alice", "senders": []}]} and b"scrypt" not in listed.body
    bob = {"name": "bob@local.test", "password": "pw one", "senders": ["@local.test"]}
    before = users.read_bytes()
    for refused in (post("/api/users/add", bob, **{"X-CSRF-Token": "wrong"}),
                    call(server, "POST", "/api/users/add", bob, {"Cookie": headers["Cookie"]})):
        assert refused.status == 403
    for bad, why in (({**bob, "name": "bo b"}, "white space"), ({**bob, "password": ""}, "password"),
                     ({**bob, "senders": ["nobody"]}, "@example.com"), ({"name": "alice", "password": "x"}, "exists")):
        answer = post("/api/users/add", bad)
        assert answer.status == 400 and why in answer.json()["error"], (bad, answer.body)
    # A body over the limit (here: many senders) is answered, not cut off: 413 saying what to do.
    many = post("/api/users/add", {**bob, "senders": [f"s{i}@local.test" for i in range(800)]})
    assert many.status == 413 and "send less" in many.json()["error"], (many.status, many.body)
    assert many.headers["content-security-policy"].startswith("default-src 'none'")
    for method in ("PUT", "DELETE", "PATCH"):  # only POST changes; the others are told so, not run on an empty body
        other = call(server, method, "/api/users/add", bob, headers)
        assert other.status == 405 and other.json()["error"] == "GET the lists, POST the changes", (method, other.body)
    assert users.read_bytes() == before
    assert smtp_auth(ports["smtps"], pki, "bob@local.test", "pw one").startswith("535")

    assert post("/api/users/add", bob).json() == {"ok": True, "name": "bob@local.test"}
    assert "bob@local.test:scrypt$" in users.read_text() and users.read_text().endswith(":@local.test\n")
    assert smtp_auth(ports["smtps"], pki, "bob@local.test", "pw one").startswith("235")
    assert post("/api/users/password", {"name": "bob@local.test", "password": "pw two"}).status == 200
    assert smtp_auth(ports["smtps"], pki, "bob@local.test", "pw one").startswith("535")
    assert smtp_auth(ports["smtps"], pki, "bob@local.test", "pw two").startswith("235")
    assert users.read_text().endswith(":@local.test\n")  # the senders stay
    assert post("/api/users/password", {"name": "carol", "password": "x"}).status == 400
    assert post("/api/users/delete", {"name": "bob@local.test"}).status == 200
    assert "bob" not in users.read_text() and "alice:scrypt$" in users.read_text()
    assert smtp_auth(ports["smtps"], pki, "bob@local.test", "pw two").startswith("535")
    assert b"event=account_change route=/api/users/add account=bob@local.test" in server.log_bytes()
    assert b"pw one" not in server.log_bytes()
    assert call(server, "GET", "/api/mailboxes", headers={"Cookie": headers["Cookie"]}).status == 409  # no [local] mailboxes


def test_mailboxes_added_limited_and_deleted_over_the_api(mta_server, tmp_path: Path) -> None:
    boxes = tmp_path / "mailboxes"
    mail = tmp_path / "mail"
    (mail / "local.test" / "carol" / "new").mkdir(parents=True)
    (mail / "local.test" / "carol" / "new" / "1.x").write_bytes(b"x" * 100)
    server: MtaServer = mta_server(control={"token": TOKEN},
                                   local={"mailboxes": str(boxes), "maildir_root": str(mail)},
                                   relay={"local_domains": ["local.test"]})
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert call(server, "GET", "/api/mailboxes", headers=bearer).json() == {"mailboxes": []}
    added = call(server, "POST", "/api/mailboxes/add", {"address": "Carol@local.test", "quota_bytes": 1000,
                                                        "aliases": ["c@local.test"]}, bearer)
    assert added.json() == {"ok": True, "address": "carol@local.test"}
    assert boxes.read_text() == "carol@local.test quota_bytes=1000 aliases=c@local.test\n"
    [row] = call(server, "GET", "/api/mailboxes", headers=bearer).json()["mailboxes"]
    assert row == {"address": "carol@local.test", "quota_bytes": 1000, "quota_messages": 0,
                   "aliases": ["c@local.test"], "used_bytes": 100, "used_messages": 1}
    for bad, why in (({"address": "c@local.test"}, "already an alias of carol@local.test"),
                     ({"address": "dave"}, "not an address"), ({"address": "d@local.test", "quota_bytes": -1}, "whole"),
                     ({"address": "d@local.test", "quota_bytes": 10**4000}, "quotas must be 0 (no limit) to ")):
        answer = call(server, "POST", "/api/mailboxes/add", bad, bearer)
        assert answer.status == 400 and why in answer.json()["error"], (bad, answer.body)
    limited = call(server, "POST", "/api/mailboxes/quota", {"address": "carol@local.test", "quota_messages": 5}, bearer)
    assert limited.json() == {"ok": True, "address": "carol@local.test", "quota_bytes": 1000, "quota_messages": 5}
    assert boxes.read_text() == "carol@local.test quota_bytes=1000 quota_messages=5 aliases=c@local.test\n"
    assert call(server, "POST", "/api/mailboxes/delete", {"address": "carol@local.test"}, bearer).status == 200
    assert boxes.read_text() == "" and (mail / "local.test" / "carol" / "new" / "1.x").exists()
    assert call(server, "POST", "/api/mailboxes/delete", {"address": "carol@local.test"}, bearer).status == 400
    assert call(server, "GET", "/api/users", headers=bearer).status == 409  # no [auth] users_file
