"""The admin API's users and mailboxes routes (the web UI's Users and Mailboxes pages).

  GET  /api/users               {"users": [{"name", "senders"}]}: never a hash
  POST /api/users/add           {"name", "password", "senders"?: [...]}
  POST /api/users/password      {"name", "password"}
  POST /api/users/delete        {"name"}
  GET  /api/mailboxes           {"mailboxes": [{"address", "quota_bytes", "quota_messages",
                                 "aliases", "used_bytes", "used_messages"}]}
  POST /api/mailboxes/add       {"address", "quota_bytes"?, "quota_messages"?, "aliases"?: [...]}
  POST /api/mailboxes/quota     {"address", "quota_bytes"?, "quota_messages"?} (0: no limit)
  POST /api/mailboxes/delete    {"address"} (the folder and its mail stay, as with the CLI)

The same rules and the same edits as `mta users` and `mta mailbox` (mta/users.py,
mta/mailboxfile.py: one editor at a time, atomic replace; the running server sees a change
at its next lookup). A change answers {"ok": true, ...}; a broken rule 400 {"error"}; no
[auth] users_file or [local] mailboxes 409 {"error"}. Files are read, scrypt is run and
mailboxes are counted in a worker thread: the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from mta import logs, users
from mta.config import Config
from mta.mailboxcli import usage_row
from mta.mailboxfile import Mailbox, MailboxFileError, add_mailbox, delete_mailbox, load_mailboxes, set_quota
from workers.control.api import Reply, json_reply

NO_USERS_FILE: Final = "no users file: set [auth] users_file in the configuration (then SIGHUP mta)"
NO_MAILBOXES_FILE: Final = "no mailboxes file: set [local] mailboxes in the configuration (then SIGHUP mta)"


class BadRequest(ValueError):
    """What to change in the request (400)."""


class Accounts:
    def __init__(self, config: Config) -> None:
        self.config = config

    async def answer(self, method: bytes, path: str, payload: bytes) -> Reply | None:
        """The reply, or None when `path` is not one of these routes."""
        if path not in ROUTES:
            return None
        if method != (b"GET" if path in ("/api/users", "/api/mailboxes") else b"POST"):  # a PUT changes nothing
            return json_reply(b"405 Method Not Allowed", {"error": "GET the lists, POST the changes"})
        users_route = path.startswith("/api/users")
        file = self.config.auth.users_file if users_route else self.config.local.mailboxes
        if not file:
            return json_reply(b"409 Conflict", {"error": NO_USERS_FILE if users_route else NO_MAILBOXES_FILE})
        try:
            body = _object(payload) if method == b"POST" else {}
            answer = await asyncio.to_thread(ROUTES[path], self, file, body)
        except (BadRequest, users.UsersError, MailboxFileError) as exc:
            return json_reply(b"400 Bad Request", {"error": str(exc)})
        except OSError as exc:
            return json_reply(b"500 Internal Server Error", {"error": f"{file}: {exc}"})
        if method == b"POST":
            logs.event("account_change", route=path, account=answer.get("name") or answer.get("address"))
        return json_reply(b"200 OK", answer)

    # Each runs in a worker thread.
    def list_users(self, path: str, _: dict[str, Any]) -> dict[str, Any]:
        try:
            table = users.load_users(path)
        except FileNotFoundError:
            table = {}
        return {"users": [{"name": u.name, "senders": list(u.senders)} for u in table.values()]}

    def add_user(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        name, senders = _text(body, "name"), _texts(body, "senders")
        users.check_name(name)
        for entry in senders:
            users.check_sender(entry)
        users.add_user(path, users.User(name, users.hash_password(_password(body)), tuple(senders)))
        return {"ok": True, "name": name}

    def set_password(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        name = _text(body, "name")
        users.set_password(path, name, users.hash_password(_password(body)))
        return {"ok": True, "name": name}

    def delete_user(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        name = _text(body, "name")
        users.delete_user(path, name)
        return {"ok": True, "name": name}

    def list_mailboxes(self, path: str, _: dict[str, Any]) -> dict[str, Any]:
        try:
            table = load_mailboxes(path)
        except FileNotFoundError:
            return {"mailboxes": []}
        rows = [usage_row(self.config, box) for box in table.mailboxes.values()]
        return {"mailboxes": [{"address": r["address"], "quota_bytes": r["quota_bytes"],
                               "quota_messages": r["quota_messages"], "aliases": r["aliases"],
                               "used_bytes": r["bytes"], "used_messages": r["messages"]} for r in rows]}

    def add_mailbox(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        box = Mailbox(_text(body, "address").lower(), _count(body, "quota_bytes") or 0,
                      _count(body, "quota_messages") or 0, tuple(a.strip().lower() for a in _texts(body, "aliases")))
        add_mailbox(path, box)
        return {"ok": True, "address": box.address}

    def set_quota(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        box = set_quota(path, _text(body, "address").lower(), _count(body, "quota_bytes"),
                        _count(body, "quota_messages"))
        return {"ok": True, "address": box.address, "quota_bytes": box.quota_bytes,
                "quota_messages": box.quota_messages}

    def delete_mailbox(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        address = _text(body, "address").lower()
        delete_mailbox(path, address)
        return {"ok": True, "address": address}


ROUTES: Final = {
    "/api/users": Accounts.list_users, "/api/users/add": Accounts.add_user,
    "/api/users/password": Accounts.set_password, "/api/users/delete": Accounts.delete_user,
    "/api/mailboxes": Accounts.list_mailboxes, "/api/mailboxes/add": Accounts.add_mailbox,
    "/api/mailboxes/quota": Accounts.set_quota, "/api/mailboxes/delete": Accounts.delete_mailbox,
}


def _object(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload or b"{}")
    except ValueError:
        raise BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f'"{key}" must be a non-empty string')
    return value


def _texts(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f'"{key}" must be a list of strings')
    return value


def _password(body: dict[str, Any]) -> str:
    """The rule of `mta users` (mta/cli.py _read_password): not empty, no NUL."""
    password = _text(body, "password")
    if "\0" in password:
        raise BadRequest("the password must not be empty or contain NUL")
    return password


def _count(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BadRequest(f'"{key}" must be a whole number, 0 for no limit')
    return value
