"""SharedArray benchmark: attach + as_array is O(1); copy() against numpy.copy.

Prints two tables:

1. ``SharedArray.attach(name).as_array()`` for 1 MiB, 100 MiB and 1 GiB blocks, on both
   paths of the library (its C accelerator, and pure Python with
   ``SHARED_MEMORY_ARRAY_PURE=1``), each in a process of its own alternating with the
   stdlib's attach: per call in a loop (warm caches) and isolated (after ``gc.collect()``,
   cold caches), the minor page faults each attach takes, and reading the whole array
   once through the attached view (the faults move there).
2. Putting a 1 GiB array into memory another process can use: ``SharedArray.copy``
   against ``numpy.copy`` (private memory, the floor), the standard library's
   ``SharedMemory`` + ``numpy`` copy, ``pickle.dumps`` + ``pickle.loads``
   (what a ``multiprocessing.Queue`` does to the array) and, when installed (the
   ``bench`` extra), ``joblib.dump`` + ``joblib.load(mmap_mode="r")`` into
   /dev/shm (what ``joblib.Parallel`` does with large arrays), all in the same run.

Run: python benchmarks/bench_array.py [--quick]   (--quick: 1/16 of the sizes)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np
from _timing import MiB, Table, fmt_size, fmt_time, optional, ratio
from numpy.typing import NDArray

from shared_memory_array import SharedArray, _accel

joblib = optional("joblib")  # pip install '.[bench]'
PATHS = {"C": "0", "pure": "1"}  # the value of SHARED_MEMORY_ARRAY_PURE for each


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median seconds and median minor faults of ``fn`` over ``repeat`` runs."""
    times, faults = [], []
    for _ in range(repeat):
        gc.collect()
        f0, t0 = minor_faults(), time.perf_counter()
        result = fn()
        t1, f1 = time.perf_counter(), minor_faults()
        del result
        times.append(t1 - t0)
        faults.append(f1 - f0)
    return statistics.median(times), statistics.median(faults)


