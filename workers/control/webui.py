"""The web UI's /ui/ routes: the page's static files, login, session and logout.

  GET  /ui          301 to /ui/
  GET  /ui/         index.html; GET /ui/NAME: a file of the page (mta/webui/), all of them
                    read once at start: a fixed table, so no path reaches the file system
                    (no `..`, no listing, no file added later)
  POST /ui/login    {"token": T} ([control] token) or {"user": U, "password": P} (an
                    admin of [control] admin_users_file, scrypt as mta/users.py): 200
                    {"user", "csrf"} and a new mta_session cookie (the session the old
                    one named ends); 401 for a wrong one; 429
                    (Retry-After) while the client's address is locked out (websession.py)
  GET  /ui/session  {"user", "csrf"} for a live session cookie, else 401 (an admin's
                    session ends when the file no longer has its name and hash: current())
  POST /ui/logout   with the session's X-CSRF-Token: 204, the session gone, the cookie cleared

Every route is behind the guard's Host/Origin checks (guard.check_browser; the page's
files behind its Host check alone, guard.check_host), and logins
behind its Content-Type check. The caller adds the security headers (SECURITY_HEADERS).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import mta
from mta import logs, users
from workers.control.api import Reply, json_reply
from workers.control.guard import Guard, Refusal, check_body
from workers.control.websession import Lockout, Session, Sessions, clear_cookie, set_cookie

WEBUI_DIR: Final = Path(mta.__file__).parent / "webui"
MAX_FILE_BYTES: Final = 4 * 1024**2
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
              "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Final = (f"Content-Security-Policy: {CSP}\r\n"
                           "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
                           "X-Frame-Options: DENY\r\nCache-Control: no-store\r\n"
                           "Cross-Origin-Opener-Policy: same-origin\r\n").encode()  # an opener cannot steer the page
TYPES: Final = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml", ".png": b"image/png",
                ".ico": b"image/x-icon", ".json": b"application/json", ".txt": b"text/plain; charset=utf-8",
                ".woff2": b"font/woff2"}
WRONG: Final = "wrong token or password"
ADMINS_UNREADABLE: Final = ("[control] admin_users_file cannot be read: the control process's log (event=ui_login "
                            "result=error) says why; the token still logs in")
# Checked when the user is unknown, so that a wrong name costs the same scrypt as a wrong password.
_DECOY_HASH: Final = users.hash_password("decoy")

Clock = Callable[[], float]


def read_files(directory: Path) -> dict[str, tuple[bytes, bytes]]:
    """Every regular file under `directory` (no dot files): relative name -> (content, type)."""
    files = {}
    for path in sorted(directory.rglob("*")) if directory.is_dir() else ():
        name = path.relative_to(directory).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in name.split("/")):
            if path.stat().st_size <= MAX_FILE_BYTES:
                files[name] = (path.read_bytes(), TYPES.get(path.suffix.lower(), b"application/octet-stream"))
    return files


class WebUi:
    def __init__(self, files: dict[str, tuple[bytes, bytes]], sessions: Sessions, lockout: Lockout,
                 clock: Clock = time.monotonic) -> None:
        self.files = files
        self.sessions = sessions
        self.lockout = lockout
        self.clock = clock
        self.admin_users_file = ""
        self.tls = False

    def session(self, headers: dict[bytes, bytes]) -> Session | None:
        return self.sessions.find(headers.get(b"cookie"), self.clock())

    async def current(self, headers: dict[bytes, bytes]) -> Session | None:
        """The cookie's live session. An admin's ends once the admin users file no longer
        holds its name with the hash it logged in with (deleted, a new password, the file
        gone or broken): a stat per request, the file read again only when it changed."""
        session = self.session(headers)
        if session is None or not session.credential:
            return session
        stamp = _stamp(self.admin_users_file)
        if stamp != session.admins_stamp:
            admin = await asyncio.to_thread(_admin_entry, self.admin_users_file, session.user)
            if admin is None or admin.hash != session.credential:
                self.sessions.end(session)
                logs.event("ui_session_end", user=session.user[:100], reason="admin_users_file changed")
                return None
            session.admins_stamp = stamp
        return session

    async def answer(self, guard: Guard, method: bytes, path: bytes, headers: dict[bytes, bytes], payload: bytes,
                     client: str) -> tuple[Reply, Refusal | None]:
        """The reply, and the guard's refusal when there was one (for the log)."""
        page = method == b"GET" and path != b"/ui/session"  # the page's public files: a link from elsewhere opens it
        refusal = guard.check_host(headers) if page else guard.check_browser(headers)
        if refusal is None and method == b"POST" and path == b"/ui/login":
            refusal = check_body(method, headers)
        if refusal is not None:
            refused = json_reply(refusal.status, {"error": refusal.message})
            return Reply(refused.status, refused.body, headers=refusal.headers), refusal
        if method == b"POST" and path == b"/ui/login":
            return await self._login(guard, headers, payload, client), None
        if method == b"POST" and path == b"/ui/logout":
            return self._logout(headers), None
        if method != b"GET":
            return json_reply(b"405 Method Not Allowed", {"error": "only GET, and POST to /ui/login and /ui/logout"}), None
        if path == b"/ui":
            return Reply(b"301 Moved Permanently", b"", b"text/plain", b"Location: /ui/\r\n"), None
        if path == b"/ui/session":
            session = await self.current(headers)
            if session is None:
                return json_reply(b"401 Unauthorized", {"error": "not logged in"}), None
            return json_reply(b"200 OK", {"user": session.user, "csrf": session.csrf}), None
        name = path.removeprefix(b"/ui/").decode("ascii", "replace") or "index.html"
        if name not in self.files:
            return json_reply(b"404 Not Found", {"error": "no such page"}), None
        content, kind = self.files[name]
        return Reply(b"200 OK", content, kind), None

    async def _login(self, guard: Guard, headers: dict[bytes, bytes], payload: bytes, client: str) -> Reply:
        now = self.clock()
        wait = self.lockout.check(client, now)
        if wait:
            logs.event("ui_login", client=client, result="locked")
            return Reply(b"429 Too Many Requests", _error(f"too many failed logins from this address; try again in "
                                                          f"{wait:.0f} s"), headers=b"Retry-After: %d\r\n" % wait)
        try:
            given = json.loads(payload)
        except ValueError:
            given = None
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()) or not (
                "token" in given or ("user" in given and "password" in given)):
            return json_reply(b"400 Bad Request", {"error": 'send {"token": "..."} or {"user": "...", "password": "..."}'})
        self.lockout.begin(client)
        try:
            user = "token" if "token" in given and guard.check_login_token(given["token"]) else None
            admin, stamp = None, None
            if "token" not in given:
                stamp = _stamp(self.admin_users_file)  # before the read: a change after it is seen
                admin = await self._admin(given["user"], given["password"])
                user = admin.name if admin else None
        except (OSError, users.UsersError) as exc:
            logs.event("ui_login", client=client, result="error", error=str(exc))  # its path and line: not for the client
            return json_reply(b"503 Service Unavailable", {"error": ADMINS_UNREADABLE})
        finally:
            self.lockout.end(client)
        if user is None:
            self.lockout.fail(client, self.clock())
            logs.event("ui_login", client=client, result="wrong", user=given.get("user", "token")[:100])
            return json_reply(b"401 Unauthorized", {"error": WRONG})
        if (previous := self.session(headers)) is not None:  # a login replaces the cookie: the old one ends
            self.sessions.end(previous)
        session = self.sessions.create(user, self.clock())
        if admin is not None:
            session.credential, session.admins_stamp = admin.hash, stamp
        logs.event("ui_login", client=client, result="ok", user=user[:100])
        reply = json_reply(b"200 OK", {"user": user, "csrf": session.csrf})
        return Reply(reply.status, reply.body, headers=set_cookie(session, self.tls))

    async def _admin(self, name: str, password: str) -> users.User | None:
        """The admin `name` when it has this password (scrypt, in a worker thread)."""
        if not self.admin_users_file:
            await asyncio.to_thread(users.verify_password, password, _DECOY_HASH)
            return None
        try:
            admins = await asyncio.to_thread(users.load_users, self.admin_users_file)
        except FileNotFoundError:  # no admin added yet (mta users add --file)
            admins = {}
        admin = admins.get(name)
        matches = await asyncio.to_thread(users.verify_password, password, admin.hash if admin else _DECOY_HASH)
        return admin if admin and matches else None

    def _logout(self, headers: dict[bytes, bytes]) -> Reply:
        session = self.session(headers)
        if session is None:
            return json_reply(b"401 Unauthorized", {"error": "not logged in"})
        if not session.check_csrf(headers.get(b"x-csrf-token")):
            return json_reply(b"403 Forbidden", {"error": "missing or wrong X-CSRF-Token"})
        self.sessions.end(session)
        return Reply(b"204 No Content", b"", headers=clear_cookie(self.tls))


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _admin_entry(path: str, name: str) -> users.User | None:
    """The admin `name` of the file now; None when it is not there (or the file is gone or broken)."""
    try:
        return users.load_users(path).get(name)
    except (OSError, users.UsersError) as exc:
        if not isinstance(exc, FileNotFoundError):
            logs.event("ui_session_check", file=path, error=str(exc))
        return None


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"

