"""A SharedArray behaves like the ndarray it holds (API.md section 1, v3): NEP 13 and 18,
operators, ndarray attributes, conversions, and ``copy`` on the class and on an instance."""

from __future__ import annotations

import ast
import operator
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

import shared_memory_array._ndarray_like
from shared_memory_array import ClosedError, ManagedSharedMemoryArray, SharedArray

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


def attached(sa: SharedArray[Any]) -> SharedArray[Any]:
    """A second handle of the same block, attached by name (as another process would)."""
    return SharedArray.attach(sa.name)


def untyped(obj: object) -> Any:
    """``obj`` typed as Any where numpy accepts it but its stubs do not (a handle as ``out=``)."""
    return obj


# -- numpy's answer for the handle is its answer for the plain ndarray ----------------------

NUMERIC_DTYPES = (
    hnp.boolean_dtypes()
    | hnp.integer_dtypes()
    | hnp.unsigned_integer_dtypes()
    | hnp.floating_dtypes()
    | hnp.complex_number_dtypes()
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)

UNARY_UFUNCS = [
    np.negative,
    np.absolute,
    np.sqrt,
    np.exp,
    np.sin,
    np.square,
    np.sign,
    np.isnan,
    np.logical_not,
    np.invert,
    np.floor,
]
BINARY_UFUNCS = [
    np.add,
    np.subtract,
    np.multiply,
    np.true_divide,
    np.floor_divide,
    np.remainder,
    np.power,
    np.maximum,
    np.fmin,
    np.equal,
    np.less,
    np.arctan2,
    np.bitwise_and,
    np.logical_xor,
]
BINARY_OPERATORS = [
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.lt,
    operator.le,
    operator.eq,
    operator.ne,
    operator.gt,
    operator.ge,
    operator.and_,
    operator.or_,
    operator.xor,
]
UNARY_OPERATORS = [operator.neg, operator.pos, operator.abs, operator.invert]
IN_PLACE_OPERATORS = [
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ixor,
]
METHODS = ["sum", "prod", "min", "max", "mean", "std", "cumsum", "any", "all", "argmax", "tolist"]


@st.composite
def pairs(draw: st.DrawFn) -> tuple[NDArray[Any], NDArray[Any]]:
    """Two arrays of one random numeric dtype and shape (NaN, inf and extremes included)."""
    dtype, shape = draw(NUMERIC_DTYPES), draw(SHAPES)
    return draw(hnp.arrays(dtype, shape)), draw(hnp.arrays(dtype, shape))


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """``("ok", result)`` or ``("raised", exception type)``, with numpy's warnings silenced."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "ok", call()
        except Exception as exc:
            return "raised", type(exc)


def assert_same_outcome(got: tuple[str, Any], expected: tuple[str, Any]) -> None:
    """Same exception type, or results of the same type, dtype and values (NaN == NaN)."""
    assert got[0] == expected[0], (got, expected)
    if got[0] == "raised":
        assert got[1] is expected[1]
        return
    result, wanted = got[1], expected[1]
    assert type(result) is type(wanted)
    if isinstance(wanted, (np.ndarray, np.generic)):
        assert result.dtype == wanted.dtype
    np.testing.assert_array_equal(result, wanted)


@given(pairs(), st.sampled_from(UNARY_UFUNCS + UNARY_OPERATORS))
def test_unary_ufuncs_and_operators_match_the_ndarray(
    arrays: tuple[NDArray[Any], NDArray[Any]], func: Callable[[Any], Any]
) -> None:
    """func(sa) equals func(ndarray): same result type, dtype and values, or the same error."""
    a, _ = arrays
    with SharedArray.copy(a) as sa:
        assert_same_outcome(outcome(lambda: func(sa)), outcome(lambda: func(a)))


@given(pairs(), st.sampled_from(BINARY_UFUNCS + BINARY_OPERATORS))
def test_binary_ufuncs_and_operators_match_the_ndarray(
    arrays: tuple[NDArray[Any], NDArray[Any]], func: Callable[[Any, Any], Any]
) -> None:
    """func(sa, sb), func(sa, b), func(a, sb) and func(sa, 2) equal the same on ndarrays."""
    a, b = arrays
    with SharedArray.copy(a) as sa, SharedArray.copy(b) as sb:
        expected = outcome(lambda: func(a, b))
        assert_same_outcome(outcome(lambda: func(sa, sb)), expected)
        assert_same_outcome(outcome(lambda: func(sa, b)), expected)
        assert_same_outcome(outcome(lambda: func(a, sb)), expected)
        assert_same_outcome(outcome(lambda: func(sa, 2)), outcome(lambda: func(a, 2)))


@given(pairs(), st.sampled_from(IN_PLACE_OPERATORS))
def test_in_place_operators_match_the_ndarray(
    arrays: tuple[NDArray[Any], NDArray[Any]], func: Callable[[Any, Any], Any]
) -> None:
    """sa op= b leaves the block holding what a op= b leaves in a (or raises the same error)."""
    a, b = arrays
    with SharedArray.copy(a) as sa:
        plain = a.copy()
        expected = outcome(lambda: func(plain, b))
        got = outcome(lambda: func(sa, b))
        assert got[0] == expected[0], (got, expected)
        if got[0] == "raised":
            assert got[1] is expected[1]
        else:
            assert (got[1] is sa) == (expected[1] is plain)  # in place, or rebound as numpy does
            assert_same_outcome(("ok", sa.as_array()), ("ok", plain))


@given(pairs(), st.sampled_from(METHODS))
def test_forwarded_methods_match_the_ndarray(
    arrays: tuple[NDArray[Any], NDArray[Any]], method: str
) -> None:
    """sa.sum(), sa.max(), sa.tolist(), ... equal the ndarray's (or raise the same error)."""
    a, _ = arrays
    with SharedArray.copy(a) as sa:
        got = outcome(lambda: getattr(sa, method)())
        assert_same_outcome(got, outcome(lambda: getattr(a, method)()))


