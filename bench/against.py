"""--against DIR: another checkout of mta as a second build in the same bench run.

    build = other_build("/tmp/q21-start")      # checks it: ValueError says what is wrong
    rows = with_other_rows(["mta-1w", "postfix"], build)   # mta-1w, mta-1w@e7b65a2, postfix
    row, root = checkout_for("mta-1w@e7b65a2", build)      # ("mta-1w", build's root)
    why = config_refused(build, config)        # None once its code accepts our config

The other build runs its own code (PYTHONPATH=DIR:DIR/queue, cwd DIR) on the
configuration this bench writes (mtaconf.py): the two rows differ in their code only.
Its rows are this build's row names with "@<short commit of DIR>" ("@<DIR's name>"
outside git). Rows alternate within a repeat (this, other, ...), so a repeat's pair of
runs shares the machine's state of the moment; a comparison is this/other of the
medians, with the spread of the per-repeat pairs' ratios: on two identical builds, that
spread is the noise floor.

Invariants: a checkout is checked (mta/__main__.py) before anything starts, and its
code must accept this bench's configuration before any run; pure formatting otherwise.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mtaconf import mta_env
from procs import REPO_ROOT
from results import Summary, cell, md_row

CHECK_TIMEOUT_SECONDS: Final = 60.0
# The figures compared, (result key, what the table calls it, digits).
E2E_FIGURES: Final = (("accepted_per_second", "ingest msg/s", 0),
                      ("e2e_per_second", "end-to-end msg/s", 0),
                      ("server_cpu_us_per_message", "server CPU µs/msg", 0))


@dataclass(frozen=True)
class Build:
    """A checkout of mta: where it is, what its rows are called, whether it has edits."""

    root: str
    name: str  # short commit, or the directory's name outside git
    dirty: bool

    def describe(self) -> str:
        return f"{self.root} at {self.name}" + (" with uncommitted changes" if self.dirty else "")


def _git(root: Path, *argv: str) -> str | None:
    """A git command's stdout in `root`; None if it is not a git checkout (or no git)."""
    try:
        done = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def build_at(root: Path) -> Build:
    """The checkout at `root` as a Build (its short commit, else its directory's name)."""
    short = _git(root, "rev-parse", "--short", "HEAD")
    changes = _git(root, "status", "--porcelain", "--untracked-files=no") if short else None
    return Build(str(root), short or root.name, bool(changes))


def this_build() -> Build:
    return build_at(REPO_ROOT)


def other_build(directory: str) -> Build:
    """The checkout given to --against; ValueError (for the operator) if it is not one."""
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--against {directory}: no such directory (make one with "
                         f"`git worktree add /tmp/old <commit>`)")
    if not (root / "mta" / "__main__.py").is_file():
        raise ValueError(f"--against {directory}: not a checkout of mta (no mta/__main__.py in "
                         f"{root}); give the top directory of a clone or `git worktree add`")
    return build_at(root)


def other_row(row: str, build: Build) -> str:
    return f"{row}@{build.name}"


def with_other_rows(rows: Sequence[str], build: Build | None) -> list[str]:
    """Every mta row followed by the same row run by the other build; other rows as they are."""
    out: list[str] = []
    for row in rows:
        out.append(row)
        if build is not None and row.startswith("mta"):
            out.append(other_row(row, build))
    return out


def checkout_for(target: str, build: Build | None) -> tuple[str, Path]:
    """(the row without its build, the checkout that runs it)."""
    row, at, _ = target.partition("@")
    if at:
        assert build is not None, target  # only --against makes @ rows
        return row, Path(build.root)
    return row, REPO_ROOT


def config_refused(build: Build, config: Path) -> str | None:
    """None if the other build's own code loads `config` (`mta config check`); else why
    not, for the operator. Also checks that its code, not this checkout's, is imported."""
    root = Path(build.root)
    env = mta_env(root)
    where = subprocess.run(
        [sys.executable, "-c", "import mta, mtaqueue; print(mta.__file__); print(mtaqueue.__file__)"],
        cwd=root, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT_SECONDS, check=False)
    files = where.stdout.split()
    if where.returncode != 0 or len(files) != 2 or not all(Path(f).is_relative_to(root) for f in files):
        return (f"the build in {root} does not import its own mta and mtaqueue "
                f"({' '.join(files) or where.stderr.strip()[-500:]})")
    check = subprocess.run([sys.executable, "-m", "mta", "config", "check", "-c", str(config)],
                           cwd=root, env=env, capture_output=True, text=True,
                           timeout=CHECK_TIMEOUT_SECONDS, check=False)
    if check.returncode == 0:
        return None
    return (f"the build in {root} ({build.name}) rejects the configuration this bench writes "
            f"(bench/mtaconf.py, {config.name}; `mta config check` exited {check.returncode}):\n"
            f"{check.stderr.strip()[-1500:] or check.stdout.strip()[-1500:]}\n"
            f"Compare with a checkout that knows these keys, or run that checkout's own bench/run "
            f"(without --against) and compare the two reports.")


