"""Attach from another process: the owner creates, a second process attaches by name.

The seed's example, with the second process real. The client checks the layout it
expects (attach validates shape and dtype against the block's header) and its
exit neither unlinks the block nor prints resource-tracker warnings.
Run: python examples/attach_other_process.py
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from shared_memory_array import SharedArray


def client(name: str) -> None:
    """Process 2: attach by name, read, write one cell, close (never unlinks)."""
    shared = SharedArray.attach(name=name, shape=(1000, 1000), dtype="float64")
    arr = shared.as_array()
    print(f"client sees sum {arr.sum():.3f}; owner? {shared.owner}")
    arr[0, 0] = -1.0
    shared.close()


def main() -> None:
    owner = SharedArray.allocate((1000, 1000), "float64")
    arr = owner.as_array()
    arr[:] = np.random.default_rng(1).random((1000, 1000))
    print(f"owner wrote sum {arr.sum():.3f}")
    child = mp.get_context("spawn").Process(target=client, args=(owner.name,))
    child.start()
    child.join(60)
    print(f"owner sees the client's write: arr[0, 0] = {arr[0, 0]}")
    owner.close()  # the owner closes and unlinks


if __name__ == "__main__":
    main()
