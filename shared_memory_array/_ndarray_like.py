"""Handles that behave like the ndarray they hold, without being one (API.md section 1, v3).

A :class:`~shared_memory_array.SharedArray` cannot be an ndarray subclass: it
pickles as a name, it can be closed, and its lifetime is the block's. So it
behaves like its zero-copy view, ``as_array()``, through numpy's override
protocols instead. :class:`NDArrayLike` is that behaviour, for any class with an
``as_array()``:

* **NEP 13** (``__array_ufunc__``) and the operators it gives through
  :class:`numpy.lib.mixins.NDArrayOperatorsMixin` (``+``, ``@``, ``<``, ``+=``, ...);
  ``==``, ``!=`` and ``**`` are the view's own, which do more than call the ufunc.
* **NEP 18** (``__array_function__``): ``np.concatenate([sa, sa])``, ``np.mean(sa)``,
  and ``like=sa`` (``np.ones(3, like=sa)`` is what ``like=`` an ndarray makes).
* **Attributes**: public ndarray attributes and methods the class does not define
  itself (``sum``, ``T``, ``reshape``, ``itemsize``, ...) are read from the view.
  Private and dunder names are never forwarded.
* **Conversions**: ``bool``, ``int``, ``float``, ``complex``, ``operator.index``
  and ``in`` as on the view.

Rules, for every entry point:

* Each handle among the arguments (also inside lists and tuples, at any depth,
  and in keyword arguments) is replaced by its view and numpy is called again,
  so the answer is exactly numpy's for the plain ndarray, and another duck
  array's override (Dask's, say) sees a plain ndarray.
* Results are what numpy returns: ndarrays and numpy scalars, never a handle,
  except a handle passed as ``out=``: the result is written into its view (so
  into shared memory) and the handle itself is returned, as numpy returns
  ``out``. An ``out`` passed by position to an array function is written the
  same way, but the view comes back (numpy cannot tell which argument it was).
* Nothing here copies: the view is ``as_array()``, which maps, never copies. A
  closed handle raises :class:`~shared_memory_array.ClosedError` from it.
* Like an ndarray, a handle is unhashable (``==`` is element-wise).

:class:`ConstructorOrCopy` makes ``copy`` two things, as API.md asks: on the
class, the constructor ``SharedArray.copy(array)``; on an instance, numpy's
``copy()``, a private ndarray.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Literal,
    Protocol,
    SupportsIndex,
    TypeAlias,
    overload,
)

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin
from numpy.typing import NDArray
from typing_extensions import TypeVar

if TYPE_CHECKING:
    from multiprocessing.managers import SharedMemoryManager

    from numpy.typing import ArrayLike, DTypeLike

    from ._array import SharedArray, _ArrayOf

__all__ = ["ConstructorOrCopy", "CopyConstructor", "NDArrayCopy", "NDArrayLike"]

_ScalarT = TypeVar("_ScalarT", bound=np.generic)
_ScalarT_co = TypeVar("_ScalarT_co", bound=np.generic, covariant=True, default=Any)
_ConstructorT = TypeVar("_ConstructorT")
_Order: TypeAlias = Literal["K", "A", "C", "F"]

# What __getattr__ forwards: the installed numpy's public ndarray attributes.
_NDARRAY_NAMES: frozenset[str] = frozenset(
    name for name in dir(np.ndarray) if not name.startswith("_")
)


def _unwrap(obj: Any) -> Any:
    """``obj`` with each handle replaced by its view, in lists and tuples too.

    A list or tuple is rebuilt only if it held a handle, so anything else comes
    back as the very same object.
    """
    if isinstance(obj, NDArrayLike):
        return obj.as_array()
    if type(obj) is list or type(obj) is tuple:
        items = [_unwrap(item) for item in obj]
        if any(new is not old for new, old in zip(items, obj, strict=True)):
            return type(obj)(items)
    return obj


def _unwrap_out(out: Any, swaps: list[tuple[NDArray[Any], NDArrayLike[Any]]]) -> Any:
    """``out`` (one output or a tuple of them) with handles replaced by their views.

    Appends ``(view, handle)`` to ``swaps`` for each, so the result can give the
    handle back where numpy returns the view.
    """
    if isinstance(out, NDArrayLike):
        view = out.as_array()
        swaps.append((view, out))
        return view
    if type(out) is tuple:
        return tuple(_unwrap_out(item, swaps) for item in out)
    return out


def _rewrap(result: Any, swaps: list[tuple[NDArray[Any], NDArrayLike[Any]]]) -> Any:
    """``result`` with each view that was an ``out=`` handle's replaced by that handle."""
    if not swaps:
        return result
    if type(result) is tuple:
        return tuple(_rewrap(item, swaps) for item in result)
    for view, handle in swaps:
        if result is view:
            return handle
    return result


