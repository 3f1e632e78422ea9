"""SharedArray in one process: constructors, validation, views, lifetimes, pickling."""

from __future__ import annotations

import gc
import pickle
import stat
from multiprocessing.managers import SharedMemoryManager, SyncManager
from typing import Any

import numpy as np
import pytest
from conftest import block_stat

from shared_memory_array import (
    BlockNotFoundError,
    LayoutError,
    SharedArray,
    SharedMemoryArray,
)
from shared_memory_array._block import SharedBlock
from shared_memory_array._header import BlockKind, encode_header

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


def test_alias_is_the_same_class() -> None:
    """SharedMemoryArray is SharedArray, not a subclass or a copy."""
    assert SharedMemoryArray is SharedArray


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (5, (5,)),
        ((2, 3), (2, 3)),
        ([2, 3], (2, 3)),
        (np.int64(4), (4,)),
        ((np.int32(2), np.uint8(3)), (2, 3)),
        ((), ()),
        ((0, 4), (0, 4)),
        (range(1, 4), (1, 2, 3)),
    ],
)
def test_allocate_accepts_every_shape_like(shape: Any, expected: tuple[int, ...]) -> None:
    """Ints, iterables and numpy integers all give the same plain-int shape, zero-filled."""
    with SharedArray.allocate(None, shape, "int16") as sa:
        arr = sa.as_array()
        assert sa.shape == expected == arr.shape
        assert all(type(d) is int for d in sa.shape)
        assert not arr.any()
        assert sa.dtype == np.int16


def test_allocate_positional_and_keyword_forms_agree() -> None:
    """allocate(manager, shape, dtype) and allocate(shape=..., dtype=...) build the same layout."""
    with (
        SharedArray.allocate(None, (3, 4), "float32") as a,
        SharedArray.allocate(shape=(3, 4), dtype="float32") as b,
    ):
        assert (a.shape, a.dtype, a.strides) == (b.shape, b.dtype, b.strides)
        assert a.nbytes == 48


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"shape": None}, TypeError, "needs a shape"),
        ({"shape": (2.5,)}, TypeError, "integer"),
        ({"shape": (3, -1)}, ValueError, "negative"),
        ({"shape": 3, "dtype": object}, TypeError, "Python objects"),
        ({"shape": 3, "dtype": [("a", "O")]}, TypeError, "Python objects"),
        ({"shape": 3, "dtype": "V0"}, ValueError, "itemsize 0"),
        ({"shape": 3, "dtype": "not-a-dtype"}, TypeError, "not understood"),
        ({"shape": (1 << 40, 1 << 40)}, ValueError, "too big"),
        ({"shape": 3, "order": "K"}, ValueError, "order"),
    ],
)
def test_invalid_arguments_raise_clear_errors(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Bad shapes, dtypes and orders raise TypeError/ValueError before anything is created."""
    with pytest.raises(error, match=message):
        SharedArray.allocate(None, **kwargs)


def test_allocate_like_keeps_shape_dtype_and_order() -> None:
    """allocate_like copies the template's layout, Fortran order included, not its data."""
    template = np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))
    with SharedArray.allocate_like(None, template) as sa:
        arr = sa.as_array()
        assert arr.shape == (3, 4)
        assert arr.dtype == np.dtype(">i4")
        assert arr.flags.f_contiguous
        assert not arr.flags.c_contiguous
        assert not arr.any()


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a,
        lambda a: a.T,
        lambda a: a[::2, 1:],
        lambda a: a[:, ::-1],
        lambda a: np.asfortranarray(a),
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["c", "transpose", "slice", "reversed", "fortran", "broadcast"],
)
def test_copy_equals_its_source_and_keeps_fortran_order(make: object) -> None:
    """copy() of any view compares equal; F-contiguous sources stay F-contiguous."""
    source = make(np.arange(30, dtype=np.float64).reshape(5, 6))  # type: ignore[operator]
    with SharedArray.copy(None, source) as sa:
        arr = sa.as_array()
        np.testing.assert_array_equal(arr, source)
        fortran_source = source.flags.f_contiguous and not source.flags.c_contiguous
        assert arr.flags.f_contiguous if fortran_source else arr.flags.c_contiguous


def test_copy_is_independent_of_its_source() -> None:
    """Writing the source after copy() does not change the shared copy."""
    source = np.ones(4)
    with SharedArray.copy(None, source) as sa:
        source[:] = 5
        assert sa.as_array().tolist() == [1.0] * 4


