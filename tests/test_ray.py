"""The Ray adapter against a real local Ray (one node, two CPUs): handles, tokens, dicts.

Ray is started once for the module, with the adapter's runtime environment so
that every worker process installs the serializers before running anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from shared_memory_array import BlockNotFoundError, SharedArray, SharedDict, read, write
from shared_memory_array._identity import shm_identity

# Typed as Any: ray is an optional dependency, absent where the dev extra alone runs mypy.
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
sma_ray = pytest.importorskip("shared_memory_array.ray")

TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    """A local Ray with two CPUs and the adapter installed in the driver and every worker."""
    ray.init(
        address="local",  # a new local Ray, never a cluster already running on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        # the task bodies are this module's functions, pickled by reference
        runtime_env=sma_ray.runtime_env({"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}}),
    )
    sma_ray.install()
    try:
        yield
    finally:
        ray.shutdown()


def _get(ref: Any) -> Any:
    return ray.get(ref, timeout=TIMEOUT)


def _fill(handle: SharedArray, value: float) -> tuple[str, bool, float]:
    handle.as_array()[:] = value
    return handle.name, bool(handle.owner), float(handle.as_array().sum())


def _token_sum(token: str) -> tuple[str, float]:
    return str(token), float(np.asarray(read(token)).sum())


def _dict_put(d: SharedDict, key: str, value: Any) -> str:
    d[key] = value
    return d.name


def _installed_here() -> bool:
    return bool(sma_ray._installed[0])


def _make(n: int) -> SharedArray:
    return SharedArray.copy(None, np.arange(n, dtype=np.float64))


class _Keeper:
    """An actor that keeps a SharedDict handle it was given and writes into it."""

    def __init__(self, d: SharedDict) -> None:
        self.d = d

    def put(self, key: str, value: Any) -> int:
        self.d[key] = value
        return len(self.d)

    def total(self, handle: SharedArray) -> float:
        return float(handle.as_array().sum())

    def read_sum(self, token: str) -> float:
        return float(np.asarray(read(token)).sum())


fill = ray.remote(_fill)
token_sum = ray.remote(_token_sum)
dict_put = ray.remote(_dict_put)
make = ray.remote(_make)
installed_here = ray.remote(_installed_here)
Keeper = ray.remote(_Keeper)


def test_every_worker_installs_the_adapter() -> None:
    """The setup hook from runtime_env() ran install() in the worker processes."""
    assert _get([installed_here.remote() for _ in range(4)]) == [True] * 4


def test_handle_through_a_task_by_handle() -> None:
    """A task attaches the caller's block (same name, not owner) and its writes are seen."""
    with SharedArray.copy(None, np.zeros(1000)) as handle:
        name, owner, total = _get(fill.remote(handle, 3.0))
        assert (name, owner, total) == (handle.name, False, 3000.0)
        assert float(handle.as_array().sum()) == 3000.0


def test_token_through_a_task() -> None:
    """A shared-memory token reaches a task, which reads the caller's object."""
    token = write(np.ones(300_000))
    assert _get(token_sum.remote(token)) == (str(token), 300_000.0)


def test_dict_through_a_task_and_an_actor() -> None:
    """A SharedDict reaches a task and an actor (inserts seen here); so do a handle and a token."""
    with SharedDict.create(f"ray-dict-{os.getpid()}", 100, 1 << 20) as d:
        assert _get(dict_put.remote(d, "task", 1)) == d.name
        keeper = Keeper.remote(d)
        assert _get(keeper.put.remote("actor", np.arange(3))) == 2
        assert d["task"] == 1
        assert d["actor"].tolist() == [0, 1, 2]
        with SharedArray.copy(None, np.ones(10)) as handle:
            assert _get(keeper.total.remote(handle)) == 10.0
        assert _get(keeper.read_sum.remote(write(np.ones(300_000)))) == 300_000.0
        ray.kill(keeper)


def test_by_value_through_the_object_store() -> None:
    """mode='value' puts the data in Ray's store; ray.get rebuilds an owned copy, not the block."""
    sma_ray.install(mode="value")
    try:
        with SharedArray.copy(None, np.arange(20.0).reshape(4, 5)) as handle:
            copy = _get(ray.put(handle))
            assert isinstance(copy, SharedArray)
            assert (copy.name != handle.name, copy.owner) == (True, True)
            np.testing.assert_array_equal(copy.as_array(), handle.as_array())
            copy.as_array()[:] = 0
            assert float(handle.as_array().sum()) == 190.0
            copy.close()
        with SharedDict.create(f"ray-value-{os.getpid()}", 10, 1 << 20) as d:
            d["k"] = "v"
            dict_copy = _get(ray.put(d))
            assert (dict_copy.name != d.name, dict(dict_copy.items())) == (True, {"k": "v"})
            dict_copy.close()
    finally:
        sma_ray.install()


def test_handle_from_another_shm_arrives_and_raises_at_first_use() -> None:
    """A by-handle state made behind another /dev/shm deserialises; its first use raises."""
    with SharedArray.copy(None, np.zeros(4)) as handle:
        kind, (rebuild, args) = sma_ray._serialize(handle)
        assert (kind, args[-1]) == ("handle", shm_identity())
        foreign = sma_ray._deserialize((kind, (rebuild, (*args[:-1], "0" * 16))))
        assert (foreign.name, foreign.shape) == (handle.name, (4,))
        with pytest.raises(BlockNotFoundError, match="another host"):
            foreign.as_array()
        foreign.close()
        handle.unlink()  # its pickle never landed: close() alone would wait for the grace


def test_runtime_env_keeps_the_callers_settings() -> None:
    """runtime_env() adds the hook and the mode beside the caller's entries, and refuses a clash."""
    env = sma_ray.runtime_env({"env_vars": {"A": "1"}}, mode="handle")
    assert env["worker_process_setup_hook"] == sma_ray.SETUP_HOOK
    assert env["env_vars"] == {"A": "1", sma_ray.MODE_VARIABLE: "handle"}
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        sma_ray.runtime_env({"worker_process_setup_hook": "x.y"})


def test_task_returns_a_shared_array_it_created() -> None:
    """20 SharedArrays created in tasks and returned stay valid here, and go when closed."""
    results = _get([make.remote(1000 + i) for i in range(20)])
    for index, result in enumerate(results):
        n = 1000 + index
        assert float(result.as_array().sum()) == n * (n - 1) / 2
    names = [result.name for result in results]
    for result in results:
        result.close()
    assert not [name for name in names if os.path.exists(os.path.join("/dev/shm", name))]
