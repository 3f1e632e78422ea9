"""SharedDict benchmark against ``multiprocessing.Manager().dict()`` and a plain dict.

Prints one table, every competitor measured in the same run:

* single process, N small values (int values, ``"key_<i>"`` keys): writes of
  new keys, reads, updates of existing keys. Reads are shown twice: "reads
  (cached)" in the process that wrote (the per-handle cache, checked against
  the shared version counter, answers), and "reads (uncached)" by a freshly
  attached handle that reads every key once (each read takes the lock and
  probes the shared table);
* two processes hammering one dict at once, each doing N operations (half
  writes of its own keys, half reads of the other's), total ops/s by wall time.

The plain dict is the ceiling (no sharing at all). Best of ``--repeat`` runs.

Run: python benchmarks/bench_dict.py [--quick] [--items N] [--repeat R]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from shared_memory_array import SharedDict

NAME = f"bench_dict_{os.getpid()}"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def single_process(
    make: Callable[[], MutableMapping[Any, Any]],
    fresh_reader: Callable[[], MutableMapping[Any, Any]] | None,
    items: int,
    repeat: int,
) -> dict[str, float]:
    """Best ops/s of writes, cached reads, uncached reads and updates on mappings from ``make``."""
    keys = [f"key_{i}" for i in range(items)]
    best: dict[str, float] = {}

    def record(label: str, seconds: float) -> None:
        best[label] = max(best.get(label, 0.0), items / seconds)

    for _ in range(repeat):
        mapping = make()

        def write(mapping: MutableMapping[Any, Any] = mapping) -> None:
            for i, key in enumerate(keys):
                mapping[key] = i

        def read(mapping: MutableMapping[Any, Any] = mapping) -> None:
            for key in keys:
                mapping[key]

        def update(mapping: MutableMapping[Any, Any] = mapping) -> None:
            for i, key in enumerate(keys):
                mapping[key] = i + 1

        record("writes", timed(write))
        record("reads (cached)", timed(read))
        if fresh_reader is not None:
            reader = fresh_reader()
            record("reads (uncached)", timed(functools.partial(read, reader)))
            close = getattr(reader, "close", None)
            if close is not None:
                close()
        record("updates", timed(update))
        close = getattr(mapping, "close", None)
        if close is not None:
            close()
    return best


def hammer(mapping: Any, worker: int, operations: int, start: Any, done: Any) -> None:
    """Alternate a write of this worker's key and a read of the other worker's key."""
    if isinstance(mapping, str):
        mapping = SharedDict.attach(mapping)
    own = [f"w{worker}_{i % 500}" for i in range(operations)]
    other = [f"w{1 - worker}_{i % 500}" for i in range(operations)]
    start.wait()
    for i in range(0, operations, 2):
        mapping[own[i]] = i
        mapping.get(other[i])
    done.put(worker)


def two_processes(mapping: Any, target: Any, operations: int) -> float:
    """Total ops/s of two spawned processes hammering ``mapping`` (passed as ``target``)."""
    context = mp.get_context("spawn")
    start, done = context.Event(), context.Queue()
    for worker in (0, 1):
        for i in range(500):
            mapping[f"w{worker}_{i}"] = -1
    workers = [
        context.Process(target=hammer, args=(target, w, operations, start, done)) for w in (0, 1)
    ]
    for process in workers:
        process.start()
    time.sleep(1.0)  # let both import and attach
    began = time.perf_counter()
    start.set()
    for _ in workers:
        done.get(timeout=600)
    elapsed = time.perf_counter() - began
    for process in workers:
        process.join(timeout=60)
    return 2 * operations / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2000 items, one repeat")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    items, repeat = (2_000, 1) if args.quick else (args.items, args.repeat)
    heap = max(1 << 20, items * 256)

    def make_shared() -> SharedDict:
        return SharedDict.create(NAME, max_items=items + 1000, heap_size=heap)

    shared = single_process(make_shared, lambda: SharedDict.attach(NAME), items, repeat)
    plain = single_process(dict, None, items, repeat)
    with mp.get_context("spawn").Manager() as manager:
        managed = single_process(manager.dict, None, items, 1)
        proxy = manager.dict()
        managed_pair = two_processes(proxy, proxy, items)
    with SharedDict.create(NAME, max_items=2000, heap_size=heap) as d:
        shared_pair = two_processes(d, NAME, items)

    print(
        f"SharedDict, {items:,} small values; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    header = (
        f"{'operation':<18} {'SharedDict':>12} {'Manager.dict':>13} {'ratio':>7} "
        f"{'dict':>12} {'of dict':>8}"
    )
    print(header)
    print("-" * len(header))
    for label in ("writes", "reads (cached)", "reads (uncached)", "updates"):
        ours = shared[label]
        theirs = managed["reads (cached)" if label.startswith("reads") else label]
        ceiling = plain["reads (cached)" if label.startswith("reads") else label]
        print(
            f"{label:<18} {ours:>12,.0f} {theirs:>13,.0f} {ours / theirs:>6.1f}x "
            f"{ceiling:>12,.0f} {ours / ceiling:>7.1%}"
        )
    print(
        f"{'2 processes':<18} {shared_pair:>12,.0f} {managed_pair:>13,.0f} "
        f"{shared_pair / managed_pair:>6.1f}x {'':>12} {'':>8}"
    )
    print("(ops/s; Manager.dict and dict have no cache: their reads are the same operation)")


if __name__ == "__main__":
    main()