def test_structured_zero_size_and_0d_arrays_round_trip() -> None:
    """Structured dtypes, empty arrays and 0-d arrays attach with the same layout and data."""
    dt = np.dtype([("x", "<f4"), ("name", "U3"), ("v", "<i2", (2,))], align=True)
    sources = [
        np.array([(1.5, "ab", (1, 2)), (2.5, "xyz", (3, 4))], dtype=dt),
        np.zeros((0, 3), dtype="c16"),
        np.array(7, dtype="u8"),
    ]
    for source in sources:
        with SharedArray.copy(None, source) as sa:
            other = SharedArray.attach(sa.name)
            try:
                got = other.as_array()
                assert got.dtype == source.dtype
                assert got.shape == source.shape
                assert got.tobytes() == source.tobytes()
            finally:
                other.close()


def test_attach_by_name_alone_reads_layout_from_header() -> None:
    """attach(name) needs no shape or dtype, and shares memory with the owner."""
    with SharedArray.allocate(None, (2, 5), "u2", order="F") as owner:
        client = SharedArray.attach(owner.name)
        try:
            assert (client.shape, client.dtype, client.strides) == (
                owner.shape,
                owner.dtype,
                owner.strides,
            )
            assert not client.owner
            assert owner.owner
            client.as_array()[1, 4] = 77
            assert owner.as_array()[1, 4] == 77
        finally:
            client.close()


def test_attach_with_matching_shape_and_dtype_succeeds() -> None:
    """The seed's form attach(name=, shape=, dtype=) works when it agrees with the header."""
    with SharedArray.allocate(None, (10, 10), "float64") as owner:
        with SharedArray.attach(name=owner.name, shape=(10, 10), dtype="float64") as client:
            assert client.shape == (10, 10)
        with SharedArray.attach(owner.name, dtype=np.float64) as client:
            assert client.dtype == np.float64


@pytest.mark.parametrize(
    ("shape", "dtype"), [((10, 9), None), (None, "float32"), ((100,), "float64")]
)
def test_attach_contradicting_header_raises_layout_error(
    shape: tuple[int, ...] | None, dtype: str | None
) -> None:
    """A shape or dtype the header contradicts raises LayoutError instead of mapping wrong bytes."""
    with (
        SharedArray.allocate(None, (10, 10), "float64") as owner,
        pytest.raises(LayoutError, match="holds shape \\(10, 10\\)"),
    ):
        SharedArray.attach(owner.name, shape=shape, dtype=dtype)


def test_attach_missing_block_raises_block_not_found() -> None:
    """Attaching a name that does not exist raises BlockNotFoundError."""
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach("sma_doesnotexist000000")


def test_attach_to_a_block_of_another_kind_raises_layout_error() -> None:
    """An array attach on a codec block is refused with LayoutError naming both kinds."""
    header = encode_header(BlockKind.CODEC, nbytes=8)
    block = SharedBlock.create(len(header) + 8)
    try:
        block.buf[: len(header)] = header
        with pytest.raises(LayoutError, match="'codec', not 'array'"):
            SharedArray.attach(block.name)
    finally:
        block.close()
        block.unlink()


def test_attach_to_empty_or_headerless_block_raises_layout_error() -> None:
    """A zero-filled block with no header and no owner at work on it is refused with LayoutError.

    (Owned and headerless, it is one still being created: see test_handle.)
    """
    block = SharedBlock.create(4096)
    block.hold.drop_owner()
    try:
        with pytest.raises(LayoutError, match="no shared_memory_array header"):
            SharedArray.attach(block.name)
    finally:
        block.close()
        block.unlink()


def test_views_stay_valid_after_close_and_unlink() -> None:
    """as_array() views survive the handle's close() (the known segfault of weaker libraries)."""
    sa = SharedArray.allocate(None, (256, 256), "float64")
    view = sa.as_array()
    sa.close()
    view[:] = 3.0  # would segfault if close() had unmapped the block
    assert float(view.sum()) == 3.0 * 256 * 256
    assert sa.closed
    with pytest.raises(ValueError, match="closed"):
        sa.as_array()


def test_dropping_the_owner_handle_keeps_the_block_while_a_view_holds_it() -> None:
    """A garbage-collected owner handle is an implicit end: its views keep the block alive."""
    owner = SharedArray.copy(None, np.arange(5))
    name, view = owner.name, owner.as_array()
    del owner
    gc.collect()
    other = SharedArray.attach(name)  # still there: this process holds it through the view
    assert other.as_array().tolist() == [0, 1, 2, 3, 4]
    other.close()
    view[0] = 10
    assert view[0] == 10
    del view
    gc.collect()
    with pytest.raises(BlockNotFoundError):  # the last mapping went, and nobody owned it
        SharedArray.attach(name)


def test_dropping_the_owner_handle_without_views_unlinks_at_once() -> None:
    """The owner handle garbage collected with no view and no other holder: the block goes now."""
    owner = SharedArray.allocate(None, 3, "f4")
    name = owner.name
    del owner
    gc.collect()
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(name)