# -- out= and in-place operators write into shared memory ----------------------------------


def test_ufunc_out_handle_is_written_in_shared_memory_and_returned() -> None:
    """np.add(x, 1, out=sa) writes the block (a second handle sees it) and returns sa."""
    with SharedArray.allocate(4, "f8") as sa, attached(sa) as other:
        assert np.add(np.arange(4.0), 1, out=untyped(sa)) is sa
        np.testing.assert_array_equal(other.as_array(), [1, 2, 3, 4])
        assert np.multiply(sa, 2, out=untyped((sa,))) is sa
        np.testing.assert_array_equal(other.as_array(), [2, 4, 6, 8])
        assert np.add.reduce(np.ones((3, 4)), axis=0, out=untyped(sa)) is sa  # a ufunc method
        np.testing.assert_array_equal(other.as_array(), [3, 3, 3, 3])


def test_ufunc_with_two_outputs_returns_each_handle_in_its_place() -> None:
    """np.divmod(x, 3, out=(q, None)) returns (q, a new ndarray); q holds the quotients."""
    with SharedArray.allocate(3, "i8") as q:
        quotient, remainder = untyped(np.divmod(np.array([7, 8, 9]), 3, out=untyped((q, None))))
        assert quotient is q
        assert type(remainder) is np.ndarray
        np.testing.assert_array_equal(attached(q).as_array(), [2, 2, 3])
        np.testing.assert_array_equal(remainder, [1, 2, 0])


def test_array_function_out_handle_is_written_and_returned() -> None:
    """np.sum(x, axis=0, out=sa) and np.clip(sa, 0, 2, out=sa) write the block, return sa."""
    with SharedArray.allocate(3, "f8") as sa, attached(sa) as other:
        assert np.sum(np.arange(6.0).reshape(2, 3), axis=0, out=untyped(sa)) is sa
        np.testing.assert_array_equal(other.as_array(), [3, 5, 7])
        assert np.clip(sa, 0, 4, out=untyped(sa)) is sa
        np.testing.assert_array_equal(other.as_array(), [3, 4, 4])


def test_in_place_operators_write_shared_memory_and_keep_the_handle() -> None:
    """sa += 1 (and the other in-place operators) rebind sa to itself, written in place."""
    with SharedArray.copy(np.arange(4, dtype="i4")) as sa, attached(sa) as other:
        handle = sa
        sa += 1
        sa *= 3
        sa //= 2
        sa -= other  # an in-place operation with another handle of the same block
        assert sa is handle
        np.testing.assert_array_equal(other.as_array(), [0, 0, 0, 0])


