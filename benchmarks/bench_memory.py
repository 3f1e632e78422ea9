"""Memory beside time: the peak memory a transfer costs the whole process tree.

Two cases, each with its peers:

1. **Broadcast**: one 400 MB float32 array to N workers (default 4) that each
   compute its sum, all holding it at once (a barrier; Dask and Ray keep their
   copies anyway): ours as ``SharedData`` and as a ``SharedArray`` handle,
   against pickling it to each worker through a ``multiprocessing`` Pool
   (``spawn``), Dask's ``client.scatter(..., broadcast=True)`` and Ray's
   ``ray.put`` when they are installed (skipped otherwise).
2. **Worker results**: N workers each return a 100 MB array: ours (each
   worker returns a ``SharedArray``) against returning ndarrays through the
   Pool. The caller holds every result at the peak.

What is measured
----------------
A thread of this process samples the tree (this process and every
descendant) every ~20 ms: the sum of ``Pss - Pss_Shmem`` from each
``/proc/PID/smaps_rollup`` (private and file memory, shared pages divided
among their sharers) plus the allocated bytes of every /dev/shm file the tree
holds open or mapped, each file once. Shared memory is counted by the
file, not through ``Pss_Shmem``: a 400 MB block mapped by five processes is
400 MB once, and blocks held but not mapped count too. The /dev/shm files of
other processes on the machine are not counted; the ``/dev/shm after`` column
is ``statvfs`` after the case minus before it (machine-wide: a leak shows
there, and so do other people's blocks).

``extra`` is the peak minus the baseline taken once workers run (imports done)
and the caller holds its data (broadcast) or before any result exists
(results): what the transfer costs on top. The goal for ours: at most 1.1x
the data size, whatever the number of workers.

The figures are noisy on a shared machine; run it alone for publishable ones.

Run: python benchmarks/bench_memory.py [--quick] [--workers N] [--skip-peers]
(--quick: 40 MB broadcast and 10 MB results; --skip-peers: leave out Dask and Ray)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import logging
import multiprocessing as mp
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np

from shared_memory_array import SharedArray, SharedData

MB = 1000 * 1000
SAMPLE_SECONDS = 0.02
TIMEOUT = 300
SHM_DIR = "/dev/shm"


# -- sampling the process tree -------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/PID/task/*/children``)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                found.extend(int(child) for child in file.read().split())
        except OSError:
            continue
    return found


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        queue.extend(_children(pid))
    return pids


def _private_pss(pid: int) -> int:
    """Bytes of ``Pss - Pss_Shmem`` of process ``pid`` (0 once it is gone)."""
    pss = shmem = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Pss_Shmem:"):
                    shmem = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return pss - shmem


def _shm_files(pid: int, seen: dict[tuple[int, int], int]) -> None:
    """Add the /dev/shm files ``pid`` holds open or mapped to ``seen`` (inode -> bytes)."""
    paths = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(SHM_DIR + "/"):
                    paths.append(f"/proc/{pid}/fd/{fd}")
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as file:
        for line in file:
            if SHM_DIR + "/" in line:
                paths.append(f"/proc/{pid}/map_files/{line.split(None, 1)[0]}")
    for path in paths:
        with contextlib.suppress(OSError):
            info = os.stat(path)  # follows the link: works for unlinked files too
            seen[(info.st_dev, info.st_ino)] = info.st_blocks * 512


def tree_memory(root: int) -> int:
    """Private PSS of the tree plus its /dev/shm files, each counted once (bytes)."""
    pids = tree(root)
    files: dict[tuple[int, int], int] = {}
    total = 0
    for pid in pids:
        total += _private_pss(pid)
        _shm_files(pid, files)
    return total + sum(files.values())


def shm_used() -> int:
    """Bytes in use in /dev/shm, machine-wide (``statvfs``)."""
    fs = os.statvfs(SHM_DIR)
    return (fs.f_blocks - fs.f_bfree) * fs.f_frsize


class Sampler:
    """Samples :func:`tree_memory` of this process every ~20 ms in a thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peak = 0
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        pid = os.getpid()
        while not self._stop.wait(SAMPLE_SECONDS):
            self._record(tree_memory(pid))

    def _record(self, value: int) -> None:
        with self._lock:
            self._peak = max(self._peak, value)

    def baseline(self) -> int:
        """Sample now and restart the peak from here; return the sample."""
        gc.collect()
        time.sleep(0.2)  # let exited helpers and freed pages settle
        value = tree_memory(os.getpid())
        with self._lock:
            self._peak = value
        return value

    def peak(self) -> int:
        """The largest sample since :meth:`baseline` (with one more taken now)."""
        self._record(tree_memory(os.getpid()))
        with self._lock:
            return self._peak


