"""Rows of the data-path table: one measured value, its baseline from the same run, the ratio, the goal."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench._common import print_table


@dataclass
class Row:
    metric: str
    measured: str           # what afsd did, with its unit
    baseline: str           # what the same work cost the baseline in the same run
    ratio: float | None     # measured / baseline (or as `ratio_label` says); None: not a ratio row
    goal: str
    ratio_label: str = "ratio"
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Section:
    """What one part of the bench printed, and its rows for the summary."""

    title: str
    rows: list[Row] = field(default_factory=list)
    skipped: str = ""       # why this section did not run


def print_summary(sections: list[Section]) -> None:
    table = []
    for section in sections:
        if section.skipped:
            table.append([section.title, "NOT MEASURED", "-", "-", section.skipped])
            continue
        for row in section.rows:
            ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
            table.append([row.metric, row.measured, row.baseline, f"{ratio} ({row.ratio_label})", row.goal])
    print_table(["metric", "afsd", "baseline (same run)", "ratio", "goal"], table)


def paired_ratios(measured: list[float], baseline: list[float]) -> list[float]:
    """Each repeat's measured ÷ its baseline (the two taken back to back, so both saw the same machine)."""
    return [m / b for m, b in zip(measured, baseline)]


def spread(values: list[float], digits: int = 0) -> str:
    """"median M (min-max; each: a, b, c)": what a reader needs to see how far one number can be trusted."""
    each = ", ".join(f"{v:,.{digits}f}" for v in values)
    return (f"median {statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f}; "
            f"each: {each})")


def ratio_label(ratios: list[float]) -> str:
    """The summary's ratio column for a median of per-repeat ratios: how many, and how far apart."""
    return f"median of {len(ratios)}, {min(ratios):.2f}-{max(ratios):.2f}"
