"""The web UI in a real browser: users and mailboxes, a forged request from another
origin, and the lockout after wrong tokens.

Real `mta serve`, smtplib for SMTP AUTH and RCPT, a tiny http.server on another
loopback port as the hostile site, Debian's chromium driven by Playwright
(tests/integration/browser.py). Screenshots of the Users and Mailboxes pages.
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import smtplib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from mta.users import User, hash_password, save_users
from tests.integration.browser import (  # noqa: F401
    artifacts,
    browser,
    control_url,
    log_in,
    open_tab,
    sync_api,
)
from tests.integration.conftest import MtaServer, free_port, wait_until
from tests.integration.test_security import users_file

pytestmark = pytest.mark.integration
expect = sync_api.expect

TOKEN = "webui-token-0123456789abcdef"


def admin_server(mta_server, tmp_path: Path, **sections) -> MtaServer:  # type: ignore[no-untyped-def]
    """AUTH on the plain loopback listener (auth_plaintext: a test rig), a users file with
    alice, a mailboxes file with alice@a.test."""
    (tmp_path / "mail").mkdir(exist_ok=True)
    (tmp_path / "mailboxes").write_text("alice@a.test\n")
    server = mta_server(start=False, server={"inbound_workers": 1},
                        relay={"local_domains": ["a.test"], "mynetworks": []},
                        local={"maildir_root": str(tmp_path / "mail"), "mailboxes": str(tmp_path / "mailboxes")},
                        auth={"users_file": str(users_file(tmp_path, alice="correct horse"))},
                        **{"control": {"token": TOKEN}, **sections})
    assert server.config_path is not None
    text = server.config_path.read_text()
    listener = f'address = "127.0.0.1:{server.port}"\n'
    server.config_path.write_text(text.replace(listener, listener + "auth = true\nauth_plaintext = true\n", 1))
    return server.start()


def smtp_login(server: MtaServer, user: str, password: str) -> int:
    """The reply code to AUTH PLAIN user/password on the server's listener."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        try:
            code, _ = smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            code = exc.smtp_code
        return code


