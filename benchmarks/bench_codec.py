"""Codec benchmark: ``write`` + ``read`` + ``release`` against ``pickle.loads(pickle.dumps())``.

Prints two tables, the competitor measured in the same run:

1. Single-process round trip for bytes 10 KB and 10 MB, float32 100 MB and
   1 GB, each in steady state (repeated: the codec reuses its released block,
   already faulted in) and cold (first transfer: the codec creates a new block;
   pickle first gives its freed memory back to the system with
   ``malloc_trim``, so it faults fresh pages as a first transfer does).
2. 100 MB sent to an already-running worker process: the token through a
   ``multiprocessing.Queue`` (the worker reads, looks at one element, releases)
   against the array itself through the same queue; each timed to the worker's
   reply.

``read`` returns views: the data is not copied out of shared memory, and the
reader's first touch of each page costs a minor fault (not part of these rows).

Run: python benchmarks/bench_codec.py [--quick] [--skip-1gb]
(--quick: arrays / 16, few repeats; --skip-1gb: leave out the 1 GB rows)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import multiprocessing as mp
import pickle
import platform
import statistics
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from typing import Any

import numpy as np
from _timing import fmt_time

from shared_memory_array import _codec, read, release, write

KB, MB = 1000, 1000 * 1000
_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name) if _libc_name else None


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc), so the next big allocation faults."""
    gc.collect()
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def collect() -> None:
    gc.collect()


def median_time(
    fn: Callable[[], object], repeat: int, before: Callable[[], None], number: int = 1
) -> float:
    """Median seconds per call of ``fn``: ``repeat`` samples of ``number`` calls each.

    ``before`` runs untimed before each sample.
    """
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def fmt_size(nbytes: int) -> str:
    return f"{nbytes / MB:g} MB" if nbytes >= MB else f"{nbytes / KB:g} KB"


def pickle_round_trip(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, protocol=5))


def codec_round_trip(obj: object) -> object:
    token = write(obj)
    result = read(token)
    release(token)
    return result


def row(label: str, size: str, state: str, baseline: float, ours: float) -> None:
    print(
        f"| {label:<13} | {size:>7} | {state:<6} | {fmt_time(baseline)} | {fmt_time(ours)} "
        f"| {baseline / ours:6.2f}× |"
    )


def bench_round_trips(cases: list[tuple[str, str, object]], repeat: int) -> None:
    print("\n## Round trip in one process: write + read + release vs pickle.loads(pickle.dumps())")
    print("| object        |    size | state  |     pickle |      codec | speedup |")
    print("|---------------|---------|--------|------------|------------|---------|")
    for label, size, obj in cases:
        number = 2000 if size.endswith("KB") else 1
        ours_fn = functools.partial(codec_round_trip, obj)
        pickle_fn = functools.partial(pickle_round_trip, obj)
        # Steady state: warm up once, then repeat (the codec reuses its released block).
        ours_fn()
        ours = median_time(ours_fn, repeat, collect, number)
        pickle_fn()
        baseline = median_time(pickle_fn, repeat, collect, number)
        row(label, size, "steady", baseline, ours)
        # Cold: no block to reuse (the codec's pool emptied); pickle's heap trimmed.
        ours = median_time(ours_fn, max(3, repeat // 2), _codec._writer.drop_all)
        baseline = median_time(pickle_fn, max(3, repeat // 2), trim_heap)
        row(label, size, "cold", baseline, ours)
        _codec._writer.drop_all()


def worker(inbox: Queue[Any], outbox: Queue[float]) -> None:
    """Receive arrays or tokens until None; reply with the last element of each."""
    while (message := inbox.get(timeout=300)) is not None:
        if isinstance(message, str):
            array = read(message)
            assert isinstance(array, np.ndarray)
            value = float(array[-1])
            del array
            release(message)
        else:
            value = float(message[-1])
        outbox.put(value)


def bench_worker(nbytes: int, repeat: int) -> None:
    print(f"\n## {fmt_size(nbytes)} float32 to an already-running worker (to its reply)")
    context = mp.get_context("spawn")
    inbox: Queue[Any] = context.Queue()
    outbox: Queue[float] = context.Queue()
    process = context.Process(target=worker, args=(inbox, outbox))
    process.start()
    array = np.arange(nbytes // 4, dtype=np.float32)
    try:

        def send(message: object) -> None:
            inbox.put(message)
            assert outbox.get(timeout=300) == float(array[-1])

        send(write(array))  # warm up: the worker's imports, the first block
        send(array)
        ours = median_time(lambda: send(write(array)), repeat, collect)
        baseline = median_time(lambda: send(array), repeat, collect)
    finally:
        inbox.put(None)
        process.join(60)
    print("| transfer                       |       time | speedup |")
    print("|--------------------------------|------------|---------|")
    print(f"| the array through the Queue    | {fmt_time(baseline)} |   1.00× |")
    print(f"| a token through the same Queue | {fmt_time(ours)} | {baseline / ours:6.2f}× |")
    _codec._writer.drop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="arrays / 16, few repeats")
    parser.add_argument("--skip-1gb", action="store_true", help="leave out the 1 GB rows")
    args = parser.parse_args()
    scale = 16 if args.quick else 1
    repeat = 3 if args.quick else 7
    print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"{platform.platform()}, {mp.cpu_count()} CPUs")
    random_bytes = np.random.default_rng(0).bytes
    cases: list[tuple[str, str, object]] = [
        ("bytes", "10 KB", random_bytes(10 * KB)),
        ("bytes", "10 MB", random_bytes(10 * MB)),
    ]
    for nbytes in (100 * MB, 1000 * MB)[: 1 if args.skip_1gb else 2]:
        size = fmt_size(nbytes // scale)
        cases.append(("numpy float32", size, np.ones(nbytes // scale // 4, np.float32)))
    bench_round_trips(cases, repeat)
    bench_worker(100 * MB // scale, repeat)


if __name__ == "__main__":
    main()