def ratios(this: Summary, other: Summary, key: str) -> dict:
    """this/other of the medians, and of each repeat whose two runs both worked."""
    a, b = this.median(key), other.median(key)
    mine = {o.repeat: o.result[key] for o in this.outcomes if o.ok and o.result and o.result.get(key)}
    theirs = {o.repeat: o.result[key] for o in other.outcomes if o.ok and o.result and o.result.get(key)}
    pairs = [round(mine[r] / theirs[r], 4) for r in sorted(mine) if r in theirs]
    return {"this": a, "other": b, "ratio_of_medians": round(a / b, 4) if a and b else None,
            "pair_ratios": pairs, "median_pair_ratio": statistics.median(pairs) if pairs else None}


def ratio_cell(r: dict) -> str:
    if r["ratio_of_medians"] is None:
        return "-"
    pairs = r["pair_ratios"]
    spread = f" (pairs {min(pairs):.2f}–{max(pairs):.2f})" if len(pairs) > 1 else ""
    return f"**{r['ratio_of_medians']:.2f}**{spread}"


def e2e_pairs(summaries: Sequence, build: Build) -> list[tuple]:
    """(this, other) for every e2e row (target, size) the other build also ran."""
    by_key = {(s.target, s.size): s for s in summaries}
    return [(s, by_key[(other_row(s.target, build), s.size)]) for s in summaries
            if "@" not in s.target and (other_row(s.target, build), s.size) in by_key]


def render_e2e_comparison(summaries: Sequence, build: Build) -> str:
    """This build against the other, per row and size: both medians (min–max), the ratio."""
    pairs = e2e_pairs(summaries, build)
    if not pairs:
        return ""
    rows = [(f"This build ({this_build().describe()}) against {build.describe()}: medians "
            f"(min–max) over the runs, this/other of the medians (and of each repeat's pair "
            "of runs, which ran one after the other):\n"),
            "| row | size | figure | this build | other build | this/other |",
            "|---|---:|---|---:|---:|---:|"]
    for this, other in pairs:
        for key, title, digits in E2E_FIGURES:
            rows.append(md_row(f"{this.target} / {other.target}", this.size, title, cell(this, key, digits),
                               cell(other, key, digits), ratio_cell(ratios(this, other, key))))
    return "\n".join(rows)


def e2e_comparison_json(summaries: Sequence, build: Build) -> dict:
    return {"this": vars(this_build()), "other": vars(build),
            "rows": [{"this": this.target, "other": other.target, "size": this.size,
                      **{key: ratios(this, other, key) for key, _, _ in E2E_FIGURES}}
                     for this, other in e2e_pairs(summaries, build)]}


def syscall_pairs(summaries: Sequence, build: Build) -> list[tuple[str, dict, str, dict]]:
    """(this row, its result, other row, its result) for every pair that both worked."""
    good = {s.target: s.median_run("syscalls_per_message") for s in summaries if s.good}
    return [(t, good[t], other_row(t, build), good[other_row(t, build)])
            for t in good if "@" not in t and other_row(t, build) in good]


def _calls_ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def syscalls_comparison_json(summaries: Sequence, build: Build) -> dict:
    rows = []
    for this, mine, other, theirs in syscall_pairs(summaries, build):
        kinds = list(dict.fromkeys([*mine["by_kind"], *theirs["by_kind"]]))
        per = {k: (mine["by_kind"].get(k, {}).get("syscalls_per_message", 0.0),
                   theirs["by_kind"].get(k, {}).get("syscalls_per_message", 0.0)) for k in kinds}
        rows.append({"this": this, "other": other,
                     "syscalls_per_message": {"this": mine["syscalls_per_message"],
                                              "other": theirs["syscalls_per_message"],
                                              "ratio": _calls_ratio(mine["syscalls_per_message"],
                                                                    theirs["syscalls_per_message"])},
                     "by_kind": {k: {"this": a, "other": b, "ratio": _calls_ratio(a, b)}
                                 for k, (a, b) in per.items()}})
    return {"this": vars(this_build()), "other": vars(build), "rows": rows}


def render_syscalls_comparison(summaries: Sequence, build: Build, order: Sequence[str]) -> str:
    """Calls per relayed message per process kind, both builds and this/other."""
    doc = syscalls_comparison_json(summaries, build)
    if not doc["rows"]:
        return ""
    parts = [(f"This build ({this_build().describe()}) against {build.describe()}: system calls "
              "per relayed message (each build's median run):")]
    for row in doc["rows"]:
        lines = [f"| kind | {row['this']} | {row['other']} | this/other |", "|---|---:|---:|---:|"]
        kinds = [k for k in order if k in row["by_kind"]] + [k for k in row["by_kind"] if k not in order]
        for kind in kinds:
            k = row["by_kind"][kind]
            lines.append(md_row(kind, f"{k['this']:.1f}", f"{k['other']:.1f}", _ratio_text(k["ratio"])))
        total = row["syscalls_per_message"]
        lines.append(md_row("**total**", f"**{total['this']:.1f}**", f"**{total['other']:.1f}**",
                            f"**{_ratio_text(total['ratio'])}**"))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"
