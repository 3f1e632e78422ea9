"""SharedDict benchmark, on both of its paths, against UltraDict, zero-copy-ipc, Manager().dict().

SharedDict runs its hot steps in a C accelerator where it is built, and in pure Python
with ``SHARED_MEMORY_ARRAY_PURE=1`` (``shared_memory_array._accel``). Every row of ours is
measured on both paths, each in a process of its own, alternating with the competitors
in the same run (best of ``--repeat`` rounds), and prints two tables:

1. one process, N small values (int values, ``"key_<i>"`` keys): writes of new keys,
   updates of existing keys, reads. "reads (cached)" are in the process that wrote (the
   per-handle cache, checked against the shared version counter, answers); "reads
   (uncached)" by a freshly attached handle reading every key once. Two processes
   hammering one dict at once (half writes of their own keys, half reads of the other's)
   against ``Manager().dict()``. UltraDict runs with ``shared_lock=True`` (which needs the
   ``atomics`` package): without it, concurrent writers from several processes are not
   safe, and every SharedDict operation is atomic across processes. UltraDict streams
   every change to the other handles, which replay it into a local dict: its reads are
   local reads. zero-copy-ipc when installed (it is one of the packages this one replaces,
   so not in the ``bench`` extra). The plain dict is the ceiling (no sharing at all);
2. a counter: 4 processes adding 1 to one key at once, ``increment`` against UltraDict's
   ``with d.lock: d[k] += 1`` and a ``Manager().dict()`` with a ``Manager().Lock()`` doing
   the same (exact in all; checked), and increments per second in one process;
3. growth in the steady state: the default ``grow=True`` dict against ``grow=False`` of
   the same size (writes, updates, cached reads), and a dict that starts at 64 items and
   grows to N while it is written.

Run: python benchmarks/bench_dict.py [--quick] [--items N] [--repeat R]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from _timing import Table, fmt_rate, optional, ratio

from shared_memory_array import SharedDict, _accel

ultradict = optional("UltraDict")  # pip install '.[bench]'
zero_copy_ipc = optional("zero_copy_ipc")  # where installed

NAME = f"bench_dict_{os.getpid()}"
PATHS = {"C": "0", "pure": "1"}  # the value of SHARED_MEMORY_ARRAY_PURE for each
SINGLE = ("writes", "updates", "reads (cached)", "reads (uncached)")
PROCESSES = 4
ULTRA_SHARE = 50  # UltraDict's counter runs 1/50 of ours (the pure path 1/10): alike in time
MANAGER_SHARE = 100  # the Manager's counter, 1/100 of ours
STEADY = ("writes", "updates", "reads (cached)")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def single_process(
    make: Callable[[], MutableMapping[Any, Any]],
    fresh_reader: Callable[[], MutableMapping[Any, Any]] | None,
    items: int,
    repeat: int,
    cleanup: Callable[[Any], None] | None = None,
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
        if cleanup is not None:
            cleanup(mapping)
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


def count_ours(name: str, times: int, start: Any, done: Any) -> None:
    """``times`` increments of one key (one of the counter's processes)."""
    with SharedDict.attach(name) as shared:
        start.wait()
        for _ in range(times):
            shared.increment("n")
    done.put(times)


def count_ultra(name: str, times: int, start: Any, done: Any) -> None:
    """``times`` of UltraDict's ``with d.lock: d[k] += 1`` (one of the counter's processes)."""
    shared = ultradict.UltraDict(name=name, create=False, shared_lock=True)
    start.wait()
    for _ in range(times):
        with shared.lock:
            shared["n"] += 1
    done.put(times)
    shared.close()


def count_manager(shared: Any, times: int, start: Any, done: Any) -> None:
    """``times`` of ``with lock: d[k] += 1`` on a Manager's dict and lock (``shared``)."""
    proxy, lock = shared
    start.wait()
    for _ in range(times):
        with lock:
            proxy["n"] += 1
    done.put(times)


def counter(target: Callable[..., None], name: Any, times: int) -> float:
    """Increments per second of PROCESSES spawned processes, ``times`` each, at once."""
    context = mp.get_context("spawn")
    start, done = context.Event(), context.Queue()
    workers = [
        context.Process(target=target, args=(name, times, start, done)) for _ in range(PROCESSES)
    ]
    for process in workers:
        process.start()
    time.sleep(1.0)  # let them import and attach
    began = time.perf_counter()
    start.set()
    for _ in workers:
        done.get(timeout=600)
    elapsed = time.perf_counter() - began
    for process in workers:
        process.join(timeout=60)
    return PROCESSES * times / elapsed


def ours(items: int, repeat: int, counts: int) -> dict[str, Any]:
    """Every figure of ours on this process's path (run in a process per path)."""
    heap = max(1 << 20, items * 256)

    def make_shared() -> SharedDict:
        return SharedDict.create(NAME, max_items=items + 1000, heap_size=heap)

    figures: dict[str, Any] = single_process(
        make_shared, lambda: SharedDict.attach(NAME), items, repeat, lambda d: d.close()
    )

    def make_fixed() -> SharedDict:
        return SharedDict.create(NAME, max_items=items + 1000, heap_size=heap, grow=False)

    def make_small() -> SharedDict:
        return SharedDict.create(NAME, max_items=64, heap_size=4096)

    fixed = single_process(make_fixed, None, items, repeat, lambda d: d.close())
    figures.update({f"{label} (grow=False)": fixed[label] for label in STEADY})
    grown = single_process(make_small, None, items, repeat, lambda d: d.close())
    figures["writes (growing from 64 items)"] = grown["writes"]
    with SharedDict.create(NAME, max_items=2000, heap_size=heap) as shared:
        figures["2 processes (total)"] = two_processes(shared, NAME, items)
    counts //= 1 if _accel.native else 10  # about as long a run on either path
    with SharedDict.create(NAME, max_items=16) as shared:
        shared["n"] = 0
        figures["counter"] = counter(count_ours, NAME, counts)
        figures["counter exact"] = shared["n"] == PROCESSES * counts
        one = 4 * counts
        figures["increments"] = one / timed(lambda: [shared.increment("m") for _ in range(one)])
    figures["native"] = _accel.native
    return figures


def ours_in_process(path: str, items: int, repeat: int, counts: int) -> dict[str, Any]:
    """:func:`ours` in a new process on ``path`` (its environment picks the path)."""
    env = {**os.environ, _accel.PURE_ENV: PATHS[path]}
    command = [sys.executable, __file__, "--ours", str(items), str(repeat), str(counts)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    figures: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return figures


def bench_ultradict(items: int, repeat: int, counts: int) -> dict[str, float]:
    """Best ops/s of UltraDict, sized for ``items`` (its defaults would dump in full often).

    With ``shared_lock=True``: without it concurrent writers from several processes are not
    safe, and every SharedDict operation is atomic across processes, so that is the
    like-for-like comparison.
    """

    def make() -> Any:
        return ultradict.UltraDict(
            create=True, buffer_size=items * 128, full_dump_size=items * 256, shared_lock=True
        )

    figures = single_process(make, None, items, repeat, lambda d: d.unlink())
    shared = ultradict.UltraDict(create=True, shared_lock=True)
    try:
        shared["n"] = 0
        figures["counter"] = counter(count_ultra, shared.name, counts // ULTRA_SHARE)
        exact = shared["n"] == PROCESSES * (counts // ULTRA_SHARE)
        one = 4 * counts // ULTRA_SHARE

        def add() -> None:
            for _ in range(one):
                with shared.lock:
                    shared["m"] = shared.get("m", 0) + 1

        figures["increments"] = one / timed(add)
    finally:
        shared.unlink()
    figures["counter exact"] = float(exact)
    return figures


def bench_zero_copy_ipc(items: int, repeat: int) -> dict[str, float]:
    """Best ops/s of zero-copy-ipc's ZeroCopyDict (where installed)."""
    name = f"bench_zci_{os.getpid()}"

    def make() -> Any:
        return zero_copy_ipc.ZeroCopyDict.create(
            name, max_items=items + 1000, heap_size=max(1 << 20, items * 256)
        )

    def fresh() -> Any:
        return zero_copy_ipc.ZeroCopyDict.attach(name)

    return single_process(make, fresh, items, repeat, lambda d: d.close())


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for figures in rounds:
        for label, value in figures.items():
            if isinstance(value, bool):
                best[label] = best.get(label, True) and value
            else:
                best[label] = max(best.get(label, 0.0), value)
    return best


def main() -> None:
    if sys.argv[1:2] == ["--ours"]:  # a process of one path (ours_in_process)
        items, repeat, counts = (int(value) for value in sys.argv[2:5])
        print(json.dumps(ours(items, repeat, counts)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2000 items, one round")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    items, repeat = (2_000, 1) if args.quick else (args.items, args.repeat)
    counts = 50_000 if args.quick else 250_000  # per process: a run of 0.1 s, 0.6 s
    print(f"# SharedDict benchmark{' (quick)' if args.quick else ''}")
    rounds: dict[str, list[dict[str, Any]]] = {"C": [], "pure": [], "ultra": [], "zci": []}
    for _ in range(repeat):  # alternating: drifts of a shared machine hit every column alike
        for path in PATHS:
            rounds[path].append(ours_in_process(path, items, 1, counts))
        if ultradict is not None:
            rounds["ultra"].append(bench_ultradict(items, 1, counts))
        if zero_copy_ipc is not None:
            rounds["zci"].append(bench_zero_copy_ipc(items, 1))
    mine = {path: best_of(rounds[path]) for path in PATHS}
    ultra = best_of(rounds["ultra"]) if rounds["ultra"] else None
    zci = best_of(rounds["zci"]) if rounds["zci"] else None
    plain = single_process(dict, None, items, repeat)
    with mp.get_context("spawn").Manager() as manager:
        managed = single_process(manager.dict, None, items, 1)
        proxy = manager.dict()
        managed_pair = two_processes(proxy, proxy, items)
        tally, lock = manager.dict(n=0), manager.Lock()
        times = counts // MANAGER_SHARE
        managed["counter"] = counter(count_manager, (tally, lock), times)
        managed["counter exact"] = tally["n"] == PROCESSES * times
        one = 4 * times

        def add() -> None:
            for _ in range(one):
                with lock:
                    tally["m"] = tally.get("m", 0) + 1

        managed["increments"] = one / timed(add)
    managed["2 processes (total)"] = managed_pair

    def base(label: str) -> str:  # the competitors have no cache: one kind of read
        return "reads (cached)" if label.startswith("reads") else label

    paths = {
        path: f"{path}{'' if mine[path]['native'] == (path == 'C') else ' (not built)'}"
        for path in PATHS
    }
    headers = ["operation", "path", "SharedDict (ours)"]
    if ultra is not None:
        headers += ["UltraDict", "compared with UltraDict"]
    if zci is not None:
        headers += ["zero-copy-ipc", "compared with zero-copy-ipc"]
    headers += ["Manager().dict()", "compared with Manager", "dict (ceiling)", "compared with dict"]
    table = Table(
        f"SharedDict, {items:,} small values, operations per second; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        headers,
        text_columns=2,
    )
    for label in (*SINGLE, "2 processes (total)"):
        for path in PATHS:
            figure = mine[path][label]
            cells = [label, paths[path], fmt_rate(figure)]
            single = label != "2 processes (total)"
            if ultra is not None:
                other = ultra[base(label)] if single else 0.0
                cells += [
                    fmt_rate(other) if single else "-",
                    ratio(figure, other, higher_is_better=True),
                ]
            if zci is not None:
                other = zci[label] if single else 0.0
                cells += [
                    fmt_rate(other) if single else "-",
                    ratio(figure, other, higher_is_better=True),
                ]
            other = managed[base(label)]
            cells += [fmt_rate(other), ratio(figure, other, higher_is_better=True)]
            ceiling = plain[base(label)] if single else 0.0
            cells += [
                fmt_rate(ceiling) if single else "-",
                ratio(figure, ceiling, higher_is_better=True),
            ]
            table.add(*cells)
    table.note(
        "path: C, the accelerator (shared_memory_array._native); pure, the same library with "
        "SHARED_MEMORY_ARRAY_PURE=1. reads (cached): in the process that wrote (the per-handle "
        "cache answers); reads (uncached): a freshly attached handle reading every key once. "
        "Manager().dict(), UltraDict and dict have one kind of read, shown against both."
    )
    if ultra is None:
        table.note("UltraDict: not installed, columns left out (pip install '.[bench]')")
    if zci is None:
        table.note("zero-copy-ipc: not installed, columns left out (pip install zero-copy-ipc)")
    table.print()
    print_counter(mine, paths, ultra, managed, counts)
    print_growth(mine, paths, items)


def print_growth(mine: dict[str, dict[str, Any]], paths: dict[str, str], items: int) -> None:
    table = Table(
        f"Growth in the steady state: the default grow=True against grow=False, {items:,} items",
        ["operation", "path", "grow=True (default)", "grow=False", "compared with grow=False"],
        text_columns=2,
    )
    for label in STEADY:
        for path in PATHS:
            growing, fixed = mine[path][label], mine[path][f"{label} (grow=False)"]
            table.add(
                label,
                paths[path],
                fmt_rate(growing),
                fmt_rate(fixed),
                ratio(growing, fixed, higher_is_better=True),
            )
    for path in PATHS:
        grown = mine[path]["writes (growing from 64 items)"]
        fixed = mine[path]["writes (grow=False)"]
        table.add(
            "writes, growing from 64 items",
            paths[path],
            fmt_rate(grown),
            fmt_rate(fixed),
            ratio(grown, fixed, higher_is_better=True),
        )
    table.note(
        "Both sized for every item up front (the first rows: no growth step runs), in the same "
        "process; the last row starts at 64 items and a 4 KiB heap and grows as it is written "
        "(every growth step included)."
    )
    table.print()


def print_counter(
    mine: dict[str, dict[str, Any]],
    paths: dict[str, str],
    ultra: dict[str, float] | None,
    managed: dict[str, float],
    counts: int,
) -> None:
    headers = ["counter", "path", "SharedDict increment (ours)"]
    if ultra is not None:
        headers += ["UltraDict: with d.lock: d[k] += 1", "compared with UltraDict"]
    headers += ["Manager: with lock: d[k] += 1", "compared with Manager"]
    table = Table(
        f"A counter: increments per second, {PROCESSES} processes at once and one process",
        headers,
        text_columns=2,
    )
    for label, key in ((f"{PROCESSES} processes (total)", "counter"), ("1 process", "increments")):
        for path in PATHS:
            figure = mine[path][key]
            cells = [label, paths[path], fmt_rate(figure)]
            if ultra is not None:
                cells += [fmt_rate(ultra[key]), ratio(figure, ultra[key], higher_is_better=True)]
            cells += [fmt_rate(managed[key]), ratio(figure, managed[key], higher_is_better=True)]
            table.add(*cells)
    exact = all(mine[path]["counter exact"] for path in PATHS) and bool(managed["counter exact"])
    if ultra is not None:
        exact = exact and bool(ultra["counter exact"])
    table.note(
        f"{PROCESSES} processes: each adds 1 to one key {counts:,} times (the pure path "
        f"{counts // 10:,}, UltraDict {counts // ULTRA_SHARE:,}, the Manager "
        f"{counts // MANAGER_SHARE:,} times: runs alike in time, "
        "long enough that scheduling noise does not dominate), all at once; the final count "
        f"is checked: {'exact in every run' if exact else 'NOT EXACT in some run'}. "
        f"1 process: {4 * counts:,} increments in a loop (pure {4 * counts // 10:,}, "
        f"UltraDict {4 * counts // ULTRA_SHARE:,}, the Manager {4 * counts // MANAGER_SHARE:,})."
    )
    table.print()


if __name__ == "__main__":
    main()
