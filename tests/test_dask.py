"""The Dask adapter against a real Dask cluster: by handle on our /dev/shm, by value elsewhere.

One ``LocalCluster(processes=True, n_workers=2, threads_per_worker=1)`` per module,
plus, where this process may (root, ``unshare -m`` works), one *far* worker
started in a private mount namespace with its own tmpfs on /dev/shm: to a
handle, exactly what a worker on another host is.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import needs_private_shm, private_shm_command, run_in_private_shm

from shared_memory_array import BlockNotFoundError, SharedArray, SharedDict, read, write
from shared_memory_array._identity import shm_identity

# Typed as Any: dask is an optional dependency, absent where the dev extra alone runs mypy.
distributed = pytest.importorskip(
    "distributed", reason="the dask extra is not installed (pip install '.[dask]')"
)
dask = pytest.importorskip("dask")
pytest.importorskip("distributed.spill")
pytest.importorskip("dask.sizeof")
sma_dask = pytest.importorskip("shared_memory_array.dask")


TIMEOUT = 60


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, list[str]]]:
    """A process LocalCluster (scheduler in this process) and a client; yields the local workers."""
    with (
        distributed.LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
        ) as lc,
        distributed.Client(lc, timeout=TIMEOUT) as client,
    ):
        workers = sorted(client.scheduler_info()["workers"])
        yield client, workers


@pytest.fixture(scope="module")
def far(cluster: tuple[Any, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Address of a worker whose /dev/shm is a private tmpfs (skipped where impossible)."""
    needs_private_shm()
    client, _ = cluster
    scheduler = client.scheduler.address
    command = private_shm_command(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            scheduler,
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--name",
            "far",
            "--preload",
            "shared_memory_array.dask",
        ],
        size="2g",
    )
    log = tmp_path_factory.mktemp("far") / "worker.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            # the task bodies are this module's functions, pickled by reference
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        address = None
        while address is None:
            workers = client.scheduler_info()["workers"]
            address = next((a for a, w in workers.items() if w.get("name") == "far"), None)
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"the far worker did not register: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)


# -- task bodies (run in the workers) -------------------------------------------------------


def _where(handle: Any) -> tuple[str, str, bool, float]:
    """Name, the worker's shm identity, ownership and the sum of what the task received."""
    array = handle.as_array()
    return handle.name, shm_identity(), bool(handle.owner), float(array.sum())


def _fill(handle: SharedArray, value: float) -> float:
    handle.as_array()[:] = value
    return float(handle.as_array().sum())


def _unpickle_and_sum(payload: bytes) -> float:
    handle = pickle.loads(payload)
    return float(handle.as_array().sum())


def _same(handle: Any) -> Any:
    return handle


def _nested_sums(payload: dict[str, list[SharedArray]]) -> list[tuple[bool, float]]:
    return [(h.owner, float(h.as_array().sum())) for h in payload["arrays"]]


def _dict_info(d: SharedDict) -> tuple[str, dict[Any, Any]]:
    d["seen"] = True
    return d.name, dict(d.items())


def _token_sum(token: str) -> tuple[str, float]:
    return str(token), float(np.asarray(read(token)).sum())


def _total(handle: SharedArray) -> float:
    return float(handle.as_array().sum())


def _make(n: int) -> SharedArray:
    return SharedArray.copy(None, np.arange(n, dtype=np.float64))


# -- identity ----------------------------------------------------------------------------


def test_identity_is_stable_and_shared_with_workers(cluster: tuple[Any, list[str]]) -> None:
    """Workers on the same /dev/shm report the caller's shm identity, a stable 16-hex string."""
    client, workers = cluster
    ours = shm_identity()
    assert len(ours) == 16
    int(ours, 16)
    assert shm_identity() == ours
    assert client.run(shm_identity, workers=workers) == dict.fromkeys(workers, ours)


def test_identity_differs_behind_a_private_tmpfs_and_not_in_a_child() -> None:
    """A child process shares the identity; one with its own tmpfs on /dev/shm does not."""
    code = "from shared_memory_array._identity import shm_identity; print(shm_identity())"
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert child.stdout.strip() == shm_identity()
    private = run_in_private_shm([sys.executable, "-c", code], timeout=TIMEOUT, check=True)
    assert len(private.stdout.strip()) == 16
    assert private.stdout.strip() != shm_identity()


def test_identity_cache_is_per_process() -> None:
    """A forked child computes its identity afresh (it may be in another mount namespace)."""
    from shared_memory_array import _identity

    shm_identity()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write_end, b"empty" if not _identity._cached else b"inherited")
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"empty"
    assert shm_identity() == _identity._compute()


def test_far_worker_has_another_identity(cluster: tuple[Any, list[str]], far: str) -> None:
    """A worker with a private tmpfs on /dev/shm has another shm identity."""
    client, _ = cluster
    assert client.run(shm_identity, workers=[far])[far] != shm_identity()


# -- same /dev/shm: by handle ------------------------------------------------------------------


