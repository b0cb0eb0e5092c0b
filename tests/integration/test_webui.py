"""The web UI in a real browser: log in, find a queued message, read it safely, hold it,
release it and see it delivered; deletes ask first. Screenshots of the pages.

Real `mta serve` (its control process serves /ui/ and the API), a real SMTP sink that
refuses at first (so the message stays queued, deferred), mail sent with smtplib, and
Debian's chromium driven by Playwright (tests/integration/browser.py). Controls are
found by role and label, as a person finds them. What the page claims is checked
against `mta queue list` and the sink.
"""

from __future__ import annotations

import json
import re
import smtplib
import urllib.request

import pytest

from tests.integration.browser import (  # noqa: F401
    PHONE,
    artifacts,
    browser,
    control_url,
    log_in,
    open_tab,
    sync_api,
)
from tests.integration.conftest import MtaServer, wait_until
from tests.integration.sink import SmtpSink, reply_for

pytestmark = pytest.mark.integration
expect = sync_api.expect

TOKEN = "webui-token-0123456789abcdef"
PAGE = 50  # messages on a page of the queue (mta/webui/queue.js)
SCRIPT = "<script>window.__xss=1</script>"
IMAGE = '<img src=x onerror="window.__xss=2">'
HOSTILE = (f"From: <script>@client.test\r\nTo: rcpt@dest.test\r\nSubject: {SCRIPT}\r\n\r\n"
           f"Hello,\r\n{SCRIPT}\r\n{IMAGE}\r\n&lt;b&gt; stays as typed\r\n").encode()


class Gate:
    """The sink's RCPT rule: 451 while closed (the message stays queued, deferred), then open."""

    def __init__(self) -> None:
        self.closed = True

    def __call__(self, address: str) -> tuple[int, str, str] | None:
        return reply_for(451, "try again later") if self.closed else None


def delivering_server(mta_server, sink: SmtpSink) -> MtaServer:  # type: ignore[no-untyped-def]
    # A long backoff: once deferred, the message waits for the operator (release is due now).
    return mta_server(server={"inbound_workers": 1},
                      relay={"relay_domains": ["dest.test"], "mynetworks": ["127.0.0.1/32"]},
                      delivery={"workers": 1, "min_backoff_seconds": 300, "max_backoff_seconds": 600},
                      routes={"dest.test": f"{sink.address}:{sink.port}"},
                      control={"token": TOKEN})


def send(server: MtaServer, recipient: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("sender@client.test", [recipient], data)


def states(server: MtaServer) -> dict[str, list[str]]:
    """Queued message id -> its recipients' states, as `mta queue list` says."""
    return {m["id"]: [r["state"] for r in m["recipients"]] for m in server.queue_list()}


def deferred_message(server: MtaServer, recipient: str, data: bytes) -> str:
    before = set(states(server))
    send(server, recipient, data)
    return wait_until(lambda: next((i for i, s in states(server).items() if i not in before and s == ["deferred"]), None),
                      20, f"the message to {recipient} to be deferred", server)


def destinations(server: MtaServer) -> list[str]:
    """The domains /api/overview lists (asked with the token, as a script would)."""
    request = urllib.request.Request(control_url(server, "/api/overview"), headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [d["domain"] for d in json.load(response)["destinations"]]


def overview_ready(server: MtaServer) -> None:
    """The scheduler reports its destinations now and then: wait until the overview has dest.test."""
    wait_until(lambda: "dest.test" in destinations(server), 15, "dest.test in /api/overview", server)


def test_a_queued_message_is_shown_as_text_held_released_and_delivered(mta_server, browser, artifacts) -> None:  # noqa: F811
    gate = Gate()
    with SmtpSink(rcpt_rule=gate) as sink:
        server = delivering_server(mta_server, sink)
        msgid = deferred_message(server, "rcpt@dest.test", HOSTILE)
        overview_ready(server)
        tab = open_tab(browser)
        page = tab.page
        log_in(tab, server, TOKEN)

        # The overview: the chart and the destination the message waits for.
        expect(page.get_by_role("img", name="Messages per minute")).to_be_visible()
        expect(page.get_by_role("link", name="dest.test")).to_be_visible()
        expect(page.get_by_text("Health: good")).to_be_visible()
        tab.shot(artifacts, "overview")

        # The queue lists it; open it.
        page.get_by_role("link", name="Queue", exact=True).click()
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=msgid))
        expect(row).to_contain_text("deferred")
        expect(row).to_contain_text("rcpt@dest.test")
        tab.shot(artifacts, "queue")
        page.get_by_role("link", name=msgid).click()

        # Its body and headers are text: the markup is shown literally and nothing ran.
        body = page.get_by_role("region", name="Body", exact=True)
        expect(body).to_contain_text(SCRIPT)
        expect(body).to_contain_text(IMAGE)
        expect(body).to_contain_text("&lt;b&gt; stays as typed")
        expect(page.get_by_role("region", name="Headers", exact=True)).to_contain_text(f"Subject: {SCRIPT}")
        recipient = page.get_by_role("row").filter(has_text="rcpt@dest.test")
        expect(recipient).to_contain_text("deferred")
        expect(recipient).to_contain_text("try again later")  # the sink's last reply
        assert page.locator("main script, main img").count() == 0
        expect(page.get_by_role("main")).to_contain_text("[127.0.0.1]:")  # the client, as text
        expect(page.get_by_role("main")).not_to_contain_text("[object Object]")
        assert page.evaluate("window.__xss") is None
        tab.shot(artifacts, "message")

        # Hold it from the queue table, by selecting its row.
        page.get_by_role("link", name="Back to the queue").click()
        page.get_by_role("checkbox", name=f"Select {msgid}").check()
        page.get_by_role("button", name="Hold", exact=True).click()
        expect(page.get_by_role("status")).to_have_text("Held: 1 message.")
        expect(row).to_contain_text("held")
        assert states(server) == {msgid: ["held"]}

        # The sink accepts from now on; release it from the message view: it is delivered.
        gate.closed = False
        page.get_by_role("link", name=msgid).click()
        page.get_by_role("button", name="Release", exact=True).click()
        expect(page.get_by_role("status")).to_have_text("Released: 1 message.")
        [delivered] = sink.wait_for_messages(1, timeout=20)
        assert delivered.recipients == ["rcpt@dest.test"] and SCRIPT.encode() in delivered.data
        wait_until(lambda: states(server) == {}, 10, "the delivered message to leave the queue", server)
        page.reload()  # the view says the message left the queue
        expect(page.get_by_text(f"Message {msgid} is not in the queue (any more)")).to_be_visible()
        page.get_by_role("link", name="Queue", exact=True).click()
        expect(page.get_by_text("No message matches.")).to_be_visible()

        assert page.evaluate("window.__xss") is None
        # Asked for after it left: the 404s of the message itself are expected.
        assert [p for p in tab.problems() if not p.startswith(f"404 {control_url(server)[:-4]}/api/queue/{msgid}")] == [], \
            tab.console
        tab.context.close()


