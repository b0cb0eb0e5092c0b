"""mta(8), mta.toml(5) and the bash completion under share/: current with their sources
(the argument parser, README.md's Configuration block), and pages groff renders cleanly
that name every command, option and configuration key."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
from pathlib import Path

import pytest

from mta import manpage
from mta.cli import build_parser
from tests.mta.configtables import section_types

ROOT = Path(__file__).resolve().parents[2]
MTA_8 = ROOT / "share/man/man8/mta.8"
MTA_TOML_5 = ROOT / "share/man/man5/mta.toml.5"


def test_the_committed_files_are_current() -> None:
    stale = [relative for relative, render in manpage.generated(str(ROOT)).items()
             if not (ROOT / relative).is_file() or (ROOT / relative).read_text() != render()]
    assert not stale, f"{stale} differ from what their sources make: run `make man` and commit them"


def test_the_completion_command_prints_the_installed_script() -> None:
    committed = (ROOT / "share/bash-completion/completions/mta").read_text()
    assert manpage.generated(str(ROOT))["share/bash-completion/completions/mta"]() == committed
    assert committed.endswith("complete -F _mta mta\n")


def render(page: Path) -> str:
    """The page as man shows it, as plain text; groff's warnings fail the test."""
    done = subprocess.run(["groff", "-man", "-Tascii", "-ww", "-rLL=200n", "-P-cbou", str(page)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def every_command(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                               argparse.ArgumentParser]]:
    """(path, parser) of every command that runs something, read from argparse directly."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [found for name, child in subs[0].choices.items() for found in every_command(child, (*path, name))]


def test_mta_8_shows_every_command_and_option() -> None:
    text = render(MTA_8)
    lines = [line.strip() for line in text.splitlines()]
    for path, parser in every_command(build_parser()):
        name = " ".join(("mta", *path))
        assert any(line.startswith(name + " ") or line == name for line in lines), f"no synopsis of {name}"
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, f"{name} {flag} is not in mta(8)"
    assert "/etc/mta/mta.toml" in text and "MTA_CONFIG" in text


def test_mta_toml_5_shows_every_key_of_every_table() -> None:
    text = render(MTA_TOML_5)
    for table, fields_of in section_types().items():
        assert f"[{table}]" in text or f'[{table}."' in text, f"no [{table}] in mta.toml(5)"
        for key in dataclasses.fields(fields_of) if fields_of is not None else ():
            assert f"{key.name} = " in text, f"[{table}] {key.name} is not in mta.toml(5)"


@pytest.mark.parametrize("page", [MTA_8, MTA_TOML_5], ids=lambda p: p.name)
def test_man_reads_the_page(page: Path) -> None:
    done = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True, timeout=60,
                          env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert done.returncode == 0, done.stderr
    assert "SEE ALSO" in done.stdout
