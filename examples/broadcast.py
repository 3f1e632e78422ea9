"""Broadcast one large array to a pool of workers with SharedData.

The seed's example. The parent serialises the array once into one block; each
worker loads it by name as a read-only zero-copy view (cached per process after
the first load). The block is unlinked when the ``with`` block exits.
Run: python examples/broadcast.py
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from shared_memory_array import SharedData


def worker(args: tuple[str, int]) -> float:
    """Each worker loads the shared array (cached after first access)."""
    name, idx = args
    arr = SharedData.load(name)
    assert isinstance(arr, np.ndarray)
    total = float(arr.sum())
    print(f"Worker {idx}: shape={arr.shape}, sum={total:.0f}")
    return total


def main() -> None:
    data = np.ones((25_000_000,), dtype=np.float32)  # 100 MB
    with SharedData(data) as sd, mp.get_context("spawn").Pool(4) as pool:
        # sd.name is the block name to pass to workers
        results = pool.map(worker, [(sd.name, i) for i in range(4)])
    # Worker 0: shape=(25000000,), sum=25000000   (in some order)
    print(f"All workers returned: {results}")


if __name__ == "__main__":
    main()
