"""A counter incremented by several processes: ``lock()`` makes read-modify-write atomic.

Without the lock two processes can read the same value and one increment is
lost; with it the total is exact. If a process dies while holding the lock,
the operating system releases it, so the others carry on.

Run: python examples/dict_counter.py
"""

from __future__ import annotations

import multiprocessing

from shared_memory_array import SharedDict

NAME = "counter_example"
WORKERS = 4
INCREMENTS = 2_000


def work(worker: int) -> int:
    with SharedDict.attach(NAME) as counts:
        for _ in range(INCREMENTS):
            with counts.lock():  # one atomic step across processes and threads
                counts["total"] += 1
                counts[f"worker {worker}"] = counts.get(f"worker {worker}", 0) + 1
    return worker


def main() -> None:
    with SharedDict.create(NAME, max_items=64, heap_size=2**20) as counts:
        counts["total"] = 0
        with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
            pool.map_async(work, range(WORKERS)).get(timeout=120)
        print(f"total = {counts['total']} (expected {WORKERS * INCREMENTS})")
        print({key: value for key, value in counts.items() if key != "total"})


if __name__ == "__main__":
    main()
