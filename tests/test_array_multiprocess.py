"""SharedArray across processes: spawn/forkserver/fork pools, attach from a child, lifetimes."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from _children_array import create_and_return_name, describe, fill_row, row_sum

from shared_memory_array import BlockNotFoundError, SharedArray

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
METHODS = [
    m for m in ("spawn", "forkserver", "fork") if m in multiprocessing.get_all_start_methods()
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_pool_map_sums_rows_through_pickled_handles(method: str) -> None:
    """The seed's example: handles ride Pool.map args and workers see the owner's data."""
    data = np.random.default_rng(0).random((40, 50))
    with SharedArray.copy(None, data) as shared:
        with multiprocessing.get_context(method).Pool(2) as pool:
            sums = pool.map_async(row_sum, [(shared, i) for i in range(40)]).get(TIMEOUT)
        np.testing.assert_allclose(sums, data.sum(axis=1))
        SharedArray.attach(shared.name).close()  # workers exiting did not unlink it


def test_process_pool_executor_workers_write_and_are_not_owners() -> None:
    """Writes made by spawn workers are visible to the owner; workers never own the block."""
    with SharedArray.allocate(None, (6, 3), "int64") as shared:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(2, mp_context=context) as pool:
            owners = list(pool.map(fill_row, [(shared, i) for i in range(6)], timeout=TIMEOUT))
        assert owners == [0] * 6
        np.testing.assert_array_equal(shared.as_array(), np.repeat(np.arange(6), 3).reshape(6, 3))


def test_spawn_child_sees_layout_and_data_by_handle() -> None:
    """A spawn child gets shape, dtype and data from the pickled handle, as a non-owner."""
    source = np.asfortranarray(np.arange(12, dtype="float32").reshape(3, 4))
    with (
        SharedArray.copy(None, source) as shared,
        multiprocessing.get_context("spawn").Pool(1) as pool,
    ):
        shape, dtype, owner, total = pool.apply_async(describe, (shared,)).get(TIMEOUT)
    assert (shape, dtype, owner, total) == ((3, 4), "float32", False, float(source.sum()))


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_child_that_attaches_writes_and_exits_leaves_block_alive_and_stderr_empty() -> None:
    """A separate process attaching by name alone, writing and exiting neither unlinks nor warns.

    This is the resource-tracker bug of the standard library on Python < 3.13.
    """
    with SharedArray.allocate(None, (4,), "int32") as shared:
        done = _python(
            f"""
            from shared_memory_array import SharedArray
            child = SharedArray.attach({shared.name!r})
            child.as_array()[:] = [1, 2, 3, 4]
            """
        )
        assert done.returncode == 0
        assert done.stderr == ""
        assert shared.as_array().tolist() == [1, 2, 3, 4]
        SharedArray.attach(shared.name).close()


def test_owner_process_exit_unlinks_unclosed_arrays() -> None:
    """An owner that exits without close() leaves no block behind."""
    done = _python(
        """
        import numpy as np
        from shared_memory_array import SharedArray
        keep = SharedArray.copy(None, np.ones(10))
        print(keep.name)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(done.stdout.strip())


@pytest.mark.parametrize("method", [m for m in ("spawn", "fork") if m in METHODS])
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_multiprocessing_child_exit_unlinks_its_unclosed_arrays(method: str) -> None:
    """A multiprocessing child (which exits without atexit) still unlinks the blocks it owned."""
    context = multiprocessing.get_context(method)
    with context.Pool(1) as pool:
        name = pool.apply_async(create_and_return_name, (16,)).get(TIMEOUT)
        pool.close()
        pool.join()  # a worker that exits normally (close + join, not terminate)
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(name)
