"""`mta completion bash`: the script the real command prints, loaded into a real bash, asked
what it completes at the cursor as bash's programmable completion would ask it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mta.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "queue")])}
    done = subprocess.run([sys.executable, "-m", "mta", "completion", "bash"], capture_output=True, text=True,
                          env=env, cwd=tmp_path_factory.getbasetemp(), timeout=60)
    assert done.returncode == 0, done.stderr
    path = tmp_path_factory.mktemp("completion") / "mta"
    path.write_text(done.stdout)
    return path


def complete(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What TAB offers at the end of `line` (a trailing space: a new, empty word)."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    program = (f"source {script}\n"
               f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; COMPREPLY=()\n"
               "_mta\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                          cwd=cwd, timeout=30)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return [w for w in done.stdout.splitlines() if w]


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """As argparse itself has them (each helper adds commands: the test follows the parser)."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(found[0].choices) if found else []


def test_commands_then_their_actions(script: Path) -> None:
    parser = build_parser()
    assert complete(script, "mta ") == subcommands(parser)
    assert {"serve", "config", "queue", "users", "completion"} <= set(subcommands(parser))
    assert complete(script, "mta qu") == ["queue"]
    queue = argparse_child(parser, "queue")
    assert complete(script, "mta queue ") == subcommands(queue)
    assert {"list", "show", "shape", "check", "salvage", "retry", "hold", "release", "delete"} <= set(subcommands(queue))
    assert complete(script, "mta queue re") == [name for name in subcommands(queue) if name.startswith("re")]
    assert complete(script, "mta users ") == ["add", "passwd", "delete", "list"]


def argparse_child(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0].choices[name]


def test_options_of_the_command_being_typed(script: Path) -> None:
    assert complete(script, "mta --v") == ["--version"]
    assert complete(script, "mta queue list --st") == ["--state"]
    assert sorted(complete(script, "mta queue retry --")) == ["--all", "--config", "--domain", "--help"]
    assert complete(script, "mta serve --j") == []  # --json is queue list's, not serve's


def test_an_option_value_is_skipped_while_finding_the_command(script: Path) -> None:
    """`-c list`: the file named "list" is -c's value, not the command."""
    assert complete(script, "mta queue list -c list --j") == ["--json"]
    assert complete(script, "mta queue list --domain queue --rec") == ["--recipient"]


def test_values_choices_files_and_directories(script: Path, tmp_path: Path) -> None:
    (tmp_path / "mta.toml").write_text("")
    (tmp_path / "spool-new").mkdir()
    assert complete(script, "mta queue list --state ") == ["ready", "deferred", "held", "active"]
    assert complete(script, "mta queue list --state d") == ["deferred"]
    assert complete(script, "mta serve -c mt", cwd=tmp_path) == ["mta.toml"]
    assert complete(script, "mta queue salvage ", cwd=tmp_path) == ["spool-new"]  # a directory, not the file
    assert complete(script, "mta completion ") == ["bash"]
    assert complete(script, "mta queue retry --domain ") == []  # free text: nothing to offer
