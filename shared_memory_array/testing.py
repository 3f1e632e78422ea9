"""Hypothesis strategies for shared arrays, for this project's tests and for yours.

Needs the optional ``hypothesis`` package: ``pip install 'zero-copy-shared-memory[test]'``.
Without it, importing this module raises an ``ImportError`` that says so.

>>> from hypothesis import given
>>> from shared_memory_array.testing import arrays
>>> @given(arrays())
... def test_round_trip(source): ...
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ModuleNotFoundError as exc:  # only a missing Hypothesis; its own errors pass through
    if exc.name is None or exc.name.split(".")[0] != "hypothesis":
        raise
    # ModuleNotFoundError (an ImportError) so that pytest.importorskip skips quietly.
    raise ModuleNotFoundError(
        "shared_memory_array.testing needs Hypothesis, which is not installed: "
        "pip install 'zero-copy-shared-memory[test]'",
        name=exc.name,
    ) from exc

from ._array import SharedArray

__all__ = ["array_layouts", "arrays", "assert_same_array", "dtypes", "shapes", "shared_arrays"]

Layout = tuple[tuple[int, ...], np.dtype[Any], Literal["C", "F"]]


def _has_size(dtype: np.dtype[Any]) -> bool:
    return dtype.itemsize > 0 and not dtype.hasobject


def dtypes(*, structured: bool = True) -> st.SearchStrategy[np.dtype[Any]]:
    """Dtypes a shared array can hold: numeric, bool, datetimes, strings, bytes, and
    (with ``structured``) nested structured dtypes with subarray fields, packed or aligned.
    Both byte orders. Never object dtypes or zero-itemsize dtypes.
    """
    scalars = (
        hnp.scalar_dtypes()
        | hnp.byte_string_dtypes(max_len=8)
        | hnp.unicode_string_dtypes(max_len=4)
    )
    if not structured:
        return scalars.filter(_has_size)
    packed = hnp.nested_dtypes(subtype_strategy=scalars, max_leaves=6, max_itemsize=256)
    aligned = st.lists(
        st.tuples(st.sampled_from("abcdefgh"), scalars),
        min_size=1,
        max_size=4,
        unique_by=lambda f: f[0],
    ).map(lambda fields: np.dtype(fields, align=True))
    return (scalars | packed | aligned).filter(_has_size)


def shapes(*, max_dims: int = 4, max_side: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes from 0-d up to ``max_dims`` dimensions, zero-length axes included."""
    return hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side)


def array_layouts() -> st.SearchStrategy[Layout]:
    """``(shape, dtype, order)`` triples accepted by ``SharedArray.allocate``."""
    return st.tuples(shapes(), dtypes(), st.sampled_from(["C", "F"]))


@st.composite
def arrays(draw: st.DrawFn, *, max_bytes: int = 1 << 14) -> NDArray[Any]:
    """Arrays of any layout: C or F contiguous, or a non-contiguous view (a strided or
    reversed slice, a transpose) of a larger array. Element bytes are arbitrary bit
    patterns (NaN payloads, odd bools), so compare with :func:`assert_same_array`.
    """
    shape, dtype, order = draw(array_layouts())
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize > max_bytes:
        shape, count = (max_bytes // dtype.itemsize // 2,), max_bytes // dtype.itemsize // 2
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    base = (
        np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order=order).copy(order=order)
    )
    view = draw(st.sampled_from(["whole", "transpose", "step", "reverse"]))
    if view == "transpose":
        return base.T
    if view == "step" and base.ndim:
        return base[::2]
    if view == "reverse" and base.ndim:
        return base[::-1]
    return base


@st.composite
def shared_arrays(draw: st.DrawFn) -> SharedArray:
    """Owner handles holding a copy of an :func:`arrays` example.

    Each example owns a block: close it (or use it as a context manager) when
    done; blocks left open are unlinked when the process exits.
    """
    return SharedArray.copy(draw(arrays()))


def assert_same_array(actual: NDArray[Any], expected: NDArray[Any]) -> None:
    """Assert equal shape, dtype and element bits (NaN-safe; structured padding ignored)."""
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if actual.dtype.names:
        for field in actual.dtype.names:
            assert_same_array(actual[field], expected[field])
        return
    assert actual.tobytes() == expected.tobytes(), "element bytes differ"
