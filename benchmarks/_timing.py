"""Formatting shared by the benchmark scripts."""

from __future__ import annotations


def fmt_time(seconds: float) -> str:
    """Format a duration with a unit that keeps 3-4 significant digits (µs, ms, s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:7.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:7.1f} ms"
    return f"{seconds:7.2f} s "
