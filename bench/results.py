"""Runs and their summaries for bench/run's tables: medians, spreads and the shared notes.

An Outcome is one run of one target (ok, the tool's JSON result with the driver's
figures added, or the error and the server's log tail); a Summary is one table row's
outcomes. Cells show the median over the runs that worked, with (min–max) when there
were several; the notes every table shares are built here (FAILED runs, refusals,
hitting the timeout, a busy machine), each table adds its own.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

# Above this share of one core the load generator itself is the likely limit.
CLIENT_BOUND_CPU_SHARE: Final = 0.85
# Above this share of one core, processes that are neither the server nor the load
# generator ran during the measured load: the row says so (the machine is shared).
OTHER_BUSY_CPU_SHARE: Final = 0.15


@dataclass
class Outcome:
    target: str
    repeat: int
    ok: bool
    result: dict | None = None  # the tool's JSON result with the driver's figures added
    error: str | None = None
    stderr_tail: str | None = None


@dataclass
class Summary:
    target: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def good(self) -> list[dict]:
        return [o.result for o in self.outcomes if o.ok and o.result is not None]

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.good if r.get(key) is not None]
        return statistics.median(values) if values else None

    def median_run(self, key: str) -> dict:
        """The good run whose `key` is the median (the lower middle one of an even count):
        a whole run, so its parts (a count per process kind) add up to its total."""
        runs = sorted(self.good, key=lambda r: r[key])
        return runs[(len(runs) - 1) // 2]

    def spread(self, key: str) -> tuple[float, float] | None:
        values = [r[key] for r in self.good if r.get(key) is not None]
        return (min(values), max(values)) if len(values) > 1 else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(summary: Summary, key: str, digits: int) -> str:
    med = summary.median(key)
    if med is None:
        return "-"
    spread = summary.spread(key)
    if spread is None:
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(spread[0], digits)}–{fmt(spread[1], digits)})"


def span(values: Sequence[int]) -> str:
    """Counts over the runs: one number when they agree, else min–max ("-": none)."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def count_cell(summary: Summary, key: str) -> str:
    return span([int(r[key]) for r in summary.good if r.get(key) is not None])


def share_cell(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def problem_kinds(summary: Summary) -> str:
    """The refusal codes and error kinds seen in the runs that worked."""
    return ", ".join(sorted({k for r in summary.good for k in [*r["rejected_by_code"], *r["errors_by_kind"]]}))


def shortfalls(s: Summary, asked: str, got: str) -> list[int]:
    """Per run that worked, how many of `asked` did not end in `got`, ascending."""
    return sorted(r[asked] - r[got] for r in s.good)


def first_problems(result: dict) -> str:
    """What a run that got nothing through ran into: its first errors, else its refusals."""
    return "; ".join(result["first_errors"][:2] or [str(result["rejected_by_code"])])


def failed_note(s: Summary) -> list[str]:
    failed = [o for o in s.outcomes if not o.ok]
    return [f"FAILED {len(failed)}/{len(s.outcomes)}: {failed[0].error}"] if failed else []


def machine_notes(s: Summary, tool: str, client_bound: str) -> list[str]:
    """A busy machine, and a client near a full core (then the rate is a lower bound)."""
    notes = []
    busy = [r["other_cpu_share"] for r in s.good
            if r.get("other_cpu_share") is not None and r["other_cpu_share"] > OTHER_BUSY_CPU_SHARE]
    if busy:
        notes.append(f"other processes used up to {max(busy):.0%} of a core during "
                     f"{len(busy)}/{len(s.outcomes)} run(s)")
    client_share = s.median("client_cpu_share")
    if client_share is not None and client_share > CLIENT_BOUND_CPU_SHARE:
        notes.append(f"{tool} near one full core{client_bound}")
    return notes


def timeout_note(s: Summary, what: str = "") -> list[str]:
    timeouts = sum(1 for r in s.good if r["timed_out"])
    return [f"{timeouts} run(s) hit --timeout-seconds{what}"] if timeouts else []


def notes_cell(notes: list[str]) -> str:
    return "; ".join(notes).replace("|", "/")


def md_row(*cells: object) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report_text(first_line: str, table: str, summaries: Sequence[Summary], *sections: str,
                after: Sequence[str] = ()) -> str:
    """A part's report: its first line, its table, the `sections` that are not empty, the
    log tails of runs that went wrong, then `after`."""
    parts = [first_line + "\n", table, *("\n" + text for text in sections if text)]
    failures = render_failures(summaries)
    if failures:
        parts.append("\n" + failures)
    return "\n".join(parts + ["\n" + text for text in after if text])


def render_failures(summaries: Sequence[Summary]) -> str:
    parts = []
    for s in summaries:
        for o in s.outcomes:
            if o.stderr_tail is not None and (not o.ok or o.error):
                parts.append(f"**{o.target}** (repeat {o.repeat}): {o.error}\n\n"
                             f"```\n{o.stderr_tail or '(stderr empty)'}\n```")
    return "\n\n".join(parts)
