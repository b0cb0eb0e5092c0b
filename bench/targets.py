"""The servers bench/run's default mode compares, and how each one is started.

    rows = expand_targets(["aiosmtpd-fsync", "mta"], [1, 2])   # aiosmtpd-fsync, mta-1w, mta-2w
    launch = launcher_for("mta-2w")(port, workdir, args)        # a procs.Launch

Targets: `aiosmtpd-fsync` (the baseline: bench/baseline_aiosmtpd.py with a temp spool,
fsync before 250), `mta-<N>w` (mta with N inbound workers; `mta` is one such row per
--mta-workers count), and, not in the default set, the servers that store nothing:
`aiosmtpd-sink` (aiosmtpd's own protocol cost) and `null-sink` (bench/sink.py, near
free: its msg/s is the load generator's ceiling on this machine).

mta here is a receive-only node ([delivery] workers = 0: messages stay queued, as in
the baseline's spool, and local delivery does not compete for the two cores), with
`local.test` local and its mailbox `user` created, so loadgen's default recipient
`user@local.test` is accepted (else RCPT gets 550 5.1.1).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from mtaconf import mta_launch, write_config
from procs import BENCH_DIR, HOST, Launch

BASELINE_SCRIPT: Final = BENCH_DIR / "baseline_aiosmtpd.py"
SINK_SCRIPT: Final = BENCH_DIR / "sink.py"
BASELINE: Final = "aiosmtpd-fsync"
# `mta-<N>w`: mta with [server] inbound_workers = N. `--targets mta` expands to one
# such row per `--mta-workers` count.
MTA_TARGET: Final = "mta"
MTA_ROW: Final = re.compile(r"mta-([1-9][0-9]*)w")
MTA_WORKER_TITLE: Final = b"mta: inbound#"
RCPT_DOMAIN: Final = "local.test"
RCPT_USER: Final = "user"


def launch_aiosmtpd(port: int, workdir: Path, args: argparse.Namespace) -> Launch:
    return Launch(
        argv=[sys.executable, str(BASELINE_SCRIPT), "--host", HOST, "--port", str(port),
              "--spool", str(workdir / "spool"), "--mode", "fsync"],
        cwd=workdir, env=dict(os.environ))


def launch_aiosmtpd_sink(port: int, workdir: Path, args: argparse.Namespace) -> Launch:
    launch = launch_aiosmtpd(port, workdir, args)
    launch.argv[-1] = "discard"
    return launch


def launch_null_sink(port: int, workdir: Path, args: argparse.Namespace) -> Launch:
    return Launch(argv=[sys.executable, str(SINK_SCRIPT), "--host", HOST, "--port", str(port)],
                  cwd=workdir, env=dict(os.environ))


def launch_mta(port: int, workdir: Path, workers: int) -> Launch:
    for sub in ("cur", "new", "tmp"):
        (workdir / "mail" / RCPT_DOMAIN / RCPT_USER / sub).mkdir(parents=True)
    config = write_config(workdir, port, workers, relay={"local_domains": [RCPT_DOMAIN]},
                          delivery={"workers": 0})
    return mta_launch(config, workers)


Launcher = Callable[[int, Path, argparse.Namespace], Launch]

# `mta` is not in this table: it is a family of rows, see launcher_for().
TARGETS: Final[dict[str, Launcher]] = {
    BASELINE: launch_aiosmtpd,
    "aiosmtpd-sink": launch_aiosmtpd_sink,
    "null-sink": launch_null_sink,
}
DEFAULT_TARGETS: Final = (BASELINE, MTA_TARGET)
TARGET_CHOICES: Final = (BASELINE, MTA_TARGET, "mta-<N>w", *list(TARGETS)[1:])


def launcher_for(target: str) -> Launcher:
    """How to start one row's server; `mta-<N>w` runs mta with N inbound workers."""
    match = MTA_ROW.fullmatch(target)
    if match:
        workers = int(match.group(1))
        return lambda port, workdir, args: launch_mta(port, workdir, workers)
    return TARGETS[target]


def expand_targets(names: list[str], mta_workers: list[int]) -> list[str]:
    """The rows to run, in order: `mta` becomes one `mta-<N>w` row per worker count."""
    rows: list[str] = []
    for name in names:
        for row in ([f"mta-{n}w" for n in mta_workers] if name == MTA_TARGET else [name]):
            if row not in rows:
                rows.append(row)
    return rows
