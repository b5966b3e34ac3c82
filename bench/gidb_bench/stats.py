"""Medians, ratios and verdicts against the targets, and their text tables.

These machines are noisy: targets are ratios of medians of runs made in
the same invocation, interleaved so that a change of load hits both sides.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MIB = 2**20

# The line log.phase() writes for each phase of a script: "NAME: done in X s".
_PHASE = re.compile(r"^(?P<name>[^\n:][^\n]*?): done in (?P<seconds>[0-9]+(?:\.[0-9]+)?) s$",
                    re.MULTILINE)


def median(values: Sequence[float]) -> float:
    """The median of ``values``; refuses an empty sequence."""
    if not values:
        raise ValueError("the median of no values")
    return float(statistics.median(values))


def ratio(ours: float, reference: float) -> float:
    """``ours`` as a fraction of ``reference``; refuses a reference of 0 or less."""
    if reference <= 0:
        raise ValueError(f"a reference time of {reference} cannot be compared")
    return ours / reference


def interleaved(labels: Sequence[str], runs: int) -> list[tuple[int, str]]:
    """The order of ``runs`` rounds of every label: (round, label) pairs.

    Each round holds every label once; the label that starts a round rotates
    (A B, B A, A B ...), so that neither side always runs just after the
    other and a drift in load hits both alike.
    """
    if runs < 0:
        raise ValueError("a negative number of runs")
    order = []
    n = len(labels)
    for r in range(runs):
        for i in range(n):
            order.append((r, labels[(r + i) % n]))
    return order


@dataclass(frozen=True)
class Verdict:
    """One measured value against one target (value <= limit passes, or ==)."""

    scenario: str
    what: str
    value: float
    limit: float
    unit: str = ""  # "" for a ratio, " s", " MiB", ...
    note: str = ""
    exact: bool = False  # the value must equal the limit (a count)

    @property
    def passed(self) -> bool:
        return self.value == self.limit if self.exact else self.value <= self.limit

    def line(self) -> str:
        """One line: the value, the target and PASS or FAIL."""
        op = "==" if self.exact else "<="
        text = (f"{self.what}: {_number(self.value)}{self.unit} "
                f"(target {op} {_number(self.limit)}{self.unit})  "
                f"{'PASS' if self.passed else 'FAIL'}")
        return text + (f"  [{self.note}]" if self.note else "")


@dataclass(frozen=True)
class Failure:
    """A scenario that could not be measured (counts as not passed)."""

    scenario: str
    reason: str

    passed = False

    def line(self) -> str:
        return f"{self.scenario}: ERROR: {self.reason}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def seconds(value: float) -> str:
    """A duration for a table: milliseconds below 10 s would be noise."""
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def mib(kib: int) -> str:
    """Kibibytes (as the kernel counts resident memory) as MiB with one decimal."""
    return f"{kib / 1024:.1f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    all_rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = []
    for row in all_rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def phase_times(log_text: str) -> dict[str, float]:
    """The phases a script logged ("NAME: done in X s"), in order."""
    found: dict[str, float] = {}
    for m in _PHASE.finditer(log_text):
        found[m.group("name").strip()] = float(m.group("seconds"))
    return found


def median_phases(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per phase, the median over the runs that logged it, in first-seen order."""
    names: list[str] = []
    for run in runs:
        names.extend(n for n in run if n not in names)
    return {n: median([r[n] for r in runs if n in r]) for n in names}

