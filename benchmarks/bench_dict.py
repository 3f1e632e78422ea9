"""SharedDict benchmark against ``multiprocessing.Manager().dict()``, UltraDict and a plain dict.

Prints one table, every competitor measured in the same run (UltraDict only when
installed: the ``bench`` extra):

* single process, N small values (int values, ``"key_<i>"`` keys): writes of
  new keys, reads, updates of existing keys. Reads are shown twice: "reads
  (cached)" in the process that wrote (the per-handle cache, checked against
  the shared version counter, answers), and "reads (uncached)" by a freshly
  attached handle that reads every key once (each read takes the lock and
  probes the shared table);
* two processes hammering one dict at once, each doing N operations (half
  writes of its own keys, half reads of the other's), total ops/s by wall time.

The plain dict is the ceiling (no sharing at all). UltraDict streams every
change to the other handles, which replay it into a local dict: its reads are
local reads, and it is left out of the two-process row (without its optional
shared lock, concurrent writers are not safe; it runs with ``shared_lock=True``,
which needs the ``atomics`` package, like for like with SharedDict, every
operation of which is atomic across processes). Best of ``--repeat`` runs.

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

from _timing import Table, fmt_rate, optional, ratio

from shared_memory_array import SharedDict

ultradict = optional("UltraDict")  # pip install '.[bench]'

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
    print(f"# SharedDict benchmark{' (quick)' if args.quick else ''}")
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
    ultra = bench_ultradict(items, repeat) if ultradict is not None else None

    def base(label: str) -> str:  # the competitors have no cache: one kind of read
        return "reads (cached)" if label.startswith("reads") else label

    headers = ["operation", "SharedDict (ours)", "Manager().dict()", "compared with Manager"]
    if ultra is not None:
        headers += ["UltraDict", "compared with UltraDict"]
    headers += ["dict (ceiling)", "compared with dict"]
    table = Table(
        f"SharedDict, {items:,} small values, operations per second; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        headers,
    )
    for label in ("writes", "reads (cached)", "reads (uncached)", "updates"):
        ours, theirs = shared[label], managed[base(label)]
        cells = [
            label,
            fmt_rate(ours),
            fmt_rate(theirs),
            ratio(ours, theirs, higher_is_better=True),
        ]
        if ultra is not None:
            other = ultra[base(label)]
            cells += [fmt_rate(other), ratio(ours, other, higher_is_better=True)]
        ceiling = plain[base(label)]
        cells += [fmt_rate(ceiling), ratio(ours, ceiling, higher_is_better=True)]
        table.add(*cells)
    pair = ["2 processes (total)", fmt_rate(shared_pair), fmt_rate(managed_pair),
            ratio(shared_pair, managed_pair, higher_is_better=True)]  # fmt: skip
    pair += ["-", "-"] * (2 if ultra is not None else 1)
    table.add(*pair)
    table.note(
        "reads (cached): in the process that wrote (the per-handle cache answers); "
        "reads (uncached): a freshly attached handle reading every key once. Manager().dict(), "
        "UltraDict and dict have one kind of read, shown against both."
    )
    if ultra is None:
        table.note("UltraDict: not installed, columns left out (pip install '.[bench]')")
    table.print()


def bench_ultradict(items: int, repeat: int) -> dict[str, float]:
    """Best ops/s of UltraDict, sized for ``items`` (its defaults would dump in full often).

    With ``shared_lock=True``: without it concurrent writers from several
    processes are not safe, and every SharedDict operation is atomic across
    processes, so that is the like-for-like comparison.
    """
    made: list[Any] = []

    def make() -> Any:
        made.append(
            ultradict.UltraDict(
                create=True,
                buffer_size=items * 128,
                full_dump_size=items * 256,
                shared_lock=True,
            )
        )
        return made[-1]

    try:
        return single_process(make, None, items, repeat)
    finally:
        for mapping in made:
            mapping.unlink()


if __name__ == "__main__":
    main()