def test_handle_goes_by_handle_and_writes_are_seen(cluster: tuple[Any, list[str]]) -> None:
    """A task on a worker that sees our /dev/shm attaches the same block: its writes reach us."""
    client, workers = cluster
    with SharedArray.copy(None, np.zeros(1000)) as handle:
        for worker in workers:
            name, identity, owner, _ = client.submit(
                _where, handle, workers=[worker], pure=False
            ).result(TIMEOUT)
            assert (name, identity, owner) == (handle.name, shm_identity(), False)
        total = client.submit(_fill, handle, 2.0, workers=[workers[0]]).result(TIMEOUT)
        assert total == 2000.0
        assert float(handle.as_array().sum()) == 2000.0


def test_worker_to_worker_transfer_by_handle(cluster: tuple[Any, list[str]]) -> None:
    """A handle held by one worker reaches another worker on the same /dev/shm by handle."""
    client, workers = cluster
    with SharedArray.copy(None, np.arange(100.0)) as handle:
        held = client.submit(_same, handle, workers=[workers[0]], pure=False)
        name, _, owner, total = client.submit(_where, held, workers=[workers[1]]).result(TIMEOUT)
        assert (name, owner, total) == (handle.name, False, 4950.0)


def test_dict_goes_by_handle(cluster: tuple[Any, list[str]]) -> None:
    """A SharedDict passed to a local worker is the same dict: the worker's insert is seen here."""
    client, workers = cluster
    name = f"dask-by-handle-{os.getpid()}"
    with SharedDict.create(name, max_items=100, heap_size=1 << 20) as d:
        d["a"] = np.arange(3)
        got_name, items = client.submit(_dict_info, d, workers=[workers[0]]).result(TIMEOUT)
        assert got_name == d.name
        assert items["seen"] is True
        assert d["seen"] is True


def test_token_goes_by_handle(cluster: tuple[Any, list[str]]) -> None:
    """A shared-memory token reaches a local worker unchanged (same block)."""
    client, workers = cluster
    token = write(np.ones(300_000))
    got, total = client.submit(_token_sum, token, workers=[workers[0]]).result(TIMEOUT)
    assert (got, total) == (str(token), 300_000.0)


# -- another /dev/shm: by value -------------------------------------------------------------


def test_handle_goes_by_value_to_far_worker(cluster: tuple[Any, list[str]], far: str) -> None:
    """The far worker gets its own owned copy with the right data; its writes stay there."""
    client, _ = cluster
    with SharedArray.copy(None, np.arange(1000.0)) as handle:
        _, identity, owner, total = client.submit(_where, handle, workers=[far], pure=False).result(
            TIMEOUT
        )
        assert (identity != shm_identity(), owner, total) == (True, True, 499500.0)
        assert client.submit(_fill, handle, 1.0, workers=[far]).result(TIMEOUT) == 1000.0
        assert float(handle.as_array().sum()) == 499500.0  # not written back


def test_nested_handles_go_by_value_to_far_worker(cluster: tuple[Any, list[str]], far: str) -> None:
    """Handles nested in a task's arguments are each sent by value to the far worker."""
    client, _ = cluster
    with (
        SharedArray.copy(None, np.ones(10)) as a,
        SharedArray.copy(None, np.full(5, 2, dtype=np.int16)) as b,
    ):
        payload = {"arrays": [a, b]}
        got = client.submit(_nested_sums, payload, workers=[far], pure=False).result(TIMEOUT)
        assert got == [(True, 10.0), (True, 10.0)]


def test_worker_to_far_worker_transfer_by_value(cluster: tuple[Any, list[str]], far: str) -> None:
    """A handle held by a local worker goes by value when the far worker fetches it."""
    client, workers = cluster
    with SharedArray.copy(None, np.arange(100.0).reshape(10, 10).T.copy(order="F")) as handle:
        held = client.submit(_same, handle, workers=[workers[0]], pure=False)
        _, identity, owner, total = client.submit(_where, held, workers=[far]).result(TIMEOUT)
        assert (identity != shm_identity(), owner, total) == (True, True, 4950.0)


def test_dict_goes_by_value_to_far_worker(cluster: tuple[Any, list[str]], far: str) -> None:
    """The far worker gets a SharedDict copy with the same items; its insert is not seen here."""
    client, _ = cluster
    with SharedDict.create(f"dask-by-value-{os.getpid()}", 100, 1 << 20) as d:
        d["a"] = np.arange(3)
        d[1] = "one"
        got_name, items = client.submit(_dict_info, d, workers=[far]).result(TIMEOUT)
        assert got_name != d.name
        assert items["a"].tolist() == [0, 1, 2]
        assert (items[1], items["seen"]) == ("one", True)
        assert "seen" not in d


def test_token_goes_by_value_to_far_worker(cluster: tuple[Any, list[str]], far: str) -> None:
    """The far worker reads a token of its own with the same content."""
    client, _ = cluster
    token = write(np.ones(300_000))
    got, total = client.submit(_token_sum, token, workers=[far]).result(TIMEOUT)
    assert got != str(token)
    assert total == 300_000.0


