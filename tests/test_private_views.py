"""Copy-on-write views: SharedArray.attach(private=True) and read(token, private=True).

Issue 19 item 5: writable, zero-copy until a page is written, writes never seen
by others.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import needs

from shared_memory_array import SharedArray, read, release, write

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60


@pytest.fixture
def shared() -> Iterator[SharedArray]:
    with SharedArray.copy(np.arange(100_000, dtype=np.float64)) as array:
        yield array


def _write_privately(name: str) -> float:
    private = SharedArray.attach(name, private=True)
    view = private.as_array()
    view[:10] = -1.0
    total = float(view.sum())
    private.close()
    return total


def test_a_private_attach_is_writable_and_its_writes_stay_here(shared: SharedArray) -> None:
    """Writes through a private view change it, not the block nor any other view."""
    private = SharedArray.attach(shared.name, private=True)
    try:
        view = private.as_array()
        assert view.flags.writeable
        assert np.shares_memory(view, private.as_array())  # the same private mapping
        view[:5] = 42.0
        assert list(view[:6]) == [42.0] * 5 + [5.0]
        assert list(shared.as_array()[:5]) == [0.0, 1.0, 2.0, 3.0, 4.0]
        again = SharedArray.attach(shared.name)
        assert list(again.as_array()[:5]) == [0.0, 1.0, 2.0, 3.0, 4.0]
        again.close()
    finally:
        private.close()


@needs("copy_on_write")
def test_a_private_view_sees_the_pages_it_did_not_write_change(shared: SharedArray) -> None:
    """Pages a private view never wrote are still shared: later writes by others show."""
    private = SharedArray.attach(shared.name, private=True)
    try:
        view = private.as_array()
        view[0] = -5.0  # copies the first page only
        shared[50_000] = 123.0  # a page far away, written by the owner after the attach
        assert view[50_000] == 123.0
        assert view[0] == -5.0
    finally:
        private.close()


def test_private_writes_in_another_process_are_never_seen(shared: SharedArray) -> None:
    """A spawn child's private writes leave the block as it was."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        total = pool.apply(_write_privately, (shared.name,))
    assert total == float(np.arange(100_000).sum()) - float(np.arange(10).sum()) - 10
    assert shared[:10].tolist() == list(range(10))


def test_a_private_handle_pickles_as_a_private_handle(shared: SharedArray) -> None:
    """A private handle unpickled elsewhere is private there too (its writes stay there)."""
    private = SharedArray.attach(shared.name, private=True)
    try:
        private[0] = -1.0
        copy = pickle.loads(pickle.dumps(private))
        try:
            assert copy[0] == 0.0  # private writes do not travel
            copy[1] = -2.0
            assert shared[1] == 1.0
        finally:
            copy.close()
    finally:
        private.close()


def test_notify_through_a_private_handle_reaches_shared_waiters(shared: SharedArray) -> None:
    """The generation lives in the block, not in the private copy: notify is shared."""
    private = SharedArray.attach(shared.name, private=True)
    try:
        before = shared.notify()
        assert private.notify() == before + 1
        assert shared.wait(timeout=1, after=before) == before + 1
    finally:
        private.close()


def test_read_private_gives_writable_arrays_whose_writes_stay_here() -> None:
    """read(token, private=True): writable numpy arrays; another read sees the original."""
    token = write({"a": np.arange(1_000_000, dtype=np.int32)}, threshold=0)
    try:
        private = read(token, private=True)
        assert private["a"].flags.writeable
        private["a"][:3] = -1
        assert private["a"][:4].tolist() == [-1, -1, -1, 3]
        again = read(token)
        assert again["a"][:3].tolist() == [0, 1, 2]
        assert not again["a"].flags.writeable
    finally:
        release(token)


def test_read_private_of_an_inline_token_is_a_private_copy() -> None:
    """An inline token read privately gives writable arrays (they are copies anyway)."""
    token = write(np.arange(5))
    array = read(token, private=True)
    array[0] = 9
    assert read(token)[0] == 0
