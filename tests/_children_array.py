"""Functions run in child processes by the SharedArray tests (importable under spawn)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared_memory_array import SharedArray


def row_sum(args: tuple[SharedArray, int]) -> float:
    """Sum one row of a shared 2-D array (the seed's Pool example)."""
    shared, row = args
    return float(shared.as_array()[row].sum())


def fill_row(args: tuple[SharedArray, int]) -> int:
    """Write the row index into one row of a shared array; return the child's view's owner flag."""
    shared, row = args
    shared.as_array()[row] = row
    return int(shared.owner)


def describe(shared: SharedArray) -> tuple[Any, ...]:
    """Return what a child sees of a handle: layout, ownership and a checksum of the data."""
    data = shared.as_array()
    return shared.shape, str(shared.dtype), shared.owner, float(np.asarray(data, float).sum())


_KEPT: list[SharedArray] = []


def create_and_return_name(shape: int) -> str:
    """Create an owned SharedArray, keep it open until the worker exits, and return its name."""
    _KEPT.append(SharedArray.allocate(None, shape, "u1"))
    return _KEPT[-1].name
