"""SharedArray as numpy users meet it: the array protocol, constructors without a manager,
ManagedSharedMemoryArray (API.md section 1, v2)."""

from __future__ import annotations

import multiprocessing
import pickle
from multiprocessing.managers import SharedMemoryManager
from typing import Any

import numpy as np
import pytest
from _children_numpy import use_through_numpy_protocol

from shared_memory_array import (
    BlockNotFoundError,
    ManagedSharedMemoryArray,
    SharedArray,
)

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
NUMPY_2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


# -- the numpy protocol ------------------------------------------------------------------


def test_asarray_is_the_zero_copy_view_not_an_object_array() -> None:
    """np.asarray(sa) is an ndarray of the block's dtype and shape sharing its memory."""
    with SharedArray.copy(np.arange(6, dtype="i4").reshape(2, 3)) as sa:
        view = np.asarray(sa)
        assert type(view) is np.ndarray
        assert (view.dtype, view.shape) == (np.dtype("i4"), (2, 3))
        assert np.shares_memory(view, sa.as_array())
        view[1, 2] = 99  # writes through asarray reach the block
        other = SharedArray.attach(sa.name)
        try:
            assert other.as_array()[1, 2] == 99
        finally:
            other.close()


def test_shared_array_is_not_an_ndarray_subclass() -> None:
    """The handle speaks the protocol but stays a handle: not an ndarray subclass."""
    with SharedArray.allocate(3, "f8") as sa:
        assert not isinstance(sa, np.ndarray)


def test_numpy_functions_accept_the_handle() -> None:
    """numpy functions take a SharedArray directly, as they take an ndarray."""
    source = np.arange(12.0).reshape(3, 4)
    with SharedArray.copy(source) as sa:
        assert np.sum(sa) == source.sum()
        np.testing.assert_array_equal(np.add(sa, 1), source + 1)
        np.testing.assert_array_equal(sa, source)
        np.testing.assert_array_equal(np.stack([sa, sa]), np.stack([source, source]))


def test_array_protocol_copy_argument() -> None:
    """__array__ honours copy=: None and False give the view, True a fresh copy."""
    with SharedArray.copy(np.arange(4.0)) as sa:
        for copy in (None, False):
            assert np.shares_memory(sa.__array__(copy=copy), sa.as_array())
            assert np.shares_memory(sa.__array__(np.float64, copy=copy), sa.as_array())
        copied = sa.__array__(copy=True)
        assert not np.shares_memory(copied, sa.as_array())
        np.testing.assert_array_equal(copied, np.arange(4.0))


def test_array_protocol_dtype_conversion() -> None:
    """A different dtype is a converted copy; with copy=False it is a ValueError instead."""
    with SharedArray.copy(np.arange(4, dtype="i8")) as sa:
        converted = sa.__array__("f4")
        assert converted.dtype == np.float32
        assert not np.shares_memory(converted, sa.as_array())
        with pytest.raises(ValueError, match="copy=False"):
            sa.__array__("f4", copy=False)


@pytest.mark.skipif(not NUMPY_2, reason="numpy < 2 has no copy= in np.asarray/np.array")
def test_numpy_2_copy_keyword_end_to_end() -> None:
    """np.asarray(copy=False) never copies (and refuses a conversion); np.array copies."""
    with SharedArray.copy(np.arange(4, dtype="i8")) as sa:
        assert np.shares_memory(np.asarray(sa, copy=False), sa.as_array())
        assert np.shares_memory(np.asarray(sa, dtype="i8"), sa.as_array())
        with pytest.raises(ValueError, match="copy"):
            np.asarray(sa, dtype="f4", copy=False)
        assert not np.shares_memory(np.array(sa), sa.as_array())
        assert not np.shares_memory(np.array(sa, copy=True), sa.as_array())
        assert np.asarray(sa, dtype="f4").dtype == np.float32


def test_len_indexing_and_assignment_act_on_the_view() -> None:
    """len, sa[i], slices (views) and sa[i] = v behave like the ndarray's."""
    with SharedArray.allocate((4, 3), "i2") as sa:
        assert len(sa) == 4
        sa[1] = 7
        sa[2, 1:] = [8, 9]
        sa[np.array([False, False, False, True])] = -1
        expected = np.array([[0, 0, 0], [7, 7, 7], [0, 8, 9], [-1, -1, -1]], "i2")
        np.testing.assert_array_equal(sa.as_array(), expected)
        row = sa[2]
        assert isinstance(row, np.ndarray)
        assert np.shares_memory(row, sa.as_array())  # basic indexing: a view
        assert sa[2, 2] == 9
        assert [r.tolist() for r in sa] == expected.tolist()


def test_zero_d_arrays_have_no_length_but_index_with_an_empty_tuple() -> None:
    """A 0-d handle: len() and iteration raise TypeError; sa[()] reads and writes it."""
    with SharedArray.allocate((), "f8") as sa:
        with pytest.raises(TypeError, match="0-d"):
            len(sa)
        with pytest.raises(TypeError):
            iter(sa)
        sa[()] = 2.5
        assert sa[()] == 2.5
        assert np.asarray(sa).shape == ()


