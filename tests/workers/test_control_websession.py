"""The web UI's sessions, lockout and static files (pure; the page's files from a temp dir)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from workers.control.guard import Guard
from workers.control.webui import WebUi, read_files
from workers.control.websession import LIFETIME_SECONDS, MAX_SESSIONS, Lockout, Sessions, clear_cookie, session_id, set_cookie


def cookie(session_value: str) -> bytes:
    return b"theme=dark; mta_session=" + session_value.encode() + b"; other=1"


def test_a_session_ends_after_its_idle_time_and_each_request_restarts_the_clock() -> None:
    sessions = Sessions(idle_seconds=100)
    s = sessions.create("ops", now=0)
    assert sessions.find(cookie(s.id), 99) is s
    assert sessions.find(cookie(s.id), 198) is s  # 99 s after the last request
    assert sessions.find(cookie(s.id), 298) is None and len(sessions) == 0
    t = sessions.create("ops", 300)
    assert sessions.find(cookie(t.id + "x"), 301) is None and sessions.find(b"mta_session=", 301) is None
    sessions.end(t)
    assert sessions.find(cookie(t.id), 302) is None
    assert s.id != t.id and s.csrf != t.csrf and len(t.id) >= 43


def test_a_session_in_constant_use_still_ends_a_lifetime_after_its_login() -> None:
    sessions = Sessions(idle_seconds=3600)
    s = sessions.create("ops", now=0)
    for t in range(10, LIFETIME_SECONDS, 10):  # an open overview asks every 10 s
        assert sessions.find(cookie(s.id), t) is s
    assert sessions.find(cookie(s.id), LIFETIME_SECONDS) is None and len(sessions) == 0
    long_idle = Sessions(idle_seconds=2 * LIFETIME_SECONDS)  # a longer session_seconds is the lifetime
    t = long_idle.create("ops", 0)
    assert long_idle.find(cookie(t.id), LIFETIME_SECONDS + 1) is t


def test_a_changed_token_ends_the_sessions_made_with_it() -> None:
    sessions = Sessions(idle_seconds=100)
    by_token, by_admin = sessions.create("token", 0), sessions.create("ops", 0)
    sessions.end_all("token")
    assert sessions.find(cookie(by_token.id), 1) is None and sessions.find(cookie(by_admin.id), 1) is by_admin


def test_sessions_are_bounded_the_oldest_go_first() -> None:
    sessions = Sessions(idle_seconds=1e9)
    first = sessions.create("a", 0)
    for i in range(MAX_SESSIONS):
        sessions.create("b", i)
    assert len(sessions) == MAX_SESSIONS and sessions.find(cookie(first.id), 1) is None


def test_cookies() -> None:
    s = Sessions(10).create("ops", 0)
    assert set_cookie(s, secure=False) == f"Set-Cookie: mta_session={s.id}; Path=/; HttpOnly; SameSite=Strict\r\n".encode()
    assert set_cookie(s, secure=True).endswith(b"; SameSite=Strict; Secure\r\n")
    assert clear_cookie(True) == b"Set-Cookie: mta_session=; Path=/; HttpOnly; SameSite=Strict; Secure; Max-Age=0\r\n"
    assert session_id(b"a=1;mta_session=xyz") == "xyz" and session_id(b"mta_sessionx=1") is None
    assert session_id(None) is None


def test_failures_lock_an_address_out_until_the_window_ends() -> None:
    lockout = Lockout(max_failures=3, lockout_seconds=600)
    for t in (0, 10, 20):
        assert lockout.check("192.0.2.1", t) == 0
        lockout.fail("192.0.2.1", t)
    assert lockout.check("192.0.2.1", 30) == 570 and lockout.check("192.0.2.2", 30) == 0
    assert lockout.check("192.0.2.1", 600) == 0  # the window began at the first failure
    lockout.begin("192.0.2.3")
    lockout.begin("192.0.2.3")
    lockout.fail("192.0.2.3", 0)
    assert lockout.check("192.0.2.3", 0) > 0  # two being checked count as they may fail
    lockout.end("192.0.2.3")
    lockout.end("192.0.2.3")
    assert lockout.check("192.0.2.3", 0) == 0


def test_an_ipv6_client_counts_per_64_so_another_address_of_its_host_gains_nothing() -> None:
    lockout = Lockout(max_failures=2, lockout_seconds=600)
    lockout.fail("2001:db8:1:2::1", 0)
    lockout.fail("2001:db8:1:2:ffff:ffff:ffff:fffe", 1)
    assert lockout.check("2001:db8:1:2::abcd", 2) > 0 and lockout.check("2001:db8:1:3::1", 2) == 0
    lockout.begin("2001:db8:1:2::7")  # begin and end from other addresses of the /64 balance
    lockout.end("2001:db8:1:2::8")
    lockout.fail("::ffff:192.0.2.1", 0)  # an IPv4-mapped client is its IPv4 address
    lockout.fail("192.0.2.1", 0)
    assert lockout.check("192.0.2.1", 1) > 0 and lockout.check("192.0.2.2", 1) == 0


def test_a_login_with_a_session_cookie_ends_that_session_and_gives_a_new_one() -> None:
    ui = WebUi({}, Sessions(100), Lockout(3, 60), clock=lambda: 0.0)
    guard = Guard("127.0.0.1:9025", [], "t")
    base = {b"host": b"127.0.0.1:9025", b"content-type": b"application/json"}

    def ask(method: bytes, path: bytes, cookie_value: str | None = None) -> tuple[bytes, bytes]:
        headers = base | ({b"cookie": cookie(cookie_value)} if cookie_value else {})
        reply, _ = asyncio.run(ui.answer(guard, method, path, headers, b'{"token": "t"}', "127.0.0.1"))
        return reply.status[:3], reply.headers

    def issued(set_cookie_headers: bytes) -> str:
        value = session_id(set_cookie_headers.partition(b"Set-Cookie: ")[2])  # "mta_session=V; Path=/; ..."
        assert value is not None
        return value

    first = issued(ask(b"POST", b"/ui/login")[1])
    second = issued(ask(b"POST", b"/ui/login", first)[1])
    assert second != first and len(ui.sessions) == 1
    assert ask(b"GET", b"/ui/session", first)[0] == b"401" and ask(b"GET", b"/ui/session", second)[0] == b"200"


def test_an_unreadable_admin_users_file_is_a_503_that_names_no_path_or_line(tmp_path: Path) -> None:
    ui = WebUi({}, Sessions(100), Lockout(3, 60), clock=lambda: 0.0)
    guard = Guard("127.0.0.1:9025", [], "t")
    headers = {b"host": b"127.0.0.1:9025", b"content-type": b"application/json"}
    admins = tmp_path / "secret-place" / "admins"
    admins.parent.mkdir()
    for broken in ("ops:scrypt$not-a-hash\n", None):  # a bad line; a directory where the file should be
        if broken is None:
            admins.unlink()
            admins.mkdir()
        else:
            admins.write_text(broken)
        ui.admin_users_file = str(admins)
        reply, _ = asyncio.run(ui.answer(guard, b"POST", b"/ui/login", headers, b'{"user": "ops", "password": "p"}',
                                         "192.0.2.1"))
        assert isinstance(reply.body, bytes) and reply.status.startswith(b"503")
        assert b"secret-place" not in reply.body and b"scrypt" not in reply.body, reply.body
        assert json.loads(reply.body)["error"].startswith("[control] admin_users_file cannot be read")


def test_only_the_files_read_at_start_are_served(tmp_path: Path) -> None:
    page = tmp_path / "webui"
    (page / "img").mkdir(parents=True)
    (page / "index.html").write_bytes(b"<!doctype html>")
    (page / "app.js").write_bytes(b"1")
    (page / "img" / "logo.svg").write_bytes(b"<svg/>")
    (page / ".hidden").write_bytes(b"no")
    (tmp_path / "secret").write_bytes(b"no")
    ui = WebUi(read_files(page), Sessions(10), Lockout(3, 60))
    (page / "later.js").write_bytes(b"no")
    guard = Guard("127.0.0.1:9025", [], "t")

    def get(path: bytes) -> tuple[bytes, bytes, bytes]:
        reply, _ = asyncio.run(ui.answer(guard, b"GET", path, {b"host": b"127.0.0.1:9025"}, b"", "127.0.0.1"))
        assert isinstance(reply.body, bytes)
        return reply.status[:3], reply.kind, reply.body

    assert get(b"/ui/") == (b"200", b"text/html; charset=utf-8", b"<!doctype html>")
    assert get(b"/ui/app.js") == (b"200", b"text/javascript; charset=utf-8", b"1")
    assert get(b"/ui/img/logo.svg") == (b"200", b"image/svg+xml", b"<svg/>")
    for path in (b"/ui/.hidden", b"/ui/../secret", b"/ui/%2e%2e/secret", b"/ui/later.js", b"/ui/img", b"/ui/img/",
                 b"/ui/webui/app.js", b"/ui//app.js"):
        status, _, body = get(path)
        assert status == b"404" and json.loads(body) == {"error": "no such page"}, path
    assert read_files(tmp_path / "absent") == {}


def test_the_overview_series_counts_per_minute_with_the_partial_minute_last() -> None:
    from workers.control.overview import MINUTES, Series
    series = Series()
    series.record(130.0, {"accepted": 5})  # started mid-minute 120
    assert series.minutes(150.0, {"accepted": 7}) == [{"t": 120, "accepted": 2, "delivered": 0, "deferred": 0,
                                                       "bounced": 0}]
    series.record(170.0, {"accepted": 9})  # the same minute: no second sample
    series.record(181.0, {"accepted": 10})
    series.record(305.0, {"accepted": 12})  # minutes 240 was missed: its mail counts in 180's row
    rows = series.minutes(310.0, {"accepted": 20, "delivered": 3})
    assert [(r["t"], r["accepted"], r["delivered"]) for r in rows] == [(120, 5, 0), (180, 2, 0), (300, 8, 3)]
    assert series.minutes(320.0, {"accepted": 1})[-1]["accepted"] == 0  # counters reset: never negative
    for minute in range(6, 6 + 2 * MINUTES):
        series.record(minute * 60.0, {"accepted": minute})
    rows = series.minutes(minute * 60.0 + 1, {"accepted": minute + 1})
    assert len(rows) == MINUTES and rows[-1] == {"t": minute * 60, "accepted": 1, "delivered": 0, "deferred": 0,
                                                 "bounced": 0}
    assert all(r["accepted"] == 1 for r in rows) and rows[0]["t"] == (minute - MINUTES + 1) * 60