def test_in_place_ufunc_at_writes_shared_memory() -> None:
    """np.add.at(sa, indices, 1) increments the block in place."""
    with SharedArray.allocate(3, "i8") as sa:
        np.add.at(sa, [0, 0, 2], 1)
        np.testing.assert_array_equal(attached(sa).as_array(), [2, 0, 1])


# -- results are ordinary ndarrays -----------------------------------------------------------


def test_ufuncs_operators_and_array_functions_return_ordinary_ndarrays() -> None:
    """np.sqrt(sa), sa + 1, sa @ sa, np.concatenate([sa, sa]) are ndarrays equal to numpy's."""
    source = np.arange(1.0, 5.0).reshape(2, 2)
    with SharedArray.copy(source) as sa:
        for got, expected in [
            (np.sqrt(sa), np.sqrt(source)),
            (sa + 1, source + 1),
            (1 - sa, 1 - source),
            (sa @ sa, source @ source),
            (-sa, -source),
            (np.concatenate([sa, sa]), np.concatenate([source, source])),
            (np.stack((sa, source)), np.stack((source, source))),
            (np.block([[sa, sa], [source, sa]]), np.block([[source] * 2] * 2)),
            (np.where(sa > 2, sa, 0), np.where(source > 2, source, 0)),
            (np.mean(sa, axis=1), source.mean(axis=1)),
        ]:
            assert type(got) is np.ndarray
            np.testing.assert_array_equal(got, expected)
        assert not np.shares_memory(sa + 0, sa.as_array())  # a new array, as on an ndarray
        assert np.shares_memory(sa, sa.as_array())  # np.shares_memory itself takes handles


def test_array_functions_reach_handles_in_any_sequence() -> None:
    """A handle inside a sequence numpy iterates but that is no list or tuple still works."""

    class Rows:
        def __init__(self, *rows: Any) -> None:
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, index: int) -> Any:
            return self.rows[index]

    with SharedArray.copy(np.arange(3)) as sa:
        np.testing.assert_array_equal(np.concatenate(Rows(sa, sa)), [0, 1, 2, 0, 1, 2])


def test_like_a_handle_makes_what_like_an_ndarray_makes() -> None:
    """np.asarray(x, like=sa) and np.ones(n, like=sa) give plain ndarrays, as like=ndarray."""
    with SharedArray.allocate(2, "f4") as sa:
        for got, expected in [
            (np.asarray([1, 2], like=sa), np.asarray([1, 2])),
            (np.ones(3, like=sa), np.ones(3)),
            (np.arange(4, like=sa), np.arange(4)),
        ]:
            assert type(got) is np.ndarray
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


def test_another_duck_arrays_override_receives_plain_ndarrays() -> None:
    """Mixed with a foreign duck array, numpy is called again with the handle's view."""
    seen: list[type[Any]] = []

    class Duck:
        def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
            seen.extend(type(value) for value in inputs)
            return "duck ufunc"

        def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
            seen.extend(type(value) for value in args[0])
            return "duck function"

    with SharedArray.copy(np.arange(3)) as sa:
        assert np.add(sa, untyped(Duck())) == "duck ufunc"
        assert np.concatenate([sa, Duck()]) == "duck function"
    assert seen == [np.ndarray, Duck, np.ndarray, Duck]


# -- comparisons and hashing, as on an ndarray ----------------------------------------------


def test_comparisons_are_element_wise_between_handles_and_with_anything() -> None:
    """sa == sa2 compares elements (also of two blocks); sa == "x" is all False like ndarray."""
    source = np.array([1, 2, 3])
    with SharedArray.copy(source) as sa, SharedArray.copy(np.array([1, 0, 3])) as sa2:
        for got, expected in [
            (sa == sa2, [True, False, True]),
            (sa != sa2, [False, True, False]),
            (sa == attached(sa), [True, True, True]),
            (sa < sa2, [False, False, False]),
            (sa >= 2, [False, True, True]),
            ([1, 2, 4] == sa, [True, True, False]),  # noqa: SIM300 - the reflected one
            (sa == "x", source == "x"),
            (sa != None, source != None),  # noqa: E711 - the element-wise comparison
        ]:
            assert type(got) is np.ndarray
            np.testing.assert_array_equal(got, expected)


