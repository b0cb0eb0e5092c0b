"""Every golden transcript in client_transcripts/ runs through the sans-I/O client core."""

from pathlib import Path

import pytest

from tests.mta.smtp.client_transcript import run_client_transcript

TRANSCRIPTS = sorted((Path(__file__).parent / "client_transcripts").glob("*.txt"))


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_client_transcript(path: Path) -> None:
    run_client_transcript(path)


def test_there_are_client_transcripts() -> None:
    assert len(TRANSCRIPTS) >= 10
