"""A SharedArray where numpy expects an array: np.asarray, numpy functions, indexing.

Run: python examples/numpy_protocol.py
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
from numpy.typing import NDArray

from shared_memory_array import SharedArray


def normalise_rows(shared: SharedArray[np.float32]) -> None:
    """In a worker: divide each row by its sum, in place, through the handle itself."""
    for i in range(len(shared)):
        shared[i] /= np.sum(shared[i])


def main() -> None:
    data: NDArray[np.float32] = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    with SharedArray.copy(data) as shared:  # SharedArray[np.float32]; no manager needed
        worker = mp.get_context("spawn").Process(target=normalise_rows, args=(shared,))
        worker.start()
        worker.join(timeout=60)
        view = np.asarray(shared)  # the zero-copy view: what the worker wrote is here
        print(f"row sums after the worker: {np.round(view.sum(axis=1), 6).tolist()}")
        print(f"np.mean(shared) = {np.mean(shared):.4f}; shared[0, :2] = {shared[0, :2]}")
        assert np.shares_memory(view, shared.as_array())


if __name__ == "__main__":
    main()