class NDArrayLike(NDArrayOperatorsMixin, Generic[_ScalarT_co]):
    """Mixin: the ndarray behaviour of a handle whose ``as_array()`` is its zero-copy view.

    The class provides ``as_array()`` (it may raise
    :class:`~shared_memory_array.ClosedError`); this mixin provides the rest, as
    the module docstring says. Generic in the scalar type, like the view.
    """

    __slots__ = ()

    # Like numpy.ndarray: == is element-wise, so instances cannot be dict keys or set members.
    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    if TYPE_CHECKING:
        # Provided by the class (ManagedSharedMemoryArray forwards it to its handle).
        def as_array(self) -> NDArray[_ScalarT_co]: ...

        # What __getattr__ forwards, declared name by name rather than by a __getattr__ that
        # type checkers see: that one would give the handle every attribute, so it would
        # match every protocol (numpy's nested-sequence one too, which turns np.asarray(sa)
        # into NDArray[T | Any]) and typos would pass. tests/test_ndarray_like.py checks
        # that every public ndarray name the handle lacks is here. Typed where it helps:
        @property
        def T(self) -> NDArray[_ScalarT_co]: ...  # noqa: N802 (numpy's name)
        @property
        def mT(self) -> NDArray[_ScalarT_co]: ...  # noqa: N802
        @property
        def itemsize(self) -> int: ...
        @property
        def base(self) -> NDArray[Any] | None: ...
        @property
        def data(self) -> memoryview: ...
        def reshape(self, *shape: Any, **kwargs: Any) -> NDArray[_ScalarT_co]: ...
        def ravel(self, order: _Order = "C") -> NDArray[_ScalarT_co]: ...
        def flatten(self, order: _Order = "C") -> NDArray[_ScalarT_co]: ...
        def squeeze(self, axis: Any = None) -> NDArray[_ScalarT_co]: ...
        def swapaxes(self, axis1: SupportsIndex, axis2: SupportsIndex) -> NDArray[_ScalarT_co]: ...
        def transpose(self, *axes: Any) -> NDArray[_ScalarT_co]: ...
        def astype(self, dtype: DTypeLike, *args: Any, **kwargs: Any) -> NDArray[Any]: ...
        def tobytes(self, order: _Order = "C") -> bytes: ...
        def tolist(self) -> Any: ...
        def item(self, *args: Any) -> Any: ...
        def fill(self, value: Any) -> None: ...

        # ... and Any for the rest.
        all: Any
        any: Any
        argmax: Any
        argmin: Any
        argpartition: Any
        argsort: Any
        byteswap: Any
        choose: Any
        clip: Any
        compress: Any
        conj: Any
        conjugate: Any
        ctypes: Any
        cumprod: Any
        cumsum: Any
        device: Any
        diagonal: Any
        dot: Any
        dump: Any
        dumps: Any
        flags: Any
        flat: Any
        getfield: Any
        imag: Any
        max: Any
        mean: Any
        min: Any
        nonzero: Any
        partition: Any
        prod: Any
        put: Any
        real: Any
        repeat: Any
        resize: Any
        round: Any
        searchsorted: Any
        setfield: Any
        setflags: Any
        sort: Any
        std: Any
        sum: Any
        take: Any
        to_device: Any
        tofile: Any
        trace: Any
        var: Any
        view: Any

    # -- NEP 13 and NEP 18 --------------------------------------------------------------

    def __array_ufunc__(
        self,
        ufunc: np.ufunc,
        method: Literal["__call__", "reduce", "reduceat", "accumulate", "outer", "at"],
        *inputs: Any,
        **kwargs: Any,
    ) -> Any:
        """Apply ``ufunc`` to the views of the handles among its operands.

        A handle in ``out`` (numpy always passes ``out`` as a tuple here) is
        written through its view and returned in place of it.
        """
        swaps: list[tuple[NDArray[Any], NDArrayLike[Any]]] = []
        kwargs = {
            key: _unwrap_out(value, swaps) if key == "out" else _unwrap(value)
            for key, value in kwargs.items()
        }
        result = getattr(ufunc, method)(*(_unwrap(value) for value in inputs), **kwargs)
        return _rewrap(result, swaps)

    def __array_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call ``func`` again with the handles among its arguments replaced by their views."""
        swaps: list[tuple[NDArray[Any], NDArrayLike[Any]]] = []
        new_kwargs = {
            key: _unwrap_out(value, swaps) if key == "out" else _unwrap(value)
            for key, value in kwargs.items()
        }
        new_args = _unwrap(args)
        if new_args is args and all(new_kwargs[key] is kwargs[key] for key in kwargs):
            implementation = getattr(func, "_implementation", None)
            if implementation is None:
                # like=handle (np.ones(3, like=sa)): numpy passes the arguments without
                # it, and without it the function makes what like=ndarray makes.
                return func(*args, **kwargs)
            # The handle sits where _unwrap does not look (a custom sequence): calling func
            # again would come back here. numpy's own code reads it through __array__.
            return implementation(*args, **kwargs)
        return _rewrap(func(*new_args, **new_kwargs), swaps)

    # Where ndarray's operator does more than call the ufunc, the view's own operator
    # instead of the mixin's: == and != fall back to element-wise False/True where np.equal
    # has no loop (sa == "x"), and ** takes shortcuts (x ** 2 is np.square(x): bool ** 2
    # is int8 there, int64 from np.power).
    def __eq__(self, other: object) -> Any:
        return self.as_array() == _unwrap(other)

    def __ne__(self, other: object) -> Any:
        return self.as_array() != _unwrap(other)

    def __pow__(self, other: Any) -> Any:
        return self.as_array() ** _unwrap(other)

    def __ipow__(self, other: Any) -> Any:
        view: Any = self.as_array()
        result = view
        result **= _unwrap(other)  # a new array only where ndarray's own **= falls back to **
        return self if result is view else result

    # -- conversions, as on the view ------------------------------------------------------

    def __bool__(self) -> bool:
        """Truth of the view: its one element, or ``ValueError`` for several, like ndarray."""
        return bool(self.as_array())

    def __int__(self) -> int:
        return int(self.as_array())

    def __float__(self) -> float:
        return float(self.as_array())

    def __complex__(self) -> complex:
        return complex(self.as_array())

    def __index__(self) -> int:
        return operator.index(self.as_array())

    def __contains__(self, value: object) -> bool:
        return value in self.as_array()

    # -- ndarray attributes -----------------------------------------------------------------

    if not TYPE_CHECKING:  # hidden from type checkers: see the declarations above

        def __getattr__(self, name: str) -> Any:
            """A public ndarray attribute or method that the class lacks, read from the view.

            Raises
            ------
            AttributeError
                ``name`` is private, a dunder, or not an ndarray attribute.
            ClosedError
                ``name`` is an ndarray attribute and the handle is closed.
            """
            if name.startswith("_") or name not in _NDARRAY_NAMES:
                raise AttributeError(
                    f"{type(self).__name__!r} object has no attribute {name!r}",
                    name=name,
                    obj=self,
                )
            return getattr(self.as_array(), name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | _NDARRAY_NAMES)


# -- copy: the constructor on the class, numpy's copy() on an instance -----------------------


class NDArrayCopy(Protocol[_ScalarT_co]):
    """``copy`` read from an instance: numpy's ``ndarray.copy`` of the view (a private copy)."""

    def __call__(self, order: _Order = "C") -> NDArray[_ScalarT_co]: ...