def test_owner_close_unlinks_and_client_close_does_not() -> None:
    """Closing a client leaves the block; closing the owner removes it; both idempotent."""
    owner = SharedArray.allocate(None, 4, "i1")
    client = SharedArray.attach(owner.name)
    client.close()
    client.close()
    SharedArray.attach(owner.name).close()
    owner.close()
    owner.close()
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(owner.name)


def test_unlink_is_idempotent_and_keeps_the_mapping() -> None:
    """unlink() removes the name now, twice is harmless, and the handle's view still works."""
    with SharedArray.allocate(None, 3, "i4") as sa:
        sa.unlink()
        sa.unlink()
        sa.as_array()[:] = 1
        assert sa.as_array().sum() == 3
        with pytest.raises(BlockNotFoundError):
            SharedArray.attach(sa.name)


def test_managed_and_with_close_on_exit() -> None:
    """managed() yields the handle and closes (and unlinks) it on exit, even on error."""
    sa = SharedArray.allocate(None, 2)
    name = sa.name

    def fail_inside() -> None:
        with sa.managed() as same:
            assert same is sa
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail_inside()
    assert sa.closed
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(name)


def test_array_block_is_owner_only() -> None:
    """Array blocks are created readable and writable by their owner only (0600)."""
    with SharedArray.allocate(None, 3) as sa:
        mode = block_stat(sa.name).st_mode
        assert stat.S_IMODE(mode) == 0o600


def test_pickle_carries_name_and_layout_only() -> None:
    """A pickled handle is small whatever the array size, and unpickles as a non-owner."""
    with SharedArray.allocate(None, (1000, 1000), "float64") as owner:
        owner.as_array()[0, 0] = 42
        data = pickle.dumps(owner)
        assert len(data) < 500
        clone = pickle.loads(data)
        try:
            assert not clone.owner
            assert clone.as_array()[0, 0] == 42
        finally:
            clone.close()
        SharedArray.attach(owner.name).close()  # the clone's close did not unlink


def test_direct_construction_is_refused() -> None:
    """SharedArray() is not a constructor: it points at the classmethods."""
    with pytest.raises(TypeError, match="allocate"):
        SharedArray()


def test_unsafe_variants_reach_the_same_core() -> None:
    """The _unsafe constructors build the same blocks as their validated twins."""
    template = np.arange(6, dtype="i2").reshape(2, 3)
    with (
        SharedArray.allocate_unsafe(None, (2, 3), np.dtype("i2")) as a,
        SharedArray.allocate_like_unsafe(None, template) as b,
        SharedArray.copy_unsafe(None, template) as c,
    ):
        assert a.shape == b.shape == c.shape == (2, 3)
        assert a.dtype == b.dtype == c.dtype == np.int16
        np.testing.assert_array_equal(c.as_array(), template)
        d = SharedArray.attach_unsafe(c.name, shape=(99,), dtype="f8")
        try:
            assert d.shape == (2, 3)  # the header is the truth; the arguments are not compared
        finally:
            d.close()


def test_attach_unsafe_still_checks_header_bounds() -> None:
    """attach_unsafe skips the CRC but a header claiming more than the block raises LayoutError."""
    with SharedArray.allocate(None, 8, "u1") as sa:
        block = SharedBlock.attach(sa.name)
        try:
            block.buf[64:72] = (1 << 40).to_bytes(8, "little")  # nbytes
            with pytest.raises(LayoutError, match="exceeds"):
                SharedArray.attach_unsafe(sa.name)
            with pytest.raises(LayoutError, match="checksum"):
                SharedArray.attach(sa.name)
        finally:
            block.close()


def test_manager_shutdown_unlinks_blocks_it_bounds() -> None:
    """With a SharedMemoryManager, the manager's shutdown unlinks blocks still open."""
    with SharedMemoryManager() as manager:
        kept = SharedArray.allocate(manager, (4, 4), "float32")
        closed_early = SharedArray.allocate(manager, 4, "float32")
        closed_early.close()
        assert kept.owner
        SharedArray.attach(kept.name).close()
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(kept.name)
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(closed_early.name)
    kept.close()


def test_manager_must_be_a_started_shared_memory_manager() -> None:
    """Another kind of manager, or a SharedMemoryManager not started, is refused up front."""
    with pytest.raises(TypeError, match="SharedMemoryManager"):
        SharedArray.allocate(SyncManager(), 3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="SharedMemoryManager"):
        SharedArray.copy(SyncManager(), np.zeros(3))  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="not been started"):
        SharedArray.allocate(SharedMemoryManager(), 3)