def test_protocol_on_a_closed_handle_raises() -> None:
    """After close, np.asarray and indexing raise ValueError (never an object array)."""
    sa = SharedArray.allocate(3, "f8")
    sa.close()
    with pytest.raises(ValueError, match="closed"):
        np.asarray(sa)
    with pytest.raises(ValueError, match="closed"):
        sa[0]


def test_spawn_child_uses_the_handle_through_the_numpy_protocol() -> None:
    """A spawn child reads with np.asarray and writes with sa[i] = v; the parent sees it."""
    with (
        SharedArray.copy(np.ones((5, 2), "f8")) as sa,
        multiprocessing.get_context("spawn").Pool(1) as pool,
    ):
        seen = pool.apply_async(use_through_numpy_protocol, (sa,)).get(TIMEOUT)
        assert seen == (5, (5, 2), "float64", 10.0, True, False)
        np.testing.assert_array_equal(
            sa.as_array(), np.repeat(np.arange(5) * 10.0, 2).reshape(5, 2)
        )


# -- the manager may be left out ---------------------------------------------------------


def _layout(sa: SharedArray[Any]) -> tuple[Any, ...]:
    return sa.shape, sa.dtype, sa.strides


SOURCE = np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))


@pytest.mark.parametrize(
    ("short", "seed_form"),
    [
        (lambda: SharedArray.copy(SOURCE), lambda: SharedArray.copy(None, SOURCE)),
        (lambda: SharedArray.copy(array=SOURCE), lambda: SharedArray.copy(None, array=SOURCE)),
        (lambda: SharedArray.copy(SOURCE[:, ::2]), lambda: SharedArray.copy(None, SOURCE[:, ::2])),
        (
            lambda: SharedArray.allocate((10, 10), "f8"),
            lambda: SharedArray.allocate(None, (10, 10), "f8"),
        ),
        (
            lambda: SharedArray.allocate((10, 10), dtype="f4"),
            lambda: SharedArray.allocate(None, (10, 10), "f4"),
        ),
        (
            lambda: SharedArray.allocate(shape=(2, 5), dtype="u1"),
            lambda: SharedArray.allocate(None, shape=(2, 5), dtype="u1"),
        ),
        (
            lambda: SharedArray.allocate(manager=None, shape=3),
            lambda: SharedArray.allocate(None, 3),
        ),
        (
            lambda: SharedArray.allocate((3, 2)),
            lambda: SharedArray.allocate(None, (3, 2), np.float64),
        ),
        (lambda: SharedArray.allocate(7, "c8"), lambda: SharedArray.allocate(None, (7,), "c8")),
        (
            lambda: SharedArray.allocate(np.int64(4), "i2"),
            lambda: SharedArray.allocate(None, 4, "i2"),
        ),
        (lambda: SharedArray.allocate((), "f2"), lambda: SharedArray.allocate(None, (), "f2")),
        (
            lambda: SharedArray.allocate((2, 3), "f8", order="F"),
            lambda: SharedArray.allocate(None, (2, 3), "f8", order="F"),
        ),
        (
            lambda: SharedArray.allocate_like(SOURCE),
            lambda: SharedArray.allocate_like(None, SOURCE),
        ),
        (
            lambda: SharedArray.allocate_like(template=SOURCE),
            lambda: SharedArray.allocate_like(None, SOURCE),
        ),
        (
            lambda: SharedArray.allocate_unsafe((10, 10), "f8"),
            lambda: SharedArray.allocate_unsafe(None, (10, 10), "f8"),
        ),
        (
            lambda: SharedArray.allocate_unsafe(5, np.int8),
            lambda: SharedArray.allocate(None, 5, np.int8),
        ),
        (
            lambda: SharedArray.allocate_unsafe(shape=(2, 2), dtype="f4", order="F"),
            lambda: SharedArray.allocate(None, (2, 2), "f4", order="F"),
        ),
        (
            lambda: SharedArray.allocate_like_unsafe(SOURCE),
            lambda: SharedArray.allocate_like_unsafe(None, SOURCE),
        ),
        (lambda: SharedArray.copy_unsafe(SOURCE), lambda: SharedArray.copy_unsafe(None, SOURCE)),
    ],
)
def test_short_forms_build_what_the_seed_forms_build(short: Any, seed_form: Any) -> None:
    """Leaving the manager out gives the same layout and contents as passing None first."""
    with short() as a, seed_form() as b:
        assert a.owner
        assert b.owner
        assert _layout(a) == _layout(b)
        np.testing.assert_array_equal(a.as_array(), b.as_array())


