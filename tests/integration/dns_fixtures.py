"""The `dns_server` fixture: a fresh DnsServer per test, closed at teardown even on failure.

Use it from any test folder:
    from tests.integration.dns_fixtures import dns_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.dns_server import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    try:
        yield server
    finally:
        server.close()