def stdlib_attach(name: str, size: int) -> Any:
    """The stdlib's attach with shape and dtype known in advance (it has no header)."""
    if sys.version_info >= (3, 13):
        shm = shared_memory.SharedMemory(name=name, track=False)
    else:  # registers with the resource tracker, as every attach does before 3.13
        shm = shared_memory.SharedMemory(name=name)
    view = np.ndarray((size // 8,), "float64", buffer=shm.buf)
    del view
    shm.close()
    return None


def measure_attach(size: int) -> dict[str, float]:
    """Ours and the stdlib's attach of one block size, alternating, in this process."""
    stdlib_block = shared_memory.SharedMemory(create=True, size=size)
    with SharedArray.allocate(None, size // 8, "float64") as owner:
        owner.as_array()[:] = 1.0

        def stdlib_100(name: str = stdlib_block.name, size: int = size) -> None:
            for _ in range(100):
                stdlib_attach(name, size)

        def attach(name: str = owner.name) -> Any:
            client = SharedArray.attach(name)
            view = client.as_array()
            client.close()
            return view

        def attach_100() -> None:
            for _ in range(100):
                attach()

        ours_runs, stdlib_runs = [], []
        for _ in range(10):  # alternate, so that both see the same machine
            ours_runs.append(timed(attach_100, repeat=2)[0] / 100)
            stdlib_runs.append(timed(stdlib_100, repeat=2)[0] / 100)
        isolated_s, faults = timed(attach, repeat=200)

        def attach_and_read(name: str = owner.name) -> float:
            client = SharedArray.attach(name)
            total = float(client.as_array().sum())
            client.close()
            return total

        read_s, _ = timed(attach_and_read, repeat=3)
    stdlib_block.close()
    stdlib_block.unlink()
    return {
        "loop": statistics.median(ours_runs),
        "stdlib": statistics.median(stdlib_runs),
        "isolated": isolated_s,
        "faults": faults,
        "read": read_s,
        "native": float(_accel.native),
    }


def measure_in_process(path: str, size: int) -> dict[str, float]:
    """:func:`measure_attach` in a new process on ``path`` (its environment picks the path)."""
    env = {**os.environ, _accel.PURE_ENV: PATHS[path]}
    command = [sys.executable, __file__, "--attach", str(size)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    figures: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    return figures


def bench_attach(sizes: list[int]) -> None:
    table = Table(
        "attach(name) + as_array() + close(): O(1) whatever the size",
        [
            "block",
            "path",
            "in a loop",
            "stdlib SharedMemory, same loop",
            "compared with the stdlib",
            "isolated",
            "minor faults",
            "first full read",
        ],
        text_columns=2,
    )
    for size in sizes:
        for path in PATHS:
            figures = measure_in_process(path, size)
            shown = path if bool(figures["native"]) == (path == "C") else f"{path} (not built)"
            loop_s, stdlib_s = figures["loop"], figures["stdlib"]
            table.add(fmt_size(size), shown, fmt_time(loop_s), fmt_time(stdlib_s),
                      ratio(loop_s, stdlib_s), fmt_time(figures["isolated"]),
                      f"{figures['faults']:.0f}", fmt_time(figures["read"]))  # fmt: skip
    table.note(
        "path: C, the accelerator (shared_memory_array._native: open, fstat, trust check, "
        "lifetime lock and header read in one call); pure, SHARED_MEMORY_ARRAY_PURE=1. Each "
        "path in a process of its own. in a loop: median per call over batches of 100, "
        "alternating with the stdlib's "
        "SharedMemory(name) + np.ndarray(buffer=...) + close (shape and dtype known in "
        "advance; on Python < 3.13 that attach also registers with the resource tracker); "
        "isolated: one call after "
        "gc.collect(), cold caches; minor faults: per isolated call; first full read: "
        "attach and sum the whole array once (the page faults move there)."
    )
    table.print()


def stdlib_copy(array: NDArray[Any]) -> Any:
    shm = shared_memory.SharedMemory(create=True, size=array.nbytes)
    view = np.ndarray(array.shape, array.dtype, buffer=shm.buf)
    view[...] = array
    del view
    shm.close()
    shm.unlink()
    return None


def shared_copy(array: NDArray[Any]) -> Any:
    SharedArray.copy(None, array).close()
    return None


def joblib_copy(array: NDArray[Any]) -> Any:
    assert joblib is not None
    path = f"/dev/shm/bench_joblib_{os.getpid()}.pkl"
    try:
        joblib.dump(array, path)
        mapped = joblib.load(path, mmap_mode="r")
        del mapped
    finally:
        os.unlink(path)
    return None


def bench_copy(size: int) -> None:
    source = np.ones(size // 4, dtype=np.float32)
    ours_label = "SharedArray.copy (ours)"
    methods: list[tuple[str, Callable[[], Any], int]] = [
        (ours_label, lambda: shared_copy(source), 5),
        ("numpy.copy into private memory (not shareable)", lambda: np.copy(source), 5),
        ("stdlib SharedMemory + numpy copy", lambda: stdlib_copy(source), 5),
        ("pickle.dumps + pickle.loads (what a Queue does)",
         lambda: pickle.loads(pickle.dumps(source, protocol=5)), 3),
    ]  # fmt: skip
    if joblib is not None:
        methods.append(("joblib.dump + load(mmap_mode='r') in /dev/shm",
                        lambda: joblib_copy(source), 5))  # fmt: skip
    rows = [(label, *timed(fn, repeat)) for label, fn, repeat in methods]
    ours = rows[0][1]
    table = Table(
        f"putting a {fmt_size(size)} float32 array where other processes can use it (median)",
        ["method", "time", "minor faults", "compared with this row"],
    )
    for label, seconds, faults in rows:
        compared = "-" if label == ours_label else ratio(ours, seconds)
        table.add(label, fmt_time(seconds), f"{faults:,.0f}", compared)
    if joblib is None:
        table.note("joblib: not installed, row left out (pip install '.[bench]')")
    table.print()


def main() -> None:
    if sys.argv[1:2] == ["--attach"]:  # a process of one path (measure_in_process)
        print(json.dumps(measure_attach(int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/16 of the sizes")
    quick = parser.parse_args().quick
    scale = 16 if quick else 1
    print(f"# SharedArray benchmark{' (quick)' if quick else ''}, numpy {np.__version__}")
    bench_attach([MiB, 100 * MiB // scale, 1024 * MiB // scale])
    bench_copy(1024 * MiB // scale)


if __name__ == "__main__":
    main()
