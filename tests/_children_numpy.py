"""Functions run in spawn children by the numpy-protocol tests (importable under spawn)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared_memory_array import SharedArray


def use_through_numpy_protocol(shared: SharedArray[Any]) -> tuple[Any, ...]:
    """In a child: read through np.asarray, write through indexing, report what it saw.

    Returns ``(len, shape, dtype, sum before, is a view, is an ndarray)`` and leaves
    row ``i`` of the array holding ``10 * i`` for the parent to check.
    """
    view = np.asarray(shared)
    before = float(view.sum())
    for i in range(len(shared)):
        shared[i] = 10 * i
    return (
        len(shared),
        view.shape,
        str(view.dtype),
        before,
        np.shares_memory(view, shared.as_array()),
        isinstance(shared, np.ndarray),
    )
