"""A real browser for the web UI tests: Debian's chromium driven by Playwright (sync API).

Playwright's own browser downloads are not used (nothing may leave the machine):
the system chromium at CHROMIUM runs headless, with --no-sandbox since tests run as
root. A Tab records what the page printed to the console and every uncaught error,
so a test can assert the page ran clean (a CSP violation is a console error).

Screenshots go to $MTA_TEST_ARTIFACTS, else to webui-screenshots/ under pytest's
temporary base directory (printed, so a run shows where they are).
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MtaServer

CHROMIUM = "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 10_000
RESOURCE = re.compile(r"error: Failed to load resource: the server responded with a status of \d+ ")  # see Tab.failed
REFUSALS = (400, 401, 403, 409, 429)

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [test] extra)")


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test-deps installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    directory = Path(os.environ.get("MTA_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "webui-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\nweb UI screenshots: {directory}")  # past pytest's output capture: a quiet run says it too
    return directory


def control_url(server: MtaServer, path: str = "/ui/") -> str:
    assert server.config_path is not None
    listen = tomllib.loads(server.config_path.read_text())["control"]["listen"]
    return f"http://{listen}{path}"


@dataclass
class Tab:
    """One browser context (its own cookies) and page, with what the page reported."""

    context: sync_api.BrowserContext
    page: sync_api.Page
    console: list[str] = field(default_factory=list)  # "type: text"
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    failed: list[str] = field(default_factory=list)  # "status url" of answers >= 400

    def problems(self) -> list[str]:
        """Console errors (a CSP violation, a broken module), uncaught exceptions, and answers
        that are no refusal of the API the page shows (401, 403, 409, 429 are; a 404 or a 5xx is not)."""
        console = [line for line in self.console if line.startswith("error:") and not RESOURCE.match(line)]
        return console + self.errors + [f for f in self.failed if int(f.split()[0]) not in REFUSALS]

    def shot(self, directory: Path, name: str) -> Path:
        path = directory / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_tab(browser: sync_api.Browser, viewport: dict[str, int] = DESKTOP, **options: Any) -> Tab:
    """A new context (`options`: Browser.new_context's, e.g. ignore_https_errors) and its page."""
    context = browser.new_context(viewport=viewport, **options)  # type: ignore[arg-type]
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(context, page)
    page.on("console", lambda msg: tab.console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    page.on("response", lambda r: tab.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return tab


def log_in(tab: Tab, server: MtaServer, token: str) -> None:
    """Open /ui/, log in with the token and wait for the overview."""
    page = tab.page
    page.goto(control_url(server))
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_role("button", name="Log in with the token").click()
    sync_api.expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
