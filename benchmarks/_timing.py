"""Formatting shared by the benchmark scripts: one table style, exact sizes, one ratio phrase.

Every script prints its results with :class:`Table` (a Markdown pipe table, so a
report pastes into the README as it is), labels sizes with :func:`fmt_size`
(binary units, exact: ``"6.25 MiB"``, never a rounded ``"6 MiB"``), and compares
with :func:`ratio`: always from our side, ``"ours is 3.5× faster"`` or ``"ours
is 1.7× slower"``, in a column that names what we are compared with.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def optional(module: str) -> Any:
    """Import an optional competitor (the ``bench`` extra); ``None`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def fmt_time(seconds: float) -> str:
    """Format a duration with a unit that keeps 3-4 significant digits (µs, ms, s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:7.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:7.1f} ms"
    return f"{seconds:7.2f} s "


def fmt_size(nbytes: int) -> str:
    """Label ``nbytes`` exactly in binary units (``"1 GiB"``, ``"6.25 MiB"``, ``"10 KiB"``).

    A size no unit states exactly is given in bytes (``"1,000,001 B"``).
    """
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if nbytes >= unit:
            text = f"{nbytes / unit:g}"
            if float(text) * unit == nbytes:
                return f"{text} {name}"
    return f"{nbytes:,} B"


def fmt_rate(per_second: float) -> str:
    """Operations per second with thousands separators."""
    return f"{per_second:,.0f}"


def ratio(ours: float, theirs: float, *, higher_is_better: bool = False) -> str:
    """Compare our figure with theirs, from our side: ``"ours is 3.5× faster"``.

    ``ours`` and ``theirs`` are times (lower is better) unless
    ``higher_is_better`` (rates, operations per second).
    """
    if ours <= 0 or theirs <= 0:
        return "-"
    factor = ours / theirs if higher_is_better else theirs / ours
    if round(factor, 2) == 1:
        return "ours is as fast"
    if factor > 1:
        return f"ours is {_factor(factor)} faster"
    return f"ours is {_factor(1 / factor)} slower"


def _factor(value: float) -> str:
    return f"{value:.0f}×" if value >= 100 else f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


class Table:
    """A Markdown pipe table printed at once: a title line, a header, aligned rows.

    The first ``text_columns`` columns are left-aligned (labels), the others
    right-aligned (figures).
    """

    def __init__(self, title: str, headers: Sequence[str], *, text_columns: int = 1) -> None:
        self.title = title
        self.text_columns = text_columns
        self.headers = list(headers)
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def add(self, *cells: object) -> None:
        """Add one row; cells are shown with ``str`` (format figures before)."""
        if len(cells) != len(self.headers):
            raise ValueError(f"{len(cells)} cells for {len(self.headers)} columns")
        self.rows.append([str(cell).strip() for cell in cells])

    def note(self, text: str) -> None:
        """A line printed under the table (what a figure means, what was left out)."""
        self.notes.append(text)

    def print(self) -> None:
        """Print the title, the table and its notes."""
        widths = [
            max(len(row[column]) for row in [self.headers, *self.rows])
            for column in range(len(self.headers))
        ]

        def line(cells: Sequence[str]) -> str:
            shown = [
                cell.ljust(width) if column < self.text_columns else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ]
            return "| " + " | ".join(shown) + " |"

        rule = (
            "|"
            + "|".join(
                ":" + "-" * (width + 1) if column < self.text_columns else "-" * (width + 1) + ":"
                for column, width in enumerate(widths)
            )
            + "|"
        )
        print(f"\n## {self.title}\n")
        print(line(self.headers))
        print(rule)
        for row in self.rows:
            print(line(row))
        for text in self.notes:
            print(f"\n{text}")