@dataclass
class Row:
    case: str
    method: str
    data: int
    extra: int | None  # None: skipped
    shm_left: int = 0
    note: str = ""
    ours: bool = False


# -- worker functions (module level: spawn children import them) --------------------

_barrier: Barrier | None = None


def _init_worker(barrier: Barrier) -> None:
    global _barrier
    _barrier = barrier


def _all_hold_it() -> None:
    """Wait until every worker holds its data (the peak of a broadcast)."""
    if _barrier is not None:
        _barrier.wait(TIMEOUT)


def sum_array(array: np.ndarray[Any, Any]) -> float:
    value = float(array.sum(dtype=np.float64))
    _all_hold_it()
    return value


def sum_shared_data(name: str) -> float:
    value = float(SharedData.load(name).sum(dtype=np.float64))
    _all_hold_it()
    return value


def sum_shared_array(handle: SharedArray) -> float:
    value = float(handle.as_array().sum(dtype=np.float64))
    _all_hold_it()
    handle.close()
    return value


def make_array(args: tuple[int, int]) -> np.ndarray[Any, Any]:
    index, items = args
    return np.full(items, float(index), np.float32)


def make_shared_array(args: tuple[int, int]) -> SharedArray:
    index, items = args
    handle: SharedArray = SharedArray.allocate(None, items, np.float32)
    handle.as_array()[:] = float(index)
    return handle


def _warm(_: int) -> int:
    time.sleep(0.3)  # long enough that every worker takes one
    return os.getpid()


# -- the cases -----------------------------------------------------------------------


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    context = mp.get_context("spawn")
    barrier = context.Barrier(workers)
    with context.Pool(workers, initializer=_init_worker, initargs=(barrier,)) as pool:
        pool.map(_warm, range(workers), chunksize=1)  # every worker started, numpy imported
        yield pool


def _measure(
    sampler: Sampler,
    case: str,
    method: str,
    data: int,
    setup: Callable[[], contextlib.AbstractContextManager[Callable[[], object]]],
    *,
    ours: bool = False,
) -> Row:
    """Enter ``setup`` (workers, data), take the baseline, run its transfer, read the peak."""
    shm_before = shm_used()
    with setup() as transfer:
        sampler.baseline()
        base = sampler.peak()
        result = transfer()
        extra = sampler.peak() - base
        del result
    gc.collect()
    time.sleep(0.3)
    return Row(case, method, data, extra, shm_used() - shm_before, ours=ours)


def broadcast_rows(sampler: Sampler, nbytes: int, workers: int, peers: bool) -> list[Row]:
    items = nbytes // 4
    case = f"broadcast to {workers}"
    rows = []
    expected = float(items) * workers

    @contextlib.contextmanager
    def pickled() -> Iterator[Callable[[], object]]:
        with _pool(workers) as pool:
            source = np.ones(items, np.float32)
            yield lambda: _check(pool.map(sum_array, [source] * workers, chunksize=1), expected)

    @contextlib.contextmanager
    def shared_data() -> Iterator[Callable[[], object]]:
        with _pool(workers) as pool:
            source = np.ones(items, np.float32)

            def transfer() -> object:
                with SharedData(source) as shared:
                    names = [shared.name] * workers
                    return _check(pool.map(sum_shared_data, names, chunksize=1), expected)

            yield transfer

    @contextlib.contextmanager
    def shared_array() -> Iterator[Callable[[], object]]:
        with _pool(workers) as pool:
            source = np.ones(items, np.float32)

            def transfer() -> object:
                with SharedArray.copy(None, source) as handle:
                    handles = [handle] * workers
                    return _check(pool.map(sum_shared_array, handles, chunksize=1), expected)

            yield transfer

    rows.append(_measure(sampler, case, "ours: SharedData", nbytes, shared_data, ours=True))
    rows.append(_measure(sampler, case, "ours: SharedArray", nbytes, shared_array, ours=True))
    rows.append(_measure(sampler, case, "pickle via Pool", nbytes, pickled))
    for method, available, setup in (
        ("Dask scatter(broadcast=True)", _have("distributed"), _dask_broadcast),
        ("Ray put", _have("ray"), _ray_broadcast),
    ):
        if not peers:
            continue
        if not available:
            rows.append(Row(case, method, nbytes, None, note="not installed"))
            continue
        rows.append(
            _measure(
                sampler, case, method, nbytes, functools.partial(setup, items, workers, expected)
            )
        )
    return rows


