"""Micro-benchmark of the spool's two hot write paths: LmdbBackend.commit and apply.

    PYTHONPATH=.:queue python3 bench/spoolwrite.py [--rounds 400] [--runs 5] [--json]
    python3 bench/spoolwrite.py --against /path/to/other/checkout [--runs 15]

commit: group commits of 25 messages of 1 KiB, 4 recipients at 2 domains (inbound's
group commit); apply: 25 envelope updates (ready -> deferred, new retry time: the
scheduler's write after a round of deferrals). Each run uses a fresh spool in a temp
dir on the same filesystem as the real one would be (fsync on: sync=True is the
backend's own setting); the figure is the median of `--runs` runs of µs per
transaction. `--against` compares two checkouts: one run of each in turn, each in a
fresh process with its own PYTHONPATH, so the machine's load moves both alike; it
prints both medians and the ratio this checkout / the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import new_id
from mtaqueue.records import Envelope, NewMessage, Recipient

BATCH = 25
BODY = b"Subject: bench\r\n\r\n" + b"x" * (1024 - 18)


def _batch(now: float) -> list[NewMessage]:
    out = []
    for k in range(BATCH):
        recipients = [Recipient(f"u{k}.{i}@{'ab'[i % 2]}.example", None, None) for i in range(4)]
        envelope = Envelope(new_id(now), "sender@client.example", recipients, len(BODY), now, now,
                            client={"ip": "192.0.2.1", "helo": "client.example"})
        out.append(NewMessage(envelope, BODY))
    return out


def one_run(rounds: int, directory: str) -> tuple[float, float]:
    """(µs per commit, µs per apply) on a fresh spool."""
    spool = LmdbBackend(os.path.join(directory, f"q{time.monotonic_ns()}"), 1 << 30)
    try:
        batches = [_batch(1.7e9 + r) for r in range(rounds)]
        started = time.perf_counter()
        for batch in batches:
            spool.commit(batch)
        commit = (time.perf_counter() - started) / rounds * 1e6
        for batch in batches:
            for m in batch:
                m.envelope.recipients[0].state = "deferred"
                m.envelope.recipients[1].state = "deferred"
                m.envelope.next_attempt += 600
                m.envelope.attempts += 1
        started = time.perf_counter()
        for batch in batches:
            spool.apply(update=[m.envelope for m in batch])
        apply = (time.perf_counter() - started) / rounds * 1e6
    finally:
        spool.close()
    return commit, apply


def against(other: str, runs: int, rounds: int) -> int:
    """Alternate single runs of this checkout and `other`; medians and ratios."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    figures: dict[str, list[tuple[float, float]]] = {here: [], other: []}
    for run in range(runs):
        for checkout in (here, other) if run % 2 == 0 else (other, here):
            env = dict(os.environ, PYTHONPATH=f"{checkout}:{checkout}/queue")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--runs", "1", "--rounds", str(rounds),
                                  "--json"], env=env, check=True, capture_output=True, text=True).stdout
            result = json.loads(out)
            figures[checkout].append((result["commit_us"], result["apply_us"]))
        print(f"run {run + 1}/{runs}: " + ", ".join(f"{name} commit {f[-1][0]:.0f} apply {f[-1][1]:.0f} µs"
                                                   for name, f in (("this", figures[here]), ("other", figures[other]))),
              file=sys.stderr)
    medians = {k: (statistics.median(c for c, _ in v), statistics.median(a for _, a in v)) for k, v in figures.items()}
    (c1, a1), (c2, a2) = medians[here], medians[other]
    print(f"this checkout:  commit {c1:.0f} µs, apply {a1:.0f} µs (median of {runs} runs of {rounds})")
    print(f"{other}: commit {c2:.0f} µs, apply {a2:.0f} µs")
    print(f"ratio this/other: commit {c1 / c2:.3f}, apply {a1 / a2:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400, help="transactions of each kind per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the temporary spools go (default: the temp dir)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--against", metavar="CHECKOUT", help="compare with another checkout, runs alternating")
    args = parser.parse_args()
    if args.against:
        return against(os.path.abspath(args.against), args.runs, args.rounds)
    commits, applies = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for run in range(args.runs):
            commit, apply = one_run(args.rounds, directory)
            commits.append(commit)
            applies.append(apply)
            print(f"run {run + 1}/{args.runs}: commit {commit:.0f} µs, apply {apply:.0f} µs", file=sys.stderr)
    result = {"commit_us": statistics.median(commits), "apply_us": statistics.median(applies),
              "runs": args.runs, "rounds": args.rounds}
    print(json.dumps(result) if args.json else
          f"commit {result['commit_us']:.0f} µs / {BATCH} messages, apply {result['apply_us']:.0f} µs / {BATCH} updates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
