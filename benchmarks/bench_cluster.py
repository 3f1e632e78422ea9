"""Engine benchmark: our handles through Dask and Ray against the engines' own data paths.

Each row sends one float64 array to a task that reads one element per page
(so every page is touched, as real work would) and waits for the result; the
competitor runs in the same process, on the same cluster, right before or
after. Rows (median of the repeats):

Dask, ``LocalCluster(processes=True, n_workers=1, threads_per_worker=1)``:
  * ``scatter + task``: ``client.scatter(array)`` then the task on the future;
  * ``copy + task``: ``SharedArray.copy(array)`` then the task on the handle
    (by handle: the worker attaches);
  * ``task``: the task on a handle whose data already lives in shared memory;
  * far worker (own tmpfs on /dev/shm, only as root with ``unshare -m``): the
    scatter to it against our handle, which goes by value.

Ray, ``ray.init(num_cpus=2)``:
  * ``put + task``: ``ray.put(array)`` then the task on the reference;
  * ``copy + task`` and ``task``: as above, our handle by handle.

Run: python benchmarks/bench_cluster.py [--quick] [--skip-1gb] [--no-ray] [--no-dask]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _timing import fmt_time

from shared_memory_array import SharedArray

TIMEOUT = 600


def touch(x: Any) -> float:
    """The task: read one float64 per 4 KiB page."""
    array = x.as_array() if isinstance(x, SharedArray) else np.asarray(x)
    return float(array.reshape(-1)[::512].sum())


def median_time(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


Row = tuple[str, str, float, float]  # what, size, competitor seconds, ours seconds


def bench_dask(sizes: list[int], repeats: int, rows: list[Row]) -> None:
    importlib.import_module("shared_memory_array.dask")
    distributed: Any = importlib.import_module("distributed")
    with (
        distributed.LocalCluster(
            processes=True, n_workers=1, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        (local,) = client.scheduler_info()["workers"]
        far, far_process = _start_far_worker(client)
        try:
            for nbytes in sizes:
                array = np.ones(nbytes // 8)
                label = _label(nbytes)
                expected = touch(array)

                def scatter(worker: str, array: Any = array, expected: float = expected) -> None:
                    future = client.scatter(array, workers=[worker], direct=True)
                    assert client.submit(touch, future, pure=False).result(TIMEOUT) == expected
                    del future

                def ours(worker: str, array: Any = array, expected: float = expected) -> None:
                    with SharedArray.copy(None, array) as handle:
                        result = client.submit(touch, handle, workers=[worker], pure=False)
                        assert result.result(TIMEOUT) == expected

                with SharedArray.copy(None, array) as handle:

                    def task_only(worker: str, handle: Any = handle, e: float = expected) -> None:
                        result = client.submit(touch, handle, workers=[worker], pure=False)
                        assert result.result(TIMEOUT) == e

                    base = median_time(lambda: scatter(local), repeats)
                    rows.append(
                        (
                            "Dask: scatter+task vs copy+task",
                            label,
                            base,
                            median_time(lambda: ours(local), repeats),
                        )
                    )
                    rows.append(
                        (
                            "Dask: scatter+task vs task (data in shm)",
                            label,
                            base,
                            median_time(lambda: task_only(local), repeats),
                        )
                    )
                    if far is not None:
                        rows.append(
                            (
                                "Dask far worker: scatter+task vs handle by value",
                                label,
                                median_time(lambda: scatter(far), repeats),
                                median_time(lambda: task_only(far), repeats),
                            )
                        )
                del array
        finally:
            if far_process is not None:
                far_process.terminate()
                far_process.wait(timeout=60)


def _start_far_worker(client: Any) -> tuple[str | None, subprocess.Popen[bytes] | None]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("(no far worker: needs root and unshare)")
        return None, None
    here = os.path.dirname(os.path.abspath(__file__))
    command = (
        "mount -t tmpfs -o size=4g tmpfs /dev/shm && exec "
        f"{sys.executable} -m distributed.cli.dask_worker {client.scheduler.address} "
        "--nthreads 1 --no-nanny --no-dashboard --name far --preload shared_memory_array.dask"
    )
    process = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        for address, worker in client.scheduler_info()["workers"].items():
            if worker.get("name") == "far":
                return address, process
        time.sleep(0.1)
    process.terminate()
    print("(no far worker: it did not start)")
    return None, None


def bench_ray(sizes: list[int], repeats: int, rows: list[Row]) -> None:
    ray: Any = importlib.import_module("ray")
    sma_ray: Any = importlib.import_module("shared_memory_array.ray")
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(
        address="local",  # a Ray of its own, never a cluster already running
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=sma_ray.runtime_env({"env_vars": {"PYTHONPATH": here}}),
    )
    sma_ray.install()
    try:
        task = ray.remote(touch)
        for nbytes in sizes:
            array = np.ones(nbytes // 8)
            label = _label(nbytes)
            expected = touch(array)

            def put(array: Any = array, expected: float = expected) -> None:
                ref = ray.put(array)
                assert ray.get(task.remote(ref), timeout=TIMEOUT) == expected
                del ref

            def ours(array: Any = array, expected: float = expected) -> None:
                with SharedArray.copy(None, array) as handle:
                    assert ray.get(task.remote(handle), timeout=TIMEOUT) == expected

            with SharedArray.copy(None, array) as handle:

                def task_only(handle: Any = handle, expected: float = expected) -> None:
                    assert ray.get(task.remote(handle), timeout=TIMEOUT) == expected

                median_time(lambda: ray.get(task.remote(1.0)), 1)  # warm a worker
                base = median_time(put, repeats)
                rows.append(("Ray: put+task vs copy+task", label, base, median_time(ours, repeats)))
                rows.append(
                    (
                        "Ray: put+task vs task (data in shm)",
                        label,
                        base,
                        median_time(task_only, repeats),
                    )
                )
            del array
    finally:
        ray.shutdown()


def _label(nbytes: int) -> str:
    return f"{nbytes / 1e9:g} GB" if nbytes >= 10**9 else f"{nbytes / 1e6:g} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 MB only, 2 repeats")
    parser.add_argument("--skip-1gb", action="store_true", help="leave out the 1 GB rows")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    sizes = [10**7] if args.quick else [10**8] + ([] if args.skip_1gb else [10**9])
    repeats = 2 if args.quick else 5
    print(f"# Cluster benchmark{' (quick)' if args.quick else ''}")
    rows: list[Row] = []
    missing: list[str] = []  # engines not installed: "Dask", "Ray"
    if not args.no_dask:
        if importlib.util.find_spec("distributed") is None:
            missing.append("Dask")
        else:
            bench_dask(sizes, repeats, rows)
    if not args.no_ray:
        if importlib.util.find_spec("ray") is None:
            missing.append("Ray")
        else:
            bench_ray(sizes, repeats, rows)
    if not rows:
        extras = ",".join(engine.lower() for engine in missing)
        why = (
            f"{' and '.join(missing)} not installed: pip install '.[{extras}]'"
            if missing
            else "--no-dask --no-ray"
        )
        print(f"skipped, no engine to measure ({why})")
        return
    for engine in missing:
        print(f"{engine} (pip install '.[{engine.lower()}]'): not installed, its rows left out")
    print(
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs; median of {repeats}"
    )
    print(f"{'competitor vs ours':50} {'size':>7} {'competitor':>11} {'ours':>11} {'ratio':>7}")
    for what, label, base, ours in rows:
        print(f"{what:50} {label:>7} {fmt_time(base):>11} {fmt_time(ours):>11} {base / ours:6.1f}×")


if __name__ == "__main__":
    main()
