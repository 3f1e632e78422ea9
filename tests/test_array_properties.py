"""Property tests: every layout round-trips through copy -> attach -> as_array."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from numpy.typing import NDArray

from shared_memory_array import SharedArray
from shared_memory_array.testing import Layout, array_layouts, arrays, assert_same_array

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


def _is_fortran_only(array: NDArray[Any]) -> bool:
    return bool(array.flags.f_contiguous and not array.flags.c_contiguous)


@given(arrays())
def test_copy_attach_round_trip_keeps_data_dtype_shape_and_order(source: NDArray[Any]) -> None:
    """Any array (structured, 0-d, empty, strided, reversed, transposed) comes back equal."""
    with SharedArray.copy(None, source) as owner, SharedArray.attach(owner.name) as client:
        got = client.as_array()
        assert_same_array(got, source)
        assert got.flags.f_contiguous if _is_fortran_only(source) else got.flags.c_contiguous
        if got.size:
            assert client.strides == got.strides
        assert client.nbytes == got.nbytes == source.nbytes


@given(array_layouts())
def test_allocate_gives_zeroed_array_of_the_requested_layout(layout: Layout) -> None:
    """allocate(shape, dtype, order) gives exactly that layout, zero-filled, in any process."""
    shape, dtype, order = layout
    with SharedArray.allocate(None, shape, dtype, order=order) as owner:
        expected = np.zeros(shape, dtype=dtype, order=order)
        with SharedArray.attach(owner.name, shape=shape, dtype=dtype) as client:
            got = client.as_array()
            assert_same_array(got, expected)
            if got.size:  # numpy gives empty arrays arbitrary strides
                assert got.strides == expected.strides == client.strides
