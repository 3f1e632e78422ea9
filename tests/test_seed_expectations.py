"""What the seed packages' users (and their own tests) expect beyond the published examples:
shared-memory-array's ``sa.shm`` and several ``managed()`` wrappers of one array, fastshare's
``SharedData`` messages, zero-copy-ipc's ``slot_count`` and capacity formula (issue 18, item 4)."""

from __future__ import annotations

import itertools
import os
from multiprocessing.managers import SharedMemoryManager
from multiprocessing.shared_memory import SharedMemory
from typing import Literal

import numpy as np
import pytest

from shared_memory_array import BlockNotFoundError, ClosedError, SharedArray, SharedData, SharedDict

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

_names = itertools.count()


def _dict_name() -> str:
    return f"seed_expectations_{os.getpid()}_{next(_names)}"


# -- sa.shm: name, size and the array's bytes ---------------------------------------------


def test_shm_name_is_the_block_name_attach_takes() -> None:
    """sa.shm.name == sa.name (shared-memory-array's test), and attach accepts it."""
    with SharedMemoryManager() as manager:
        sa = SharedArray.allocate(manager, shape=(10,), dtype="float64")
        assert sa.name == sa.shm.name
        with SharedArray.attach(sa.shm.name) as other:
            assert other.shape == (10,)
        with sa.managed() as managed:
            assert managed.shm.name == sa.name


@pytest.mark.parametrize("order", ["C", "F"])
def test_shm_buf_is_the_array_data_zero_copy(order: Literal["C", "F"]) -> None:
    """np.ndarray(shape, dtype, buffer=sa.shm.buf) is the array, sharing its memory."""
    source = np.arange(12, dtype="<i4").reshape(3, 4)
    with SharedArray.copy(np.asarray(source, order=order)) as sa:
        shm = sa.shm
        assert shm.size == sa.nbytes == len(shm.buf) == 48
        assert (shm.buf.format, shm.buf.ndim, shm.buf.readonly) == ("B", 1, False)
        rebuilt: np.ndarray = np.ndarray(sa.shape, sa.dtype, buffer=shm.buf, order=order)
        np.testing.assert_array_equal(rebuilt, source)
        assert np.shares_memory(rebuilt, sa.as_array())
        shm.buf[:4] = (99).to_bytes(4, "little")  # writes through buf reach the block
        with SharedArray.attach(sa.name) as other:
            assert other[0, 0] == 99


@pytest.mark.parametrize("shape", [(), (0,), (0, 3)])
def test_shm_of_zero_d_and_empty_arrays(shape: tuple[int, ...]) -> None:
    """A 0-d array's buf is its one item; an empty array's buf is empty."""
    with SharedArray.allocate(shape, "f8") as sa:
        assert sa.shm.size == len(sa.shm.buf) == sa.nbytes


def test_shm_is_not_the_standard_librarys_shared_memory() -> None:
    """sa.shm is the library's own object (the stdlib's would register with the tracker)."""
    with SharedArray.allocate(4, "u1") as sa:
        assert not isinstance(sa.shm, SharedMemory)
        assert not hasattr(sa.shm, "unlink")
        assert sa.name in repr(sa.shm)


def test_shm_buf_outlives_close_and_closed_handles_refuse_a_new_one() -> None:
    """A buf taken before close stays readable; after close, name and size remain, buf raises."""
    sa = SharedArray.copy(np.arange(4, dtype="u1"))
    buf, name = sa.shm.buf, sa.name
    sa.close()
    assert bytes(buf) == b"\x00\x01\x02\x03"
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(name)
    assert (sa.shm.name, sa.shm.size) == (name, 4)
    with pytest.raises(ClosedError, match="closed"):
        sa.shm.buf  # noqa: B018
    del buf


# -- several managed() wrappers of one array -------------------------------------------------


def test_later_wrappers_of_a_closed_array_enter_and_exit_harmlessly() -> None:
    """The first wrapper's exit closes (and unlinks); the next ones enter and exit quietly."""
    with SharedMemoryManager() as manager:
        sa = SharedArray.allocate(manager, shape=(10,), dtype="float64")
        name = sa.name
        first, second, third = sa.managed(), sa.managed(), sa.managed()
        with first as entered:
            entered.as_array()[:] = 1.0
        assert sa.closed
        with pytest.raises(FileNotFoundError):  # BlockNotFoundError, as the seed's tests expect
            SharedArray.attach(name)
        with second as again:
            assert again is sa
            with pytest.raises(ClosedError, match="closed"):
                again.as_array()  # the data stays closed
        with third:
            pass
        assert second._closed
        assert third._closed