def rcpt_code(server: MtaServer, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("s@client.test")
        return smtp.rcpt(address)[0]


def test_a_user_added_on_the_page_logs_in_over_smtp_auth(mta_server, tmp_path, browser, artifacts) -> None:  # noqa: F811
    server = admin_server(mta_server, tmp_path)
    assert smtp_login(server, "bob", "battery staple") == 535
    tab = open_tab(browser)
    page = tab.page
    log_in(tab, server, TOKEN)
    page.get_by_role("link", name="Users", exact=True).click()
    expect(page.get_by_role("cell", name="alice", exact=True)).to_be_visible()

    add = page.get_by_role("form", name="Add a user")
    add.get_by_label("Name", exact=True).fill("bob")
    add.get_by_label("Password", exact=True).fill("battery staple")
    add.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("status")).to_have_text("Added user bob.")
    expect(page.get_by_role("cell", name="bob", exact=True)).to_be_visible()
    tab.shot(artifacts, "users")
    assert smtp_login(server, "bob", "battery staple") == 235

    # A refusal of the API is shown with its message: bob exists already.
    add.get_by_label("Name", exact=True).fill("bob")
    add.get_by_label("Password", exact=True).fill("another one")
    add.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("alert")).to_contain_text("bob")

    page.get_by_role("button", name="Change password of bob").click()
    page.get_by_label("New password", exact=True).fill("new staple")
    page.get_by_role("button", name="Change password", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Changed the password of bob.")
    assert smtp_login(server, "bob", "battery staple") == 535
    assert smtp_login(server, "bob", "new staple") == 235

    page.get_by_role("button", name="Delete user bob").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Deleted user bob.")
    expect(page.get_by_role("cell", name="bob", exact=True)).to_have_count(0)
    assert smtp_login(server, "bob", "new staple") == 535
    assert tab.problems() == [], tab.console
    tab.context.close()


def test_an_admin_user_adds_a_mailbox_that_then_receives_mail(mta_server, tmp_path, browser, artifacts) -> None:  # noqa: F811
    admins = tmp_path / "admins"
    save_users(str(admins), {"ops": User("ops", hash_password("admin password"), ())})
    server = admin_server(mta_server, tmp_path, control={"token": TOKEN, "admin_users_file": str(admins)})
    assert rcpt_code(server, "carol@a.test") == 550
    tab = open_tab(browser)
    page = tab.page
    page.goto(control_url(server))
    page.get_by_label("User", exact=True).fill("ops")
    page.get_by_label("Password", exact=True).fill("admin password")
    page.get_by_role("button", name="Log in as this user").click()
    expect(page.get_by_text("Logged in as ops")).to_be_visible()
    page.get_by_role("link", name="Mailboxes", exact=True).click()
    expect(page.get_by_role("cell", name="alice@a.test", exact=True)).to_be_visible()

    page.get_by_label("Address", exact=True).fill("carol@a.test")
    page.get_by_label("Size quota (e.g. 500M; empty: none)").fill("10M")
    page.get_by_role("button", name="Add mailbox").click()
    expect(page.get_by_role("status")).to_have_text("Added mailbox carol@a.test.")
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="carol@a.test", exact=True))
    expect(row).to_contain_text("0 B of 10 MiB")
    assert rcpt_code(server, "carol@a.test") == 250
    assert "carol@a.test quota_bytes=10485760" in (tmp_path / "mailboxes").read_text()

    page.get_by_role("button", name="Change quota of carol@a.test").click()
    page.get_by_label("New message quota (0: none)").fill("100")
    page.get_by_role("button", name="Change quota", exact=True).click()
    expect(row).to_contain_text("0 of 100")
    tab.shot(artifacts, "mailboxes")

    page.get_by_role("button", name="Delete mailbox carol@a.test").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Deleted mailbox carol@a.test.")
    assert rcpt_code(server, "carol@a.test") == 550
    assert tab.problems() == [], tab.console
    tab.context.close()


HOSTILE_PAGE = """<!doctype html><html><head><title>prize</title></head><body>
<form id="form" method="POST" action="{api}" enctype="text/plain">
<input type="hidden" name='{{"ids": ["{msgid}"], "x": "' value='"}}'>
</form>
<script>
const api = "{api}", body = JSON.stringify({{ids: ["{msgid}"]}});
window.results = [];
async function attack() {{
  try {{  // a simple request: no preflight, the cookie goes along, the answer is opaque
    await fetch(api, {{method: "POST", mode: "no-cors", credentials: "include",
                      headers: {{"Content-Type": "text/plain"}}, body}});
    window.results.push("no-cors sent");
  }} catch (e) {{ window.results.push("no-cors failed"); }}
  try {{  // JSON needs a CORS preflight the API never grants
    await fetch(api, {{method: "POST", credentials: "include",
                      headers: {{"Content-Type": "application/json"}}, body}});
    window.results.push("cors answered");
  }} catch (e) {{ window.results.push("cors blocked"); }}
  document.title = "attacked";
}}
attack();
</script></body></html>
"""


class HostileSite:
    """A page on another loopback port that tries to delete a message through the admin API."""

    def __init__(self, page: str) -> None:
        content = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the test's output is the assertions

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def queued_server(mta_server, tmp_path) -> Iterator[tuple[MtaServer, str]]:  # type: ignore[no-untyped-def]
    server = mta_server(control={"token": TOKEN})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("s@client.test", ["victim@local.test"], b"Subject: keep me\r\n\r\nkeep me\r\n")
    [entry] = wait_until(server.queue_list, 10, "the message to be queued", server)
    yield server, entry["id"]


