"""ClosedError: using a closed array handle (API.md section 6, v3)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import shared_memory_array
from shared_memory_array import ClosedError, SharedArray, SharedArrayError

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


def test_closed_error_is_a_library_error_and_a_value_error() -> None:
    """ClosedError is exported, a SharedArrayError and a ValueError, and pickles whole."""
    assert shared_memory_array.ClosedError is ClosedError
    assert issubclass(ClosedError, SharedArrayError)
    assert issubclass(ClosedError, ValueError)
    error = pickle.loads(pickle.dumps(ClosedError("SharedArray 'x' is closed")))
    assert type(error) is ClosedError
    assert str(error) == "SharedArray 'x' is closed"


def test_every_use_of_a_closed_handles_data_raises_closed_error() -> None:
    """as_array, np.asarray, indexing and assignment on a closed handle raise ClosedError."""
    sa = SharedArray.allocate(3, "f8")
    sa.close()
    for use in (
        sa.as_array,
        lambda: np.asarray(sa),
        lambda: sa[0],
        lambda: sa.__setitem__(0, 1.0),
        lambda: iter(sa),
    ):
        with pytest.raises(ClosedError, match="closed"):
            use()


def test_a_closed_handle_keeps_its_metadata() -> None:
    """Name, shape, dtype and the rest of the layout stay readable after close."""
    sa = SharedArray.allocate((2, 3), "i4")
    name = sa.name
    sa.close()
    assert (sa.name, sa.shape, sa.dtype, sa.ndim, sa.size) == (name, (2, 3), np.dtype("i4"), 2, 6)
    assert sa.closed
    assert not sa.owner