def test_deletes_ask_first_and_act_on_every_message_of_a_domain(mta_server, browser, artifacts) -> None:  # noqa: F811
    with SmtpSink(rcpt_rule=Gate()) as sink:
        server = delivering_server(mta_server, sink)
        first = deferred_message(server, "one@dest.test", b"Subject: one\r\n\r\none\r\n")
        second = deferred_message(server, "two@dest.test", b"Subject: two\r\n\r\ntwo\r\n")
        tab = open_tab(browser)
        page = tab.page
        log_in(tab, server, TOKEN)
        page.get_by_role("link", name="Queue", exact=True).click()
        page.get_by_label("Destination domain").fill("dest.test")
        page.get_by_role("button", name="Apply filters").click()
        expect(page.get_by_role("link", name=second)).to_be_visible()

        # Cancel keeps the messages.
        page.get_by_role("button", name="Delete all of dest.test").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Delete every message to dest.test?")
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        assert set(states(server)) == {first, second}

        # Delete removes both.
        page.get_by_role("button", name="Delete all of dest.test").click()
        tab.shot(artifacts, "queue-delete-confirmation")
        dialog.get_by_role("button", name="Delete", exact=True).click()
        expect(page.get_by_role("status")).to_have_text("Deleted: 2 messages.")
        assert states(server) == {}
        expect(page.get_by_text("No message matches.")).to_be_visible()
        assert tab.problems() == [], tab.console
        tab.context.close()


def test_the_overview_fits_a_phone(mta_server, browser, artifacts) -> None:  # noqa: F811
    with SmtpSink(rcpt_rule=Gate()) as sink:
        server = delivering_server(mta_server, sink)
        deferred_message(server, "rcpt@dest.test", b"Subject: phone\r\n\r\nphone\r\n")
        overview_ready(server)
        tab = open_tab(browser, PHONE)
        page = tab.page
        log_in(tab, server, TOKEN)
        expect(page.get_by_role("link", name="dest.test")).to_be_visible()
        # Nothing wider than the screen: no sideways scrolling of the page itself.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        tab.shot(artifacts, "overview-phone")
        page.get_by_role("link", name="Queue", exact=True).click()
        expect(page.get_by_role("button", name="Hold", exact=True)).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        tab.shot(artifacts, "queue-phone")
        assert tab.problems() == [], tab.console
        tab.context.close()


def test_the_queue_pages_and_filters(mta_server, browser) -> None:  # noqa: F811
    server = mta_server(control={"token": TOKEN})  # no delivery: the messages stay ready
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        for n in range(PAGE + 10):
            smtp.sendmail(f"s{n}@client.test", [f"rcpt{n}@local.test"], f"Subject: {n}\r\n\r\n{n}\r\n".encode())
    ids = [m["id"] for m in wait_until(lambda: len(server.queue_list()) == PAGE + 10 and server.queue_list(), 10,
                                       "every message to be queued", server)]
    tab = open_tab(browser)
    page = tab.page
    log_in(tab, server, TOKEN)
    page.get_by_role("link", name="Queue", exact=True).click()
    links = page.get_by_role("link", name=re.compile(r"^[0-9A-F]{21}$"))
    expect(links).to_have_count(PAGE)
    assert links.all_inner_texts() == ids[:PAGE]  # oldest first
    expect(page.get_by_role("button", name="First page")).to_have_count(0)
    page.get_by_role("button", name="Next page").click()
    expect(links).to_have_count(10)
    assert links.all_inner_texts() == ids[PAGE:]
    expect(page.get_by_role("button", name="Next page")).to_have_count(0)
    page.get_by_role("button", name="First page").click()
    expect(links).to_have_count(PAGE)

    page.get_by_label("Recipient contains").fill("rcpt17@")
    page.get_by_role("button", name="Apply filters").click()
    expect(links).to_have_count(1)
    expect(links).to_have_text(ids[17])
    page.get_by_label("Recipient contains").fill("")
    page.get_by_label("State").select_option("held")
    page.get_by_role("button", name="Apply filters").click()
    expect(page.get_by_text("No message matches.")).to_be_visible()
    page.get_by_label("State").select_option("ready")
    page.get_by_label("Sender contains").fill("s5")
    page.get_by_role("button", name="Apply filters").click()
    expect(links).to_have_count(11)  # s5 and s50..s59
    assert tab.problems() == [], tab.console
    tab.context.close()