def test_a_forged_delete_from_another_origin_is_refused_while_logged_in(queued_server, browser) -> None:  # noqa: F811
    server, msgid = queued_server
    tab = open_tab(browser)
    page = tab.page
    log_in(tab, server, TOKEN)  # the session cookie is in this browser now
    api = control_url(server, "/api/queue/delete")
    with HostileSite(HOSTILE_PAGE.format(api=api, msgid=msgid)) as site:
        page.goto(site.url)
        expect(page).to_have_title("attacked")
        assert page.evaluate("window.results") == ["no-cors sent", "cors blocked"]
        assert [m["id"] for m in server.queue_list()] == [msgid]
        # The form post navigates to the API's answer: refused, and still nothing deleted.
        page.locator("#form").evaluate("form => form.submit()")
        page.wait_for_url(api)
        assert '"error"' in page.content()
        assert '"count"' not in page.content()
    assert [m["id"] for m in server.queue_list()] == [msgid]

    # The page itself, with its CSRF token, may delete.
    page.goto(control_url(server, "/ui/#/queue"))
    page.get_by_role("checkbox", name=f"Select {msgid}").check()
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Deleted: 1 message.")
    assert server.queue_list() == []
    tab.context.close()


def test_wrong_tokens_lock_the_login_out_until_the_lockout_ends(mta_server, tmp_path, browser) -> None:  # noqa: F811
    lockout = 4.0
    server = mta_server(control={"token": TOKEN}, auth={"max_failures": 3, "lockout_seconds": lockout})
    tab = open_tab(browser)
    page = tab.page
    page.goto(control_url(server))
    token = page.get_by_label("Token", exact=True)
    login = page.get_by_role("button", name="Log in with the token")
    alert = page.get_by_role("alert")
    first = time.monotonic()
    for attempt in range(3):  # [auth] max_failures
        token.fill(f"wrong-{attempt}")
        login.click()
        expect(alert).to_contain_text("wrong token or password")
    # Locked out: the right token is refused too, and the page says for how long.
    token.fill(TOKEN)
    login.click()
    expect(alert).to_contain_text(re.compile(r"too many failed logins from this address; try again in \d+ s"))
    expect(page.get_by_role("navigation", name="Pages")).to_be_hidden()
    # After the lockout, the right token works.
    time.sleep(max(0.0, first + lockout + 0.5 - time.monotonic()))
    token.fill(TOKEN)
    login.click()
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    tab.context.close()


def tab_to(page: sync_api.Page, name: str, key: str = "Tab", limit: int = 40) -> None:
    """Press `key` until the focused control's accessible text is `name`."""
    for _ in range(limit):
        page.keyboard.press(key)
        if page.evaluate("(document.activeElement.getAttribute('aria-label') || document.activeElement.textContent"
                         " || '').trim()") == name:
            return
    raise AssertionError(f"{key} never reached {name!r}")


