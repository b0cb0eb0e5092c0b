"""Config discovery (issue 18): -c, then $MTA_CONFIG, then /etc/mta/mta.toml when it
exists, then the embedded defaults, for every command; and a queue command whose spool
does not exist says so, naming the spool and the config, instead of an empty listing.

The real CLI in a subprocess. The "/etc" file is a file of the test's own, found through
MTA_TEST_SYSTEM_CONFIG (tests/conftest.py points it nowhere for every other test).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mta import config as configmod
from mta.config import SYSTEM_PATH_ENV
from tests.integration.conftest import REPO_ROOT, MtaServer, free_port, server_config, toml_dumps, wait_until

pytestmark = pytest.mark.integration

QUEUE_COMMANDS = [["queue", "list"], ["queue", "list", "--json"], ["queue", "show", "0" * 21],
                  ["queue", "shape"], ["queue", "check"], ["queue", "salvage", "OUT"],
                  ["queue", "retry", "--all"], ["queue", "hold", "--domain", "example.net"],
                  ["queue", "release", "0" * 21], ["queue", "delete", "--all"]]


def mta(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m mta ARGS` in `cwd` with no MTA_CONFIG unless `env` sets it."""
    run_env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    run_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "queue")])
    run_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "mta", *args], cwd=cwd, env=run_env, capture_output=True,
                          text=True, timeout=60)


def hostname_config(path: Path, hostname: str, spool: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    queue = f'\n[queue]\npath = "{spool}"\n' if spool is not None else ""
    path.write_text(f'[server]\nhostname = "{hostname}"\n{queue}')
    return path


@pytest.fixture
def three(tmp_path: Path) -> dict[str, Path]:
    """A file for each of -c, MTA_CONFIG and the default path, all present."""
    return {"-c": hostname_config(tmp_path / "given.toml", "given.test"),
            "MTA_CONFIG": hostname_config(tmp_path / "env.toml", "env.test"),
            "default_path": hostname_config(tmp_path / "etc" / "mta" / "mta.toml", "etc.test")}


def test_c_comes_first(tmp_path: Path, three: dict[str, Path]) -> None:
    done = mta("config", "check", "-c", str(three["-c"]), cwd=tmp_path,
               env={"MTA_CONFIG": str(three["MTA_CONFIG"]), SYSTEM_PATH_ENV: str(three["default_path"])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"configuration OK: {three['-c']} (named by -c)"


def test_mta_config_comes_before_the_default_path(tmp_path: Path, three: dict[str, Path]) -> None:
    done = mta("config", "check", cwd=tmp_path,
               env={"MTA_CONFIG": str(three["MTA_CONFIG"]), SYSTEM_PATH_ENV: str(three["default_path"])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"configuration OK: {three['MTA_CONFIG']} (named by $MTA_CONFIG)"


def test_the_default_path_is_used_when_it_exists(tmp_path: Path, three: dict[str, Path]) -> None:
    done = mta("config", "check", cwd=tmp_path, env={SYSTEM_PATH_ENV: str(three["default_path"])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"configuration OK: {three['default_path']} (the default path)"


def test_the_embedded_defaults_come_last(tmp_path: Path) -> None:
    absent = tmp_path / "etc" / "mta" / "mta.toml"
    done = mta("config", "check", cwd=tmp_path, env={SYSTEM_PATH_ENV: str(absent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"configuration OK: embedded defaults (no -c, no $MTA_CONFIG, no {absent})"


def test_a_missing_file_named_by_mta_config_is_an_error_not_a_fallback(tmp_path: Path,
                                                                      three: dict[str, Path]) -> None:
    missing = tmp_path / "typo.toml"
    done = mta("config", "check", cwd=tmp_path,
               env={"MTA_CONFIG": str(missing), SYSTEM_PATH_ENV: str(three["default_path"])})
    assert done.returncode == 2
    assert f"{missing}: no such file (named by $MTA_CONFIG)" in done.stderr


def test_a_reload_reads_the_same_source_even_when_the_default_path_appears(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = configmod.load(None)
    assert embedded.source == configmod.EMBEDDED
    monkeypatch.setenv(SYSTEM_PATH_ENV, str(hostname_config(tmp_path / "mta.toml", "appeared.test")))
    assert configmod.load(None).server.hostname == "appeared.test"  # a new command would use it
    assert configmod.reload(embedded).source == configmod.EMBEDDED  # a running server keeps its own


@pytest.mark.parametrize("command", QUEUE_COMMANDS, ids=" ".join)
def test_a_queue_command_without_a_spool_names_the_spool_and_the_config(tmp_path: Path,
                                                                       command: list[str]) -> None:
    done = mta(*command, cwd=tmp_path)
    assert done.returncode == 1, done
    assert done.stdout == ""
    spool = tmp_path / "var" / "spool"
    assert done.stderr == f"mta: no spool at {spool} (config: embedded defaults): is -c right?\n"
    assert not spool.exists()  # looking created nothing


def test_the_message_names_the_config_that_was_found(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    config = hostname_config(tmp_path / "mta.toml", "mx.test", spool)
    done = mta("queue", "list", cwd=tmp_path, env={"MTA_CONFIG": str(config)})
    assert (done.returncode, done.stderr) == (1, f"mta: no spool at {spool} (config: {config}): is -c right?\n")


def test_serve_logs_the_config_it_found_and_the_queue_commands_use_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No -c anywhere: the server and the CLI both find the default-path file, and agree."""
    port = free_port()
    spool = tmp_path / "spool"
    etc = tmp_path / "etc" / "mta" / "mta.toml"
    etc.parent.mkdir(parents=True)
    etc.write_text(toml_dumps(server_config(port, spool)))
    monkeypatch.setenv(SYSTEM_PATH_ENV, str(etc))
    server = MtaServer(None, port, spool, tmp_path / "mta.log", cwd=tmp_path)
    try:
        server.start()
        log = wait_until(lambda: [line for line in server.log_bytes().decode().splitlines() if "event=starting" in line],
                         10, "the starting line", server)
        assert f"config={etc} config_from=default_path " in log[0]
        done = mta("queue", "list", cwd=tmp_path)
        assert (done.returncode, done.stdout.strip()) == (0, f"queue is empty ({spool})"), done.stderr
    finally:
        server.stop()
