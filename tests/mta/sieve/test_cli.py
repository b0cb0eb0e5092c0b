"""`mta sieve check FILE`: the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.mta.sieve.test_rfc5228 import FULL_EXAMPLE

ROOT = Path(__file__).resolve().parents[3]


def mta(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "queue")])
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_a_good_script_is_ok(tmp_path: Path) -> None:
    script = tmp_path / ".dovecot.sieve"
    script.write_text(FULL_EXAMPLE)
    done = mta("sieve", "check", str(script))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{script}: ok\n", "")


def test_an_error_names_the_file_and_line(tmp_path: Path) -> None:
    script = tmp_path / "bad.sieve"
    script.write_text('require "fileinto";\n\nif header :contains "subject" "x" {\n  fileinto "a"\n}\n')
    done = mta("sieve", "check", str(script))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"{script}: line 4: missing ';' after fileinto")


def test_an_unrequired_extension_is_an_error(tmp_path: Path) -> None:
    script = tmp_path / "bad.sieve"
    script.write_text('# no require\nvacation "away";\n')
    done = mta("sieve", "check", str(script))
    assert done.returncode == 1 and f'{script}: line 2: vacation needs require "vacation"' in done.stderr


def test_a_missing_or_binary_file(tmp_path: Path) -> None:
    done = mta("sieve", "check", str(tmp_path / "none.sieve"))
    assert done.returncode == 1 and "cannot read" in done.stderr and "No such file" in done.stderr
    binary = tmp_path / "latin1.sieve"
    binary.write_bytes(b'keep;\n# caf\xe9\n')
    done = mta("sieve", "check", str(binary))
    assert done.returncode == 1 and f"{binary}: line 2: not UTF-8" in done.stderr