def test_handles_are_unhashable_like_ndarrays() -> None:
    """== is element-wise, so a handle (and its managed wrapper) is unhashable, as an ndarray."""
    with SharedArray.allocate(2, "f8") as sa:
        for obj in (sa, sa.managed(), np.zeros(2)):
            with pytest.raises(TypeError, match="unhashable"):
                hash(obj)
            with pytest.raises(TypeError, match="unhashable"):
                {obj}  # noqa: B018


# -- ndarray attributes and methods act on the view, without copying ------------------------


def test_forwarded_attributes_are_views_of_shared_memory() -> None:
    """sa.T, sa.reshape, sa.ravel, sa.real, sa.view share the block's memory: no copy."""
    with SharedArray.copy(np.arange(6.0).reshape(2, 3)) as sa:
        view = sa.as_array()
        for derived in (sa.T, sa.reshape(3, 2), sa.ravel(), sa.real, sa.view("u8")):
            assert type(derived) is np.ndarray
            assert np.shares_memory(derived, view)
        assert sa.T.shape == (3, 2)
        assert (sa.itemsize, sa.size, sa.ndim) == (8, 6, 2)
        assert sa.flags.c_contiguous
        assert sa.tolist() == view.tolist()
        assert float(sa.sum()) == 15.0
        assert sa.mean() == 2.5
        assert type(sa.max()) is np.float64


def test_in_place_methods_write_into_shared_memory() -> None:
    """sa.fill and sa.sort change the block: another handle sees it."""
    with SharedArray.copy(np.array([3, 1, 2])) as sa, attached(sa) as other:
        sa.sort()
        np.testing.assert_array_equal(other.as_array(), [1, 2, 3])
        sa.fill(7)
        np.testing.assert_array_equal(other.as_array(), [7, 7, 7])


def test_only_public_ndarray_names_are_forwarded() -> None:
    """Private, dunder and non-ndarray names raise AttributeError, never reach the view."""
    with SharedArray.allocate(2, "f8") as sa:
        for name in ("_private", "__dunder__", "__array_interface__", "no_such", "count"):
            assert not hasattr(sa, name)
        with pytest.raises(AttributeError, match="no_such"):
            sa.no_such  # type: ignore[attr-defined]  # noqa: B018
        assert {"sum", "T", "reshape", "name", "as_array"} <= set(dir(sa))


def test_every_public_ndarray_name_is_declared_for_type_checkers() -> None:
    """Each ndarray name the handle forwards is declared in NDArrayLike's TYPE_CHECKING block."""
    source = Path(shared_memory_array._ndarray_like.__file__).read_text()
    mixin = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name == "NDArrayLike"
    )
    block = next(node for node in mixin.body if isinstance(node, ast.If))
    declared = {
        node.name if isinstance(node, ast.FunctionDef) else node.target.id  # type: ignore[union-attr]
        for node in block.body
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign))
    }
    forwarded = {name for name in dir(np.ndarray) if not name.startswith("_")}
    removed_in_numpy_2 = {"itemset", "newbyteorder", "ptp", "tostring"}  # forwarded on 1.x
    assert forwarded - set(dir(SharedArray)) - removed_in_numpy_2 <= declared


# -- conversions ---------------------------------------------------------------------------


def test_conversions_and_membership_follow_the_ndarray() -> None:
    """bool, int, float, complex, operator.index and `in` give what the view gives."""
    with (
        SharedArray.copy(np.array(0.0)) as zero,
        SharedArray.copy(np.array(3, dtype="i2")) as three,
        SharedArray.copy(np.array([1.5, 2.5])) as pair,
    ):
        assert bool(zero) is False
        assert bool(three) is True
        with pytest.raises(ValueError, match="ambiguous"):
            bool(pair)
        assert (int(three), float(three), complex(three)) == (3, 3.0, 3 + 0j)
        assert operator.index(three) == 3
        assert list(range(5))[three] == 3
        assert 2.5 in pair
        assert 4.0 not in pair
        with pytest.raises(TypeError):
            operator.index(zero)  # as np.array(0.0): not an integer


# -- copy: the constructor on the class, numpy's copy() on an instance ---------------------