def test_short_forms_with_a_shared_memory_manager_still_take_it_first() -> None:
    """A SharedMemoryManager first is the manager: its shutdown unlinks the block."""
    with SharedMemoryManager() as manager:
        a = SharedArray.allocate(manager, (2, 2), "f8")
        b = SharedArray.copy(manager, np.ones(3))
        c = SharedArray.allocate_unsafe(manager, 4, "u1")
        names = [a.name, b.name, c.name]
        assert b.as_array().sum() == 3
    for name in names:
        with pytest.raises(BlockNotFoundError):
            SharedArray.attach(name)
    for sa in (a, b, c):
        sa.close()


# Calls a type checker refuses (mypy reports each of these); made through Any to run them.
UNTYPED: Any = SharedArray


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: UNTYPED.allocate((3,), "f8", "f4"), "one argument too many"),
        (lambda: UNTYPED.allocate((3,), "f8", dtype="f4"), "one argument too many"),
        (lambda: UNTYPED.allocate_unsafe((3,), "f8", "f4"), "one argument too many"),
        (lambda: UNTYPED.copy(np.ones(2), np.ones(2)), "one argument too many"),
        (lambda: UNTYPED.copy(np.ones(2), array=np.ones(2)), "one argument too many"),
        (lambda: UNTYPED.allocate_like([1], [2]), "one argument too many"),
        (lambda: UNTYPED.allocate(), "needs a shape"),
        (lambda: UNTYPED.allocate(dtype="f8"), "needs a shape"),
        (lambda: UNTYPED.allocate_unsafe(None), "needs a shape"),
        (lambda: UNTYPED.copy(), "needs an array"),
        (lambda: UNTYPED.copy_unsafe(None), "needs an array"),
        (lambda: UNTYPED.allocate_like(), "needs a template"),
        (lambda: UNTYPED.allocate("f8"), "shape must be an int or an iterable of ints"),
    ],
)
def test_bad_argument_lists_raise_type_error(call: Any, message: str) -> None:
    """Too many arguments once the manager is left out, or none at all, is a clear TypeError."""
    with pytest.raises(TypeError, match=message):
        call()


# -- ManagedSharedMemoryArray --------------------------------------------------------------


def test_managed_returns_the_public_class_and_yields_the_handle() -> None:
    """managed() is a ManagedSharedMemoryArray; entering yields the handle; exit closes, unlinks."""
    sa = SharedArray.allocate(3, "f8")
    managed = sa.managed()
    assert type(managed) is ManagedSharedMemoryArray
    with managed as inner:
        assert inner is sa
        name = sa.name
    assert sa.closed
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(name)


def test_managed_forwards_attributes_and_the_numpy_protocol() -> None:
    """m.shape, m.as_array(), np.asarray(m), m[i], len(m) reach the handle."""
    sa = SharedArray.copy(np.arange(6, dtype="u2").reshape(3, 2))
    with sa.managed() as _:
        managed = sa.managed()
        assert (managed.shape, managed.dtype, managed.name) == (sa.shape, sa.dtype, sa.name)
        assert managed.owner is True
        managed.as_array()[0, 0] = 40
        managed[0, 1] = 41
        assert np.shares_memory(np.asarray(managed), sa.as_array())
        assert len(managed) == 3
        assert [row.tolist() for row in managed] == [[40, 41], [2, 3], [4, 5]]
        assert sa.name in repr(managed)
        with pytest.raises(AttributeError, match="no_such_attribute"):
            managed.no_such_attribute  # noqa: B018


def test_entering_after_close_raises_value_error() -> None:
    """Re-entering after exit raises ValueError; a closed handle's new managed() enters, but
    its data stays closed (v3: several wrappers of one handle, test_seed_expectations.py)."""
    managed = SharedArray.allocate(2, "i1").managed()
    with managed:
        pass
    with pytest.raises(ValueError, match="closed"), managed:
        pytest.fail("re-entered a closed managed array")
    closed = SharedArray.allocate(2, "i1")
    closed.close()
    with closed.managed() as entered, pytest.raises(ValueError, match="closed"):
        entered.as_array()


def test_exit_without_enter_is_safe_and_closes() -> None:
    """__exit__ without __enter__ raises nothing and closes the handle, twice over."""
    sa = SharedArray.allocate(2, "i1")
    managed = sa.managed()
    managed.__exit__(None, None, None)
    managed.__exit__(None, None, None)
    assert sa.closed


def test_managed_of_an_attachment_closes_without_unlinking() -> None:
    """A client's managed() closes only the client's handle: the owner's block stays."""
    with SharedArray.allocate(4, "f4") as owner:
        with SharedArray.attach(owner.name).managed() as client:
            client[:] = 3
        assert client.closed
        assert not owner.closed
        assert owner.as_array().sum() == 12


def test_managed_pickles_as_a_managed_attachment() -> None:
    """A ManagedSharedMemoryArray pickles (its handle as name + layout), unpickles usable."""
    with SharedArray.copy(np.arange(3)) as sa:
        clone = pickle.loads(pickle.dumps(sa.managed()))
        assert type(clone) is ManagedSharedMemoryArray
        with clone as attached:
            assert not attached.owner
            assert attached[2] == 2
        SharedArray.attach(sa.name).close()  # the clone's exit did not unlink
