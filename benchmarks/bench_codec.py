"""Codec benchmark: ``write`` + ``read`` + ``release`` against ``pickle.loads(pickle.dumps())``.

Prints two tables, the competitor measured in the same run:

1. Single-process round trip for bytes 10 KiB and 10 MiB, float32 100 MiB and
   1 GiB, each in steady state (repeated: the codec reuses its released block,
   already faulted in) and cold (first transfer: the codec creates a new block;
   pickle first gives its freed memory back to the system with
   ``malloc_trim``, so it faults fresh pages as a first transfer does).
2. 100 MiB sent to an already-running worker process: the token through a
   ``multiprocessing.Queue`` (the worker reads, looks at one element, releases)
   against the array itself through the same queue; each timed to the worker's
   reply.

``read`` returns views: the data is not copied out of shared memory, and the
reader's first touch of each page costs a minor fault (not part of these rows).

Run: python benchmarks/bench_codec.py [--quick] [--skip-1gb]
(--quick: arrays / 16, few repeats; --skip-1gb: leave out the 1 GiB rows)
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
from _timing import KiB, MiB, Table, fmt_size, fmt_time, ratio

from shared_memory_array import _codec, read, release, write

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


def pickle_round_trip(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, protocol=5))


def codec_round_trip(obj: object) -> object:
    token = write(obj)
    result = read(token)
    release(token)
    return result


def bench_round_trips(cases: list[tuple[str, int, object]], repeat: int) -> None:
    table = Table(
        "round trip in one process: write + read + release against pickle.loads(pickle.dumps())",
        ["object", "size", "state", "pickle", "ours (codec)", "compared with pickle"],
        text_columns=3,
    )
    for label, nbytes, obj in cases:
        number = 2000 if nbytes < MiB else 1
        ours_fn = functools.partial(codec_round_trip, obj)
        pickle_fn = functools.partial(pickle_round_trip, obj)
        # Steady state: warm up once, then repeat (the codec reuses its released block).
        ours_fn()
        ours = median_time(ours_fn, repeat, collect, number)
        pickle_fn()
        baseline = median_time(pickle_fn, repeat, collect, number)
        size = fmt_size(nbytes)
        table.add(label, size, "steady", fmt_time(baseline), fmt_time(ours), ratio(ours, baseline))
        # Cold: no block to reuse (the codec's pool emptied); pickle's heap trimmed.
        ours = median_time(ours_fn, max(3, repeat // 2), _codec.writer.drop_all)
        baseline = median_time(pickle_fn, max(3, repeat // 2), trim_heap)
        table.add(label, size, "cold", fmt_time(baseline), fmt_time(ours), ratio(ours, baseline))
        _codec.writer.drop_all()
    table.note(
        "steady: the transfer repeated (the codec reuses its released block); cold: a first "
        "transfer (new block; pickle's freed heap given back to the system first)."
    )
    table.print()


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
    table = Table(
        f"{fmt_size(nbytes)} float32 to an already-running worker (timed to its reply)",
        ["transfer", "time", "compared with the array through the Queue"],
    )
    table.add("the array through a multiprocessing.Queue", fmt_time(baseline), "-")
    table.add("a token through the same Queue (ours)", fmt_time(ours), ratio(ours, baseline))
    table.print()
    _codec.writer.drop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="arrays / 16, few repeats")
    parser.add_argument("--skip-1gb", action="store_true", help="leave out the 1 GiB rows")
    args = parser.parse_args()
    scale = 16 if args.quick else 1
    repeat = 3 if args.quick else 7
    print(f"# Codec benchmark{' (quick)' if args.quick else ''}: Python "
          f"{platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{platform.platform()}, {mp.cpu_count()} CPUs")  # fmt: skip
    random_bytes = np.random.default_rng(0).bytes
    cases: list[tuple[str, int, object]] = [
        ("bytes", 10 * KiB, random_bytes(10 * KiB)),
        ("bytes", 10 * MiB, random_bytes(10 * MiB)),
    ]
    for nbytes in (100 * MiB, 1024 * MiB)[: 1 if args.skip_1gb else 2]:
        cases.append(("numpy float32", nbytes // scale, np.ones(nbytes // scale // 4, np.float32)))
    bench_round_trips(cases, repeat)
    bench_worker(100 * MiB // scale, repeat)


if __name__ == "__main__":
    main()