def test_the_page_works_from_the_keyboard(queued_server, browser, artifacts) -> None:  # noqa: F811
    server, msgid = queued_server
    tab = open_tab(browser)
    page = tab.page
    page.goto(control_url(server))
    expect(page.get_by_label("Token", exact=True)).to_be_visible()
    tab.shot(artifacts, "login")

    # The first Tab reaches the skip link, shown while focused; Enter moves to the content.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    box = skip.bounding_box()
    assert box is not None and box["y"] >= 0
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"  # focus is visible
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Token", exact=True)).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()

    # The nav, then a row's checkbox, then back up to Hold.
    page.keyboard.press("Tab")
    tab_to(page, "Queue")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Queue", level=1)).to_be_visible()
    tab_to(page, f"Select {msgid}")
    page.keyboard.press("Space")
    expect(page.get_by_role("checkbox", name=f"Select {msgid}")).to_be_checked()
    tab_to(page, "Hold", key="Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_have_text("Held: 1 message.")
    assert [r["state"] for m in server.queue_list() for r in m["recipients"]] == ["held"]

    # Delete: the dialog takes the focus (on Cancel); Escape cancels, Tab then Enter deletes.
    tab_to(page, f"Select {msgid}")
    page.keyboard.press("Space")
    tab_to(page, "Delete", key="Shift+Tab")
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert len(server.queue_list()) == 1
    page.keyboard.press("Enter")  # the focus is back on Delete
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_have_text("Deleted: 1 message.")
    assert server.queue_list() == []
    assert tab.problems() == [], tab.console
    tab.context.close()


def test_a_session_ended_by_the_server_brings_the_login_back(queued_server, browser) -> None:  # noqa: F811
    server, msgid = queued_server
    tab = open_tab(browser)
    page = tab.page
    log_in(tab, server, TOKEN)
    # A new [control] token on SIGHUP ends the sessions that logged in with the old one.
    fresh = "the-next-token-0123456789"
    assert server.config_path is not None
    server.config_path.write_text(server.config_path.read_text().replace(TOKEN, fresh))
    os.kill(server.master_pid, signal.SIGHUP)
    request = urllib.request.Request(control_url(server, "/api/queue/summary"), headers={"Authorization": f"Bearer {fresh}"})
    wait_until(lambda: _answers(request), 10, "the new token", server)

    page.get_by_role("link", name="Queue", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("log in again")
    expect(page.get_by_label("Token", exact=True)).to_be_focused()
    expect(page.get_by_role("navigation", name="Pages")).to_be_hidden()
    page.get_by_label("Token", exact=True).fill(fresh)
    page.get_by_role("button", name="Log in with the token").click()
    expect(page.get_by_role("link", name=msgid)).to_be_visible()  # back where it was going
    tab.context.close()


def _answers(request: urllib.request.Request) -> bool:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def test_an_address_with_a_bad_escape_still_shows_its_page(queued_server, browser) -> None:  # noqa: F811
    server, msgid = queued_server
    tab = open_tab(browser)
    page = tab.page
    log_in(tab, server, TOKEN)
    page.evaluate("location.hash = '#/queue/50%off.test'")  # typed by hand: "%of" is no escape
    expect(page.get_by_role("heading", name="Queue", level=1)).to_be_visible()
    expect(page.get_by_label("Destination domain")).to_have_value("50%off.test")
    assert tab.problems() == []
    page.evaluate("location.hash = '#/message/%E0%A4%A'")  # no such message: the page says so
    expect(page.get_by_text("Message %E0%A4%A is not in the queue")).to_be_visible()
    assert tab.errors == []
    tab.context.close()


def test_a_link_from_another_site_opens_the_page(queued_server, browser) -> None:  # noqa: F811
    server, msgid = queued_server
    tab = open_tab(browser)
    page = tab.page
    link = '<!doctype html><html><body><a id="go" href="{ui}">mail relay admin</a></body></html>'
    with HostileSite(link.format(ui=control_url(server, "/ui/#/queue"))) as wiki:  # a team wiki, a dashboard
        page.goto(wiki.url)
        page.get_by_role("link", name="mail relay admin").click()
        page.get_by_label("Token", exact=True).fill(TOKEN)
        page.get_by_role("button", name="Log in with the token").click()
        expect(page.get_by_role("link", name=msgid)).to_be_visible()
        page.goto(wiki.url)  # logged in: the link goes straight to the page
        page.get_by_role("link", name="mail relay admin").click()
        expect(page.get_by_role("link", name=msgid)).to_be_visible()
        # A site that opens the page in a window keeps no handle on it (Cross-Origin-Opener-Policy).
        page.goto(wiki.url)
        with tab.context.expect_page() as popup:
            page.evaluate("url => { window.opened = window.open(url); }", control_url(server, "/ui/#/queue"))
        expect(popup.value.get_by_role("link", name=msgid)).to_be_visible()
        assert page.evaluate("window.opened.closed") is True
        popup.value.close()
    assert tab.problems() == []
    tab.context.close()
