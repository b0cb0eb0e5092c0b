"""Installing mta as an operator would (issue 18): the wheel `pip install .` and
`pipx install .` build, installed into a fresh virtual environment, gives the console
scripts, `mta --version`, working commands, and the man pages and bash completion under
the environment's share/.

Offline: the wheel is built with the setuptools and wheel of the test environment (the
`test` extra has them), and the fresh venv reaches mta's dependencies through a .pth
line naming the test environment's site-packages, a plain path: the .pth files there are
not run, so an editable mta of that environment stays invisible. Make's venv is proven
by CI itself (.ci/run: `make run` and `make test` with /usr/bin/python3).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.integration.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
SHARED = ["share/man/man8/mta.8", "share/man/man5/mta.toml.5", "share/bash-completion/completions/mta"]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "results")


def run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env if env is not None else clean_env())
    assert done.returncode == 0, f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def clean_env() -> dict[str, str]:
    """An operator's shell: no PYTHONPATH, no MTA_CONFIG, no venv of ours on PATH."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MTA_CONFIG", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed in it."""
    for module in ("setuptools", "wheel"):
        assert subprocess.run([sys.executable, "-c", f"import {module}"]).returncode == 0, (
            f"{sys.executable} has no {module}: `pip install -e '.[test]'` (make test does)")
    tmp = tmp_path_factory.mktemp("install")
    source, wheels, fresh = tmp / "src", tmp / "wheels", tmp / "venv"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", wheels, source, cwd=tmp)
    (wheel,) = wheels.glob("mta-*.whl")
    run(sys.executable, "-m", "venv", fresh, cwd=tmp)
    purelib = run(fresh / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                  cwd=tmp).stdout.strip()
    ours = sysconfig.get_paths()
    Path(purelib, "mta_test_dependencies.pth").write_text(f"{ours['purelib']}\n{ours['platlib']}\n")
    run(fresh / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp)
    return fresh


def test_the_console_scripts_and_the_version_from_the_package_metadata(venv: Path, tmp_path: Path) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert "mta" in scripts
    for name in scripts:
        assert os.access(venv / "bin" / name, os.X_OK), f"{name} is not in the venv's bin/"
    done = run(venv / "bin/mta", "--version", cwd=tmp_path)
    assert done.stdout == f"mta {PYPROJECT['project']['version']}\n"
    imported = run(venv / "bin/python", "-c", "import mta, mtaqueue, workers; print(mta.__file__, "
                   "mtaqueue.__file__, workers.__file__)", cwd=tmp_path)
    for path in imported.stdout.split():  # the wheel's own code, not this checkout's
        assert Path(path).is_relative_to(venv), path


def test_the_installed_command_finds_its_config_and_knows_a_missing_spool(venv: Path, tmp_path: Path) -> None:
    done = run(venv / "bin/mta", "config", "check", cwd=tmp_path)
    assert done.stdout.startswith("configuration OK: embedded defaults")
    listing = subprocess.run([venv / "bin/mta", "queue", "list"], cwd=tmp_path, capture_output=True, text=True,
                             env=clean_env(), timeout=60)
    assert listing.returncode == 1
    assert f"no spool at {tmp_path / 'var' / 'spool'} (config: embedded defaults)" in listing.stderr


def test_man_pages_and_completion_are_installed_under_share(venv: Path, tmp_path: Path) -> None:
    for relative in SHARED:
        installed = venv / relative
        assert installed.is_file(), f"the wheel did not install {relative}"
        assert installed.read_text() == (REPO_ROOT / relative).read_text()
    done = run(venv / "bin/mta", "completion", "bash", cwd=tmp_path)
    assert done.stdout == (venv / "share/bash-completion/completions/mta").read_text()
    page = run("man", "-l", "-P", "cat", venv / "share/man/man8/mta.8", cwd=tmp_path,
               env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert "mta queue list" in page.stdout
