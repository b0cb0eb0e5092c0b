"""One private clamd for the session (tests/mta/content/clamdpeer.py): StreamMaxLength 1 MiB."""

from collections.abc import Iterator

import pytest

from tests.mta.content.clamdpeer import Clamd, running_clamd

STREAM_MAX_LENGTH_BYTES = 1 << 20


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    with running_clamd(tmp_path_factory.mktemp("clamd"), STREAM_MAX_LENGTH_BYTES) as running:
        yield running