def test_pickled_handle_on_far_worker_raises_clearly(
    cluster: tuple[Any, list[str]], far: str
) -> None:
    """A handle that reaches a process without its block raises BlockNotFoundError, not a hang."""
    client, _ = cluster
    with SharedArray.copy(None, np.arange(10.0)) as handle:
        future = client.submit(_unpickle_and_sum, pickle.dumps(handle), workers=[far])
        with pytest.raises(BlockNotFoundError, match=handle.name):
            future.result(TIMEOUT)


def test_scheduler_behind_a_private_tmpfs_gets_the_graph_by_value(tmp_path: Path) -> None:
    """With a scheduler that cannot see our /dev/shm, a task still gets a correct (owned) copy."""
    needs_private_shm()
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    preload = "--preload shared_memory_array.dask"
    scheduler_command = private_shm_command(
        f"{sys.executable} -m distributed.cli.dask_scheduler --port 0 --no-dashboard "
        f"--scheduler-file {scheduler_file} {preload}".split()
    )
    worker_command = (
        f"{sys.executable} -m distributed.cli.dask_worker --scheduler-file {scheduler_file} "
        f"--nthreads 1 --no-nanny --no-dashboard {preload}"
    )
    with (tmp_path / "log").open("w") as log:
        processes = [subprocess.Popen(scheduler_command, stderr=log, env=env)]
        try:
            processes.append(subprocess.Popen(worker_command.split(), stderr=log, env=env))
            with (
                distributed.Client(scheduler_file=str(scheduler_file), timeout=TIMEOUT) as client,
                SharedArray.copy(None, np.arange(100.0)) as handle,
            ):
                client.wait_for_workers(1, timeout=TIMEOUT)
                assert client.run_on_scheduler(shm_identity) != shm_identity()
                name, identity, owner, total = client.submit(_where, handle, pure=False).result(
                    TIMEOUT
                )
                # by value to the scheduler, then by value again from its /dev/shm to ours
                assert (name != handle.name, identity, owner, total) == (
                    True,
                    shm_identity(),
                    True,
                    4950.0,
                )
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=TIMEOUT)


# -- spilling, caching, sizeof -----------------------------------------------------------


def test_spill_to_disk_goes_by_value(tmp_path: Path) -> None:
    """Dask's spill-to-disk store (no recipient) keeps the data; unspilling gives an owned copy."""
    slow = distributed.spill.Slow(str(tmp_path))
    with SharedArray.copy(None, np.arange(50_000, dtype=np.int32)) as handle:
        slow["x"] = handle
        assert sum(f.stat().st_size for f in tmp_path.iterdir()) > handle.nbytes
        back = slow["x"]
        assert isinstance(back, SharedArray)
        assert back.name != handle.name
        assert back.owner
        np.testing.assert_array_equal(back.as_array(), handle.as_array())
        back.close()


def test_outside_dask_a_handle_pickles_as_before() -> None:
    """Plain pickling (multiprocessing) still sends the name only."""
    with SharedArray.copy(None, np.zeros(100_000)) as handle:
        payload = pickle.dumps(handle)
        assert len(payload) < 1000
        assert sma_dask.sends_by_handle() is None


def test_pure_submission_is_never_stale(cluster: tuple[Any, list[str]]) -> None:
    """pure=True after the shared data changed recomputes instead of returning the cached result."""
    client, workers = cluster
    with SharedArray.copy(None, np.ones(10)) as handle:
        first = client.submit(_total, handle, pure=True, workers=[workers[0]])
        assert first.result(TIMEOUT) == 10.0
        handle.as_array()[:] = 5.0
        second = client.submit(_total, handle, pure=True, workers=[workers[0]])
        assert second.result(TIMEOUT) == 50.0
        assert dask.base.tokenize(handle) != dask.base.tokenize(handle)


def test_sizeof_counts_a_handle_as_small() -> None:
    """dask.sizeof gives a handle its own small size, not the bytes of its block."""
    with SharedArray.copy(None, np.zeros(1_000_000)) as handle:
        assert dask.sizeof.sizeof(handle) < 1000
    with SharedDict.create(f"dask-sizeof-{os.getpid()}", 10, 1 << 20) as d:
        assert dask.sizeof.sizeof(d) < 1000


def test_worker_returns_a_shared_array_it_created(cluster: tuple[Any, list[str]]) -> None:
    """20 SharedArrays created in workers and returned stay valid here, and go when closed."""
    client, workers = cluster
    futures = client.map(_make, [1000 + i for i in range(20)], workers=workers[:2], pure=False)
    results = client.gather(futures)
    del futures
    for index, result in enumerate(results):
        n = 1000 + index
        assert float(result.as_array().sum()) == n * (n - 1) / 2
    names = [result.name for result in results]
    for result in results:
        result.close()

    def left() -> list[str]:
        return [name for name in names if os.path.exists(os.path.join("/dev/shm", name))]

    # The workers drop their own handles when the scheduler tells them the futures are
    # gone (asynchronously): the last holder to let go unlinks each block.
    deadline = time.monotonic() + TIMEOUT
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left()
