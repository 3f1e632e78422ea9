"""SharedData: write once on entering, load by name with a per-process cache, unlink on exit."""

from __future__ import annotations

import multiprocessing
import pickle
from typing import Any

import numpy as np
import pytest
from _children_codec import checksum, load_shared_data
from conftest import library_blocks

from shared_memory_array import BlockNotFoundError, LayoutError, SharedData
from shared_memory_array._block import SharedBlock
from shared_memory_array._header import BlockKind, encode_header

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    """Each test starts with an empty per-process cache."""
    SharedData.clear_cache()


def test_load_returns_the_object_with_read_only_zero_copy_arrays() -> None:
    """load rebuilds the object; its arrays are read-only views on the block."""
    weights_in = np.arange(12, dtype="f4").reshape(3, 4)
    with SharedData({"weights": weights_in, "label": "x"}) as shared:
        assert shared.name in library_blocks()
        assert shared.size >= weights_in.nbytes
        loaded = SharedData.load(shared.name)
        assert isinstance(loaded, dict)
        assert loaded["label"] == "x"
        weights = loaded["weights"]
        np.testing.assert_array_equal(weights, weights_in)
        assert not weights.flags.owndata
        with pytest.raises(ValueError, match="WRITEABLE"):
            weights.setflags(write=True)


def test_load_is_cached_per_process_until_clear_cache() -> None:
    """A second load returns the same object; after clear_cache it is rebuilt (and equal)."""
    with SharedData(np.ones(100)) as shared:
        first = SharedData.load(shared.name)
        assert SharedData.load(shared.name) is first
        SharedData.clear_cache()
        again = SharedData.load(shared.name)
        assert again is not first
        np.testing.assert_array_equal(again, first)


def test_exit_unlinks_and_later_loads_raise_even_when_cached() -> None:
    """Leaving the with block unlinks the block; load then raises, cached or not."""
    with SharedData(np.arange(5)) as shared:
        name = shared.name
        kept = SharedData.load(name)
    assert name not in library_blocks()
    with pytest.raises(BlockNotFoundError, match=name):
        SharedData.load(name)
    np.testing.assert_array_equal(kept, np.arange(5))  # objects loaded before stay valid


def test_cache_hit_for_an_unlinked_block_raises() -> None:
    """A cached name whose block was unlinked raises BlockNotFoundError and leaves the cache."""
    with SharedData([1, 2, 3]) as shared:
        assert SharedData.load(shared.name) == [1, 2, 3]
        SharedBlock.attach(shared.name).unlink()  # gone behind the cache's back
        with pytest.raises(BlockNotFoundError):
            SharedData.load(shared.name)
        shared.unlink()
        shared.unlink()  # idempotent, also for a block someone else unlinked


@pytest.mark.parametrize("name", [None, 5, b"sma_0123"])
def test_load_rejects_non_string_names(name: Any) -> None:
    """A name that is not a str is a TypeError."""
    with pytest.raises(TypeError):
        SharedData.load(name)


@pytest.mark.parametrize("name", ["sma_00000000deadbeef", "", "a/b"])
def test_load_of_a_missing_or_impossible_name_raises_block_not_found(name: str) -> None:
    """A name with no block behind it (or that cannot name one) raises BlockNotFoundError."""
    with pytest.raises(BlockNotFoundError):
        SharedData.load(name)


def test_load_of_a_block_of_another_kind_raises_layout_error() -> None:
    """A block that is not a codec block raises LayoutError naming its kind."""
    header = encode_header(
        BlockKind.ARRAY, dtype=np.dtype("f8"), shape=(1,), strides=(8,), nbytes=8
    )
    block = SharedBlock.create(len(header) + 8)
    try:
        block.buf[: len(header)] = header
        with pytest.raises(LayoutError, match="array"):
            SharedData.load(block.name)
    finally:
        block.close()
        block.unlink()


def test_unpicklable_object_raises_on_entering_and_creates_no_block() -> None:
    """Entering a SharedData of an unpicklable object raises the pickler's error, no block."""
    before = library_blocks()
    shared = SharedData(lambda: None)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)), shared:
        pytest.fail("entered a SharedData that could not be pickled")
    assert library_blocks() == before


def test_the_block_is_created_on_entering_not_by_the_constructor() -> None:
    """SharedData(obj) allocates nothing; entering creates the block, leaving unlinks it."""
    before = library_blocks()
    shared = SharedData(np.ones(1000))
    assert library_blocks() == before
    with shared:
        (created,) = library_blocks() - before
        assert created == shared.name
    assert library_blocks() == before


@pytest.mark.parametrize("attribute", ["name", "size"])
def test_name_and_size_exist_only_inside_the_with_block(attribute: str) -> None:
    """name and size raise RuntimeError before entering and after leaving, as in fastshare."""
    shared = SharedData([1, 2])
    with pytest.raises(RuntimeError, match="before entering"):
        getattr(shared, attribute)
    with shared:
        assert getattr(shared, attribute)
    with pytest.raises(RuntimeError, match="after leaving"):
        getattr(shared, attribute)
    assert "left" in repr(shared)


def test_a_shared_data_is_entered_once() -> None:
    """Entering again, while inside or after leaving, raises RuntimeError and creates nothing."""
    shared = SharedData({"a": 1})
    with shared:
        inside = library_blocks()
        with pytest.raises(RuntimeError, match="entered once"), shared:
            pytest.fail("entered twice")
        assert library_blocks() == inside
        assert SharedData.load(shared.name) == {"a": 1}
    with pytest.raises(RuntimeError, match="entered once"), shared:
        pytest.fail("entered after leaving")


def test_unlink_before_entering_is_a_no_op() -> None:
    """unlink() of a SharedData never entered does nothing (there is no block yet)."""
    shared = SharedData(b"x")
    shared.unlink()
    assert "not entered" in repr(shared)
    with shared:
        assert SharedData.load(shared.name) == b"x"


def test_spawned_workers_load_by_name_from_the_cache() -> None:
    """Pool workers load the broadcast by name, get read-only arrays and cache hits."""
    data = np.ones(10_000, dtype="f4")
    with SharedData(data) as shared, multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map_async(load_shared_data, [shared.name] * 4).get(TIMEOUT)
    assert results == [(checksum(data), True, False)] * 4