def results_rows(sampler: Sampler, nbytes: int, workers: int) -> list[Row]:
    items = nbytes // 4
    case = f"{workers} results"
    tasks = [(index, items) for index in range(workers)]
    expected = float(items) * sum(range(workers))

    @contextlib.contextmanager
    def arrays() -> Iterator[Callable[[], object]]:
        with _pool(workers) as pool:

            def transfer() -> object:
                results = pool.map(make_array, tasks, chunksize=1)
                return _check([float(r.sum(dtype=np.float64)) for r in results], expected)

            yield transfer

    @contextlib.contextmanager
    def shared() -> Iterator[Callable[[], object]]:
        with _pool(workers) as pool:

            def transfer() -> object:
                handles = pool.map(make_shared_array, tasks, chunksize=1)
                sums = [float(h.as_array().sum(dtype=np.float64)) for h in handles]
                for handle in handles:
                    handle.close()
                return _check(sums, expected)

            yield transfer

    total = nbytes * workers
    return [
        _measure(sampler, case, "ours: SharedArray results", total, shared, ours=True),
        _measure(sampler, case, "ndarrays via Pool", total, arrays),
    ]


def _check(sums: list[float], expected: float) -> list[float]:
    if sum(sums) != expected:
        raise AssertionError(f"workers computed {sum(sums)}, expected {expected}")
    return sums


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _dask_total(array: np.ndarray[Any, Any]) -> float:
    return float(array.sum(dtype=np.float64))


@contextlib.contextmanager
def _dask_broadcast(items: int, workers: int, expected: float) -> Iterator[Callable[[], object]]:
    # Imported by name: an optional peer, typed Any (it may be absent where mypy runs).
    distributed = importlib.import_module("distributed")
    with (
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(workers, timeout=TIMEOUT)
        addresses = list(client.scheduler_info()["workers"])
        source = np.ones(items, np.float32)

        def transfer() -> object:
            future = client.scatter(source, broadcast=True)
            sums = client.gather(
                [
                    client.submit(_dask_total, future, workers=[address], pure=False)
                    for address in addresses
                ]
            )
            return _check(sums, expected), future

        yield transfer


@contextlib.contextmanager
def _ray_broadcast(items: int, workers: int, expected: float) -> Iterator[Callable[[], object]]:
    ray = importlib.import_module("ray")  # an optional peer, typed Any
    ray.init(
        address="local",  # a Ray of its own, never a cluster already running
        num_cpus=workers,
        object_store_memory=max(100 * MB, 3 * items * 4),
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        total = ray.remote(_dask_total)
        warm = ray.remote(_warm)
        ray.get([warm.remote(index) for index in range(workers)])  # start every worker
        source = np.ones(items, np.float32)

        def transfer() -> object:
            ref = ray.put(source)
            sums = ray.get([total.remote(ref) for _ in range(workers)])
            return _check(sums, expected), ref

        yield transfer
    finally:
        ray.shutdown()


# -- the report ----------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    print("\n| case | method | data | extra peak (PSS + /dev/shm) | × data | /dev/shm after |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if row.extra is None:
            print(f"| {row.case} | {row.method} | {row.data / MB:.0f} MB | {row.note} | | |")
            continue
        print(
            f"| {row.case} | {row.method} | {row.data / MB:.0f} MB | {row.extra / MB:+.0f} MB "
            f"| {row.extra / row.data:.2f}× | {row.shm_left / MB:+.0f} MB |"
        )
    print()
    for case in dict.fromkeys(row.case for row in rows):
        measured = [row for row in rows if row.case == case and row.extra is not None]
        ours = [row for row in measured if row.ours]
        if not ours:
            continue
        worst = max(ours, key=lambda row: row.extra or 0)
        for row in measured:
            if not row.ours and row.extra is not None and worst.extra:
                print(
                    f"{case}: ours ({worst.method.removeprefix('ours: ')}, the larger of ours) "
                    f"is {row.extra / worst.extra:.1f}× less memory than {row.method}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 MB broadcast, 10 MB results")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--skip-peers", action="store_true", help="leave out Dask and Ray")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    print(
        f"# Memory benchmark{' (quick)' if args.quick else ''}: Python "
        f"{platform.python_version()}, numpy {np.__version__}"
    )
    print(f"{platform.platform()}, {os.cpu_count()} CPUs")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rows = []
    with Sampler() as sampler:
        rows += broadcast_rows(sampler, 400 * MB // scale, args.workers, not args.skip_peers)
        rows += results_rows(sampler, 100 * MB // scale, args.workers)
    print_table(rows)


if __name__ == "__main__":
    main()