def test_an_exited_wrapper_cannot_be_entered_again() -> None:
    """Re-entering one wrapper raises ClosedError (a ValueError) saying "already closed"."""
    with SharedMemoryManager() as manager:
        managed = SharedArray.allocate(manager, shape=(10,), dtype="float64").managed()
        assert managed._closed is False
        with managed:
            assert managed._closed is False
        assert managed._closed is True
        with pytest.raises(ValueError, match="already closed") as raised, managed:
            pytest.fail("re-entered")
        assert type(raised.value) is ClosedError


def test_exit_without_enter_also_counts_as_closing_the_wrapper() -> None:
    """__exit__ called by hand (any number of times) closes; entering afterwards raises."""
    sa = SharedArray.allocate(3, "i8")
    managed = sa.managed()
    for _ in range(3):
        managed.__exit__(None, None, None)
    assert sa.closed
    with pytest.raises(ClosedError, match="already closed"), managed:
        pytest.fail("entered after exit")


def test_nested_wrappers_of_one_array_close_it_at_the_first_exit() -> None:
    """An inner wrapper's exit closes the array; the outer one's exit is a harmless no-op."""
    sa = SharedArray.allocate(2, "f4")
    with sa.managed() as outer:
        with sa.managed() as inner:
            inner[:] = 2.0
        assert outer.closed
        with pytest.raises(ClosedError):
            outer.sum()
    assert sa.closed


def test_exceptions_pass_through_and_the_array_is_still_closed() -> None:
    """An exception inside the with block propagates, and the owner's block is unlinked."""
    sa = SharedArray.allocate(3, "f8")
    with pytest.raises(KeyError, match="intentional"), sa.managed():
        raise KeyError("intentional")
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(sa.name)


# -- SharedData: fastshare's messages --------------------------------------------------------


@pytest.mark.parametrize("attribute", ["name", "size"])
def test_shared_data_outside_with_says_what_fastshare_said(attribute: str) -> None:
    """sd.name / sd.size outside with: RuntimeError "not entered or already exited"."""
    shared = SharedData(b"payload")
    with pytest.raises(RuntimeError, match="not entered or already exited"):
        getattr(shared, attribute)
    with shared:
        getattr(shared, attribute)
    with pytest.raises(RuntimeError, match="not entered or already exited"):
        getattr(shared, attribute)


def test_shared_data_entered_twice_says_what_fastshare_said() -> None:
    """Entering again, inside or after the with block: RuntimeError "does not support re-entry"."""
    shared = SharedData([1, 2, 3])
    with shared:
        with pytest.raises(RuntimeError, match="does not support re-entry"), shared:
            pytest.fail("entered twice")
        assert SharedData.load(shared.name) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="does not support re-entry"), shared:
        pytest.fail("entered after leaving")


# -- zero-copy-ipc: slot_count reads back, and its capacity formula holds ---------------------


def test_stats_slot_count_is_the_slot_count_given() -> None:
    """stats()["slot_count"] is what create() was given (100, not the table's 256 slots)."""
    with SharedDict.create(_dict_name(), slot_count=100, heap_size=1 << 16, grow=False) as d:
        stats = d.stats()
        assert stats["slot_count"] == 100
        assert stats["table_slots"] >= 100  # the rounded table size, under its own key


@pytest.mark.parametrize(
    ("key_bytes", "value_bytes"), [(1, 1), (8, 8), (16, 16), (8, 100), (32, 1000)]
)
def test_zero_copy_ipc_capacity_formula_holds(key_bytes: int, value_bytes: int) -> None:
    """heap_size = items * (key + value) * 2 holds 1,000 items of any size, with grow=False."""
    items = 1000
    heap_size = max(4096, items * (key_bytes + value_bytes) * 2)
    with SharedDict.create(_dict_name(), slot_count=items, heap_size=heap_size, grow=False) as d:
        keys = [f"{index:0{key_bytes}x}"[-key_bytes:] for index in range(items)]
        for key in keys:
            d[key] = "v" * value_bytes
        assert len(d) == len(set(keys))
        d._check()