def test_instance_copy_is_a_private_ndarray() -> None:
    """sa.copy() is an ndarray that shares nothing: its writes never reach the block."""
    with SharedArray.copy(np.arange(6).reshape(2, 3)) as sa, attached(sa) as other:
        private = sa.copy()
        assert type(private) is np.ndarray
        assert not np.shares_memory(private, sa.as_array())
        private[:] = -1
        np.testing.assert_array_equal(other.as_array(), np.arange(6).reshape(2, 3))
        fortran = sa.copy(order="F")
        assert fortran.flags.f_contiguous
        assert not fortran.flags.c_contiguous
        np.testing.assert_array_equal(fortran, sa)
        assert np.copy(sa).tolist() == sa.tolist()


def test_class_copy_is_still_the_constructor() -> None:
    """SharedArray.copy(arr) (and with a manager first) builds an owner handle as before."""
    source = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    with SharedArray.copy(source) as sa, SharedArray.copy(None, array=source) as sb:
        for handle in (sa, sb):
            assert isinstance(handle, SharedArray)
            assert handle.owner
            assert handle.as_array().flags.f_contiguous
            np.testing.assert_array_equal(handle.as_array(), source)
        with SharedArray.copy(sa) as again:  # a handle is an array-like too
            np.testing.assert_array_equal(again.as_array(), source)
    assert untyped(SharedArray.copy).__name__ == "copy"
    assert "copy of ``array``" in (SharedArray.__dict__["copy"].__doc__ or "")


# -- closed handles ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use",
    [
        lambda sa: sa.sum(),
        lambda sa: sa.T,
        lambda sa: sa.copy(),
        lambda sa: sa + 1,
        lambda sa: np.sqrt(sa),
        lambda sa: np.concatenate([sa, sa]),
        lambda sa: np.add(1, 2, out=untyped(sa)),
        lambda sa: sa == 0,
        lambda sa: bool(sa),
        lambda sa: float(sa),
        lambda sa: 0 in sa,
    ],
)
def test_numpy_uses_of_a_closed_handle_raise_closed_error(use: Callable[[Any], Any]) -> None:
    """Attributes, methods, operators, ufuncs and array functions on a closed handle raise."""
    sa = SharedArray.allocate(1, "f8")
    sa.close()
    with pytest.raises(ClosedError, match="closed"):
        use(sa)


def test_a_closed_handle_is_still_introspectable() -> None:
    """hasattr of a non-ndarray name, repr and dir still work on a closed handle."""
    sa = SharedArray.allocate(1, "f8")
    sa.close()
    assert not hasattr(sa, "no_such")
    assert "closed" in repr(sa)
    assert "sum" in dir(sa)


# -- ManagedSharedMemoryArray feels the same -------------------------------------------------


def test_managed_wrapper_behaves_like_the_ndarray_too() -> None:
    """m + 1, np.sqrt(m), m.sum(), m == m, out=m and m.copy() act on the handle's view."""
    sa = SharedArray.copy(np.array([1.0, 4.0, 9.0]))
    managed = sa.managed()
    assert isinstance(managed, ManagedSharedMemoryArray)
    with managed, attached(sa) as other:
        np.testing.assert_array_equal(managed + 1, [2, 5, 10])
        np.testing.assert_array_equal(np.sqrt(managed), [1, 2, 3])
        assert managed.sum() == 14
        np.testing.assert_array_equal(managed == sa, [True, True, True])
        assert managed.T.shape == (3,)
        assert np.sqrt(managed, out=untyped(managed)) is managed
        managed += 1
        np.testing.assert_array_equal(other.as_array(), [2, 3, 4])
        private = managed.copy()
        private[:] = 0
        assert type(private) is np.ndarray
        np.testing.assert_array_equal(other.as_array(), [2, 3, 4])
    assert sa.closed
    with pytest.raises(ClosedError):
        managed.sum()


def test_iteration_helpers_still_work(tmp_path: Path) -> None:
    """Iterating, reversed(), np.save and tofile see the handle as the array it holds."""
    with SharedArray.copy(np.arange(3)) as sa:
        assert [int(x) for x in reversed(sa)] == [2, 1, 0]
        rows: Iterator[Any] = iter(sa)
        assert next(rows) == 0
        np.save(tmp_path / "a.npy", sa)
        np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), [0, 1, 2])
