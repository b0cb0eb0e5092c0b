"""bench/run --against DIR: two builds of mta in one run, rows alternating, compared.

The other build is a real checkout made with `git worktree add` in the test's temp dir
(HEAD of the checkout under test, so both sides run the same code; removed after). The
short --e2e variant must run both rows to the sink and put the ratio this/other in the
JSON and the report; --syscalls must count both builds per process kind; a directory
that is no checkout, and a checkout whose code rejects this bench's configuration, must
stop the run before anything starts, saying why. No speed or ratio is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"
# The first commit: its config knows no [local] table, which the bench writes.
FIRST_COMMIT = "e1cfa3b"


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *argv], capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def worktree(path: Path, commit: str) -> Iterator[Path]:
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))


@pytest.fixture(scope="module")
def head_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from worktree(tmp_path_factory.mktemp("against") / "head", "HEAD")


def bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "run"), *argv], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.integration
def test_e2e_smoke_against_another_checkout_runs_both_builds_and_reports_their_ratio(
        head_checkout: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    done = bench("--e2e", "--smoke", "--targets", "mta", "--sizes", "1024", "--quiet",
                 "--against", str(head_checkout), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    short = git("-C", str(head_checkout), "rev-parse", "--short", "HEAD")
    other = f"mta-1w@{short}"
    doc = json.loads(out.read_text())["e2e"]
    rows = {t["target"]: t for t in doc["targets"]}
    assert list(rows) == ["mta-1w", other]  # this build first, then the other
    for name in rows:
        run = rows[name]["runs"][0]
        assert run["ok"], (name, run["error"])
        result = run["result"]
        assert result["messages"] == result["accepted"] == result["arrived"] == 200, name
    against = doc["against"]
    assert against["other"]["root"] == str(head_checkout.resolve())
    assert against["other"]["name"] == short
    [pair] = against["rows"]
    assert (pair["this"], pair["other"], pair["size"]) == ("mta-1w", other, 1024)
    for key in ("accepted_per_second", "e2e_per_second", "server_cpu_us_per_message"):
        figure = pair[key]
        assert figure["ratio_of_medians"] == pytest.approx(figure["this"] / figure["other"], rel=1e-3)
        assert figure["pair_ratios"] == [figure["ratio_of_medians"]]  # one repeat: one pair
    report = done.stdout
    assert f"| mta-1w / {other} | 1024 | server CPU µs/msg |" in report
    assert f"against {head_checkout.resolve()} at {short}" in report


@pytest.mark.integration
def test_syscalls_smoke_against_another_checkout_counts_both_builds_per_kind(
        head_checkout: Path, tmp_path: Path) -> None:
    out = tmp_path / "syscalls.json"
    done = bench("--syscalls", "--smoke", "--targets", "mta", "--quiet",
                 "--against", str(head_checkout), "--json", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    other = "mta-1w@" + git("-C", str(head_checkout), "rev-parse", "--short", "HEAD")
    doc = json.loads(out.read_text())["syscalls"]
    assert [t["target"] for t in doc["targets"]] == ["mta-1w", other]
    [pair] = doc["against"]["rows"]
    assert (pair["this"], pair["other"]) == ("mta-1w", other)
    for kind in ("master", "inbound", "scheduler", "delivery"):
        counts = pair["by_kind"][kind]
        assert counts["this"] >= 1 and counts["other"] >= 1, kind
        assert counts["ratio"] == pytest.approx(counts["this"] / counts["other"], rel=1e-2)
    assert f"| kind | mta-1w | {other} | this/other |" in done.stdout


def test_against_a_directory_that_is_no_checkout_stops_before_anything_starts(tmp_path: Path) -> None:
    done = bench("--e2e", "--against", str(tmp_path), timeout=30)
    assert done.returncode == 2
    assert f"--against {tmp_path}: not a checkout of mta (no mta/__main__.py" in done.stderr
    done = bench("--e2e", "--against", str(tmp_path / "missing"), timeout=30)
    assert done.returncode == 2
    assert "no such directory" in done.stderr


@pytest.mark.integration
def test_a_build_that_rejects_the_bench_configuration_stops_the_run_saying_which_key(tmp_path: Path) -> None:
    if subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{FIRST_COMMIT}^{{commit}}"],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip(f"{FIRST_COMMIT} is not in this clone (shallow?)")
    for old in worktree(tmp_path / "old", FIRST_COMMIT):
        done = bench("--e2e", "--smoke", "--targets", "mta", "--sizes", "1024", "--against", str(old),
                     timeout=60)
        assert done.returncode == 1
        assert "rejects the configuration this bench writes" in done.stderr
        assert "unknown section [local]" in done.stderr
        assert "common sink" not in done.stderr and "starting on" not in done.stderr  # nothing started
