"""Every golden transcript in transcripts/ runs through the sans-I/O server."""

from pathlib import Path

import pytest

from tests.mta.smtp.transcript import run_transcript

TRANSCRIPTS = sorted((Path(__file__).parent / "transcripts").glob("*.txt"))


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path: Path) -> None:
    run_transcript(path)


def test_there_are_transcripts() -> None:
    assert len(TRANSCRIPTS) >= 10