class ConstructorOrCopy(Generic[_ConstructorT]):
    """A descriptor: ``Cls.copy`` is the classmethod it wraps, ``instance.copy`` numpy's copy.

    Parameters
    ----------
    constructor
        A ``classmethod`` object. ``_ConstructorT`` is how type checkers see it
        bound to the class (a Protocol with its overloads, such as
        :class:`CopyConstructor`): mypy cannot carry a classmethod's overloads
        through a descriptor on its own.
    """

    def __init__(self, constructor: Any) -> None:
        self._constructor = constructor
        self.__doc__ = constructor.__func__.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        # The constructor answers to the name it is read by (help(), repr()).
        function = self._constructor.__func__
        function.__name__, function.__qualname__ = name, f"{owner.__qualname__}.{name}"

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> _ConstructorT: ...
    @overload
    def __get__(
        self, instance: NDArrayLike[_ScalarT], owner: type[Any] | None = None
    ) -> NDArrayCopy[_ScalarT]: ...
    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self._constructor.__get__(None, owner)
        # Bound to this view: a closed handle raises ClosedError here, as other methods do.
        return instance.as_array().copy


class CopyConstructor(Protocol):
    """The signatures of ``SharedArray.copy`` on the class, for type checkers.

    ``copy(manager, array)`` or ``copy(array)``; an array with a known scalar
    type (an ``NDArray[T]``, a ``SharedArray[T]``) gives a ``SharedArray[T]``.
    """

    @overload
    def __call__(
        self,
        manager: SharedMemoryManager | None,
        array: _ArrayOf[_ScalarT],
        *,
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    def __call__(
        self, manager: SharedMemoryManager | None, array: ArrayLike, *, name: str | None = None
    ) -> SharedArray[Any]: ...
    @overload
    def __call__(
        self, array: _ArrayOf[_ScalarT], *, name: str | None = None
    ) -> SharedArray[_ScalarT]: ...
    @overload
    def __call__(self, array: ArrayLike, *, name: str | None = None) -> SharedArray[Any]: ...
