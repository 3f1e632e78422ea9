"""Parallel row summation: workers read the SAME shared memory, nothing is copied.

The seed's basic example. Run: python examples/row_sums.py
"""

from __future__ import annotations

from multiprocessing import Pool
from multiprocessing.managers import SharedMemoryManager

import numpy as np

from shared_memory_array import SharedArray, SharedMemoryArray


def sum_row(args: tuple[SharedArray, int]) -> float:
    """Sum a single row - runs in a worker process."""
    shared_array, row_idx = args
    arr = shared_array.as_array()
    return float(arr[row_idx].sum())


def main() -> None:
    data = np.random.default_rng(0).random((1000, 1000))
    with SharedMemoryManager() as manager:
        shared = SharedMemoryArray.copy(manager, data)
        with Pool() as pool:
            results = pool.map(sum_row, [(shared, i) for i in range(1000)])
        print(f"Total sum: {sum(results):.6f} (numpy says {data.sum():.6f})")
        assert np.isclose(sum(results), data.sum())


if __name__ == "__main__":
    main()
