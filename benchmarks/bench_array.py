"""SharedArray benchmark: attach + as_array is O(1); copy() against numpy.copy.

Prints two tables:

1. ``SharedArray.attach(name).as_array()`` for 1 MiB, 100 MiB and 1 GiB blocks:
   per call in a loop (warm caches) and isolated (after ``gc.collect()``, cold
   caches), the minor page faults each attach takes, and reading the whole array
   once through the attached view (the faults move there).
2. Putting a 1 GiB array into memory another process can use: ``SharedArray.copy``
   against ``numpy.copy`` (private memory, the floor), the standard library's
   ``SharedMemory`` + ``numpy`` copy, and ``pickle.dumps`` + ``pickle.loads``
   (what a ``multiprocessing.Queue`` does to the array), all in the same run.

Run: python benchmarks/bench_array.py [--quick]   (--quick: 1/16 of the sizes)
"""

from __future__ import annotations

import argparse
import gc
import pickle
import resource
import statistics
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np
from _timing import fmt_time
from numpy.typing import NDArray

from shared_memory_array import SharedArray

MiB = 1 << 20


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


def bench_attach(sizes: list[int]) -> None:
    print("\n## attach(name) + as_array() + close(): O(1) whatever the size")
    print("(loop: median per call over batches of 100; isolated: one call after gc.collect()")
    print(" with cold caches; faults: minor page faults per isolated call)")
    header = (
        f"{'size':>10} | {'loop':>10} | {'isolated':>10} | {'faults':>6} | {'first full read':>15}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        with SharedArray.allocate(None, size // 8, "float64") as owner:
            owner.as_array()[:] = 1.0

            def attach(name: str = owner.name) -> Any:
                client = SharedArray.attach(name)
                view = client.as_array()
                client.close()
                return view

            def attach_100() -> None:
                for _ in range(100):
                    attach()

            loop_s = timed(attach_100, repeat=20)[0] / 100
            isolated_s, faults = timed(attach, repeat=200)

            def attach_and_read(name: str = owner.name) -> float:
                client = SharedArray.attach(name)
                total = float(client.as_array().sum())
                client.close()
                return total

            read_s, _ = timed(attach_and_read, repeat=3)
        label = f"{size // MiB} MiB"
        print(
            f"{label:>10} | {fmt_time(loop_s):>10} | {fmt_time(isolated_s):>10} | "
            f"{faults:6.0f} | {fmt_time(read_s):>15}"
        )


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


def bench_copy(size: int) -> None:
    source = np.ones(size // 4, dtype=np.float32)
    rows: list[tuple[str, float, float]] = []
    for label, fn, repeat in [
        ("numpy.copy (private memory)", lambda: np.copy(source), 5),
        ("SharedArray.copy", lambda: shared_copy(source), 5),
        ("stdlib SharedMemory + copy", lambda: stdlib_copy(source), 5),
        ("pickle.dumps + loads", lambda: pickle.loads(pickle.dumps(source, protocol=5)), 3),
    ]:
        seconds, faults = timed(fn, repeat)
        rows.append((label, seconds, faults))
    ours = rows[1][1]
    print(f"\n## putting a {size // MiB} MiB float32 array in memory (median)")
    print(f"{'method':>28} | {'time':>11} | {'faults':>8} | {'SharedArray.copy is':>20}")
    print(f"{'-' * 28}-|-{'-' * 11}-|-{'-' * 8}-|-{'-' * 20}")
    for label, seconds, faults in rows:
        ratio = f"{seconds / ours:.2f}x as fast" if label != "SharedArray.copy" else "-"
        print(f"{label:>28} | {fmt_time(seconds):>11} | {faults:8.0f} | {ratio:>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/16 of the sizes")
    quick = parser.parse_args().quick
    scale = 16 if quick else 1
    print(f"SharedArray benchmark{' (quick)' if quick else ''}, numpy {np.__version__}")
    bench_attach([MiB, 100 * MiB // scale, 1024 * MiB // scale])
    bench_copy(1024 * MiB // scale)


if __name__ == "__main__":
    main()
