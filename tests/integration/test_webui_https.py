"""The web UI in a real browser over TLS ([control] tls_cert_file / tls_key_file): the
session cookie is Secure, and the page's state-changing requests (which carry an
https:// Origin) are accepted.

The browser does not know the test CA, so its context ignores certificate errors: what
is tested here is the page and the cookie over HTTPS, not certificate verification
(tests/integration/test_webui_tls.py and test_security.py cover that).
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.integration.browser import browser, control_url, open_tab, sync_api  # noqa: F401
from tests.integration.conftest import wait_until
from tests.integration.tlscerts import make_pki

pytestmark = pytest.mark.integration
expect = sync_api.expect

TOKEN = "webui-token-0123456789abcdef"


def test_over_tls_the_cookie_is_secure_and_the_page_holds_a_message(mta_server, tmp_path: Path, browser) -> None:  # noqa: F811
    pki = make_pki(tmp_path / "pki")
    server = mta_server(control={"token": TOKEN, "tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key)})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("s@client.test", ["r@local.test"], b"Subject: over tls\r\n\r\nbody\r\n")
    [entry] = wait_until(server.queue_list, 10, "the message to be queued", server)
    msgid = entry["id"]

    tab = open_tab(browser, ignore_https_errors=True)
    context, page = tab.context, tab.page
    url = control_url(server).replace("http://", "https://")
    page.goto(url)
    page.get_by_label("Token", exact=True).fill(TOKEN)
    page.get_by_role("button", name="Log in with the token").click()
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    [cookie] = [c for c in context.cookies() if c["name"] == "mta_session"]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie

    page.goto(f"{url}#/message/{msgid}")
    page.get_by_role("button", name="Hold", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Held: 1 message.")
    assert [r["state"] for m in server.queue_list() for r in m["recipients"]] == ["held"]
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("Token", exact=True)).to_be_visible()
    assert [c for c in context.cookies() if c["name"] == "mta_session" and c["value"]] == []
    assert tab.problems() == [], tab.console
    context.close()
