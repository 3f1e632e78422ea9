"""SharedArray: one numpy array in one named shared-memory block.

A block of kind ``array`` is ``[header][payload]``: the header (see ``_header``)
records dtype, shape, strides and order, so :meth:`SharedArray.attach` needs
only the name. The payload is C- or Fortran-contiguous and starts 64-byte
aligned.

Validation lives in one place, :meth:`ArrayLayout.parse`. The public
constructors parse their arguments there and call the same private cores
(``_create``, ``_attach``) that the ``_unsafe`` variants call directly with
unvalidated arguments. The header itself is always checked for bounds, also by
``attach_unsafe``: a wrong guess there would be a crash, not a wrong answer.

Every constructor but ``attach`` takes an optional leading ``manager``; which
argument is the manager is decided in one place too, :func:`_leading_manager`,
for the validated and the ``_unsafe`` variants alike.

Where the copies and page faults are
------------------------------------
* ``allocate``: no copy; pages are reserved (``posix_fallocate``) and mapped
  up front (``MAP_POPULATE``), so first writes take no page faults.
* ``copy``: exactly one copy. A source already in the block's memory order
  goes in by ``pwrite`` (the kernel fills the reserved pages; the owner's
  mapping takes no faults until it touches them); any other source is copied
  by ``numpy.copyto`` into a populated mapping.
* ``attach`` and ``as_array``: no copy and no page touched beyond the header:
  O(1) whatever the size. The attaching process takes a minor fault per page
  (the page is already in memory) on first access.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import managers
from multiprocessing.managers import BaseManager, SharedMemoryManager
from types import TracebackType
from typing import (
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    Protocol,
    SupportsIndex,
    TypeAlias,
    overload,
)

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from typing_extensions import Self, TypeVar

from ._block import SharedBlock, new_name
from ._handle import BlockHandle
from ._header import (
    BlockKind,
    Header,
    HeaderFlags,
    descr_text,
    encode_header,
    header_size_for,
)
from ._ndarray_like import ConstructorOrCopy, CopyConstructor, NDArrayLike
from ._shm_view import SharedMemoryView
from ._waiting import deadline_of
from .errors import ClosedError, LayoutError

__all__ = [
    "ArrayLayout",
    "ManagedSharedMemoryArray",
    "SharedArray",
    "SharedMemoryArray",
    "parse_dtype",
    "parse_shape",
]

ShapeLike: TypeAlias = SupportsIndex | Iterable[SupportsIndex]
OrderLike: TypeAlias = Literal["C", "F", "c", "f"]
_MAX_NBYTES = (1 << 63) - 1

# The scalar type a SharedArray holds, as in numpy's NDArray[np.float32]. Covariant like
# ndarray's; the default makes a bare ``SharedArray`` mean ``SharedArray[Any]``.
_ScalarT = TypeVar("_ScalarT", bound=np.generic)
_ScalarT_co = TypeVar("_ScalarT_co", bound=np.generic, covariant=True, default=Any)

# A dtype argument that fixes the scalar type: np.float32 or np.dtype(np.float32).
_DTypeOf: TypeAlias = "type[_ScalarT] | np.dtype[_ScalarT]"


class _ArrayOf(Protocol[_ScalarT_co]):
    """Anything ``np.asarray`` turns into an ``NDArray[T]``: an ndarray, a SharedArray."""

    def __array__(self) -> NDArray[_ScalarT_co]: ...


class _Unset:
    """The type of ``_UNSET``, the default of parameters that may move (``_leading_manager``)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Final[Any] = _Unset()


def parse_shape(shape: ShapeLike) -> tuple[int, ...]:
    """Normalise an int or an iterable of ints to a tuple of non-negative ints."""
    if isinstance(shape, Iterable) and not isinstance(shape, (str, bytes)):
        dims = tuple(operator.index(d) for d in shape)
    elif hasattr(type(shape), "__index__"):
        dims = (operator.index(shape),)  # type: ignore[arg-type]
    else:
        raise TypeError(f"shape must be an int or an iterable of ints, not {type(shape).__name__}")
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed: shape {dims}")
    if len(dims) > 64:
        raise ValueError(f"at most 64 dimensions are supported, got {len(dims)}")
    return dims


def parse_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """Normalise a dtype-like to a dtype that can live in shared memory."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(
            f"dtype {dt} holds Python objects, which cannot be shared between processes"
        )
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has itemsize 0; give it a size")
    return dt


def _contiguous_strides(shape: tuple[int, ...], itemsize: int, fortran: bool) -> tuple[int, ...]:
    """Strides numpy gives a contiguous array (zero-length dimensions count as 1)."""
    strides = [0] * len(shape)
    step = itemsize
    for axis in range(len(shape)) if fortran else reversed(range(len(shape))):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """Shape, dtype and memory order of a contiguous array, normalised once.

    Build it with :meth:`parse` (validates) or :meth:`of` (from an ndarray).
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool = False

    @classmethod
    def parse(cls, shape: ShapeLike, dtype: DTypeLike, order: str = "C") -> ArrayLayout:
        """Validate and normalise user arguments: the one place arguments are checked.

        Raises
        ------
        TypeError
            ``shape`` is not an int or an iterable of ints, or ``dtype`` holds
            Python objects (they cannot live in shared memory).
        ValueError
            A negative dimension, a zero-itemsize dtype, an unknown ``order``,
            or a size that does not fit in 63 bits.
        """
        dims = parse_shape(shape)
        dt = parse_dtype(dtype)
        if order not in ("C", "F", "c", "f"):
            raise ValueError(f"order must be 'C' or 'F', not {order!r}")
        nbytes = dt.itemsize * math.prod(dims)
        if nbytes > _MAX_NBYTES:
            raise ValueError(f"array of shape {dims} and dtype {dt} is too big ({nbytes} bytes)")
        return cls(dims, dt, order in ("F", "f") and len(dims) > 1)

    @classmethod
    def of(cls, array: NDArray[Any]) -> ArrayLayout:
        """Layout for a contiguous copy of ``array``, keeping Fortran order if it has it."""
        fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)
        return cls(tuple(array.shape), array.dtype, fortran)

    @property
    def nbytes(self) -> int:
        """Bytes of the payload."""
        return self.dtype.itemsize * math.prod(self.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the contiguous payload, in bytes."""
        return _contiguous_strides(self.shape, self.dtype.itemsize, self.fortran_order)

    @property
    def order(self) -> Literal["C", "F"]:
        """``"F"`` for Fortran order, else ``"C"``."""
        return "F" if self.fortran_order else "C"

    def header(self, name: str = "") -> bytes:
        """Encode the block header for this layout (``name``: the block's name)."""
        flags = HeaderFlags.READY | (HeaderFlags.F_ORDER if self.fortran_order else 0)
        return encode_header(
            BlockKind.ARRAY,
            dtype=self.dtype,
            shape=self.shape,
            strides=self.strides,
            nbytes=self.nbytes,
            flags=HeaderFlags(flags),
            name=name,
        )

    @classmethod
    def from_header(cls, header: Header, name: str) -> ArrayLayout:
        """The layout a parsed array header describes; LayoutError if it is not one we write."""
        layout = _layouts.get(header)
        if layout is None:
            layout = cls._from_header(header, name)
            if len(_layouts) >= 512:
                _layouts.clear()
            _layouts[header] = layout  # a header whose layout checked out once always does
        return layout

    @classmethod
    def _from_header(cls, header: Header, name: str) -> ArrayLayout:
        if header.dtype is None:
            raise LayoutError(f"array block {name!r} has no dtype in its header")
        if header.dtype.itemsize == 0:
            raise LayoutError(f"array block {name!r}: dtype {header.dtype} has itemsize 0")
        layout = cls(header.shape, header.dtype, header.fortran_order)
        if header.strides != layout.strides or header.nbytes != layout.nbytes:
            raise LayoutError(
                f"array block {name!r}: strides {header.strides} and nbytes {header.nbytes} "
                f"are not those of a contiguous {layout.order}-order array of shape "
                f"{layout.shape} and dtype {layout.dtype}"
            )
        return layout


_layouts: dict[Header, ArrayLayout] = {}


def _raw_bytes(source: NDArray[Any], layout: ArrayLayout) -> memoryview | None:
    """The bytes of ``source`` as the block stores them, if they are contiguous (no copy)."""
    flags = source.flags
    if not (flags.f_contiguous if layout.fortran_order else flags.c_contiguous):
        return None
    return source.ravel(order="K").view(np.uint8).data


def _track_in_manager(manager: SharedMemoryManager, name: str) -> None:
    """Have ``manager`` unlink block ``name`` when it shuts down.

    Uses the same private channel as ``SharedMemoryManager.SharedMemory``
    (``track_segment``), stable since Python 3.8.
    """
    with manager._Client(manager._address, authkey=manager._authkey) as conn:  # type: ignore[attr-defined]
        managers.dispatch(conn, None, "track_segment", (name,))  # type: ignore[attr-defined]


def _release_from_manager(manager: SharedMemoryManager, name: str) -> bool:
    """Ask ``manager`` to unlink ``name`` and stop tracking it; ``False`` if it cannot."""
    try:
        with manager._Client(manager._address, authkey=manager._authkey) as conn:  # type: ignore[attr-defined]
            managers.dispatch(conn, None, "release_segment", (name,))  # type: ignore[attr-defined]
    except Exception:  # manager gone, or the block already gone: the caller unlinks
        return False
    return True


def _leading_manager(
    method: str, first: Any, names: tuple[str, ...], *rest: Any
) -> tuple[SharedMemoryManager | None, tuple[Any, ...]]:
    """Sort out a constructor's optional leading ``manager``: the one place that does.

    ``first`` is what was bound to ``manager``, ``rest`` what was bound to the
    parameters ``names`` after it (``_UNSET`` where nothing was). ``first`` is the
    manager only when it is ``None`` or a ``SharedMemoryManager``; anything else
    was meant for the first of ``names``, so it takes that place and the values
    given move one parameter on, into the first one left unset.

    Raises
    ------
    TypeError
        ``first`` is another kind of multiprocessing manager, or, taken as
        ``names[0]``, it leaves one argument more than there are parameters.
    ValueError
        The ``SharedMemoryManager`` has not been started.
    """
    if first is None:
        return None, rest
    if isinstance(first, SharedMemoryManager):
        if getattr(first, "_address", None) is None:
            raise ValueError("the SharedMemoryManager has not been started")
        return first, rest
    if isinstance(first, BaseManager):
        raise TypeError(
            "manager must be a multiprocessing.managers.SharedMemoryManager or None, "
            f"not {type(first).__name__}"
        )
    free = next((i for i, value in enumerate(rest) if value is _UNSET), None)
    if free is None:
        raise TypeError(
            f"{method}() got a {type(first).__name__} where the manager goes, so it was "
            f"taken as {names[0]!r}, which leaves one argument too many for "
            f"({', '.join(names)}); a manager must be None or a SharedMemoryManager"
        )
    return None, (first, *rest[:free], *rest[free + 1 :])


def _check_safe(layout: ArrayLayout) -> None:
    """What even the ``_unsafe`` constructors check: a layout that cannot crash the encoder."""
    if any(d < 0 for d in layout.shape) or len(layout.shape) > 64:
        raise ValueError(f"shape {layout.shape} has a negative dimension or too many")
    if layout.nbytes > _MAX_NBYTES:
        raise ValueError(f"array of shape {layout.shape} is too big ({layout.nbytes} bytes)")


def _default_dtype(dtype: Any) -> Any:
    """``float64`` where no dtype was given, as ``numpy.zeros`` does."""
    return np.float64 if dtype is _UNSET else dtype


# NDArrayLike first: its __eq__, __hash__, __bool__, __getattr__ and __dir__ (the handle
# behaves like its view: ufuncs, operators, array functions, ndarray attributes) win over
# the handle base's defaults; see _ndarray_like.
class SharedArray(NDArrayLike[_ScalarT_co], BlockHandle, Generic[_ScalarT_co]):
    """A handle to one numpy array in a named shared-memory block.

    Create one with :meth:`allocate`, :meth:`allocate_like` or :meth:`copy`
    (this handle then owns the block), or :meth:`attach` to an existing block
    by name. :meth:`as_array` returns a zero-copy view; writes through it are
    seen by every process that maps the block. The handle also behaves like
    that view without being an ndarray subclass: ``np.asarray(sa)`` is the view;
    ``sa[i]``, ``sa[i] = v``, ``len(sa)``, ndarray attributes and methods
    (``sa.sum()``, ``sa.T``), operators and numpy functions act on it and return
    ordinary ndarrays (``sa += 1`` and ``out=sa`` write into shared memory);
    ``==`` is element-wise, so handles are unhashable. ``sa.copy()`` is numpy's
    private copy; ``SharedArray.copy(x)`` the constructor.

    Generic in its scalar type like ``numpy.ndarray``: ``SharedArray.copy(x)``
    with ``x: NDArray[np.float32]`` is a ``SharedArray[np.float32]``.

    Lifetime (API.md section 0): the owner's :meth:`close` (or :meth:`unlink`,
    or leaving a ``with`` block) unlinks the block at once. When the owner
    handle is garbage collected or its process exits or is killed, the block
    lives on while any process still maps it or a pickled handle of it is in
    flight, then goes with the last of them. Views from :meth:`as_array` stay
    valid through all of these. With a ``SharedMemoryManager``, the manager's
    shutdown also unlinks it. Handles pickle as name, layout and identity only;
    unpickled, a handle attaches, and owns the block if its owner has let go
    (a worker's result).

    Examples
    --------
    >>> import numpy as np
    >>> with SharedArray.allocate((2, 3), "float32") as sa:
    ...     sa[:] = 1.0
    ...     other = SharedArray.attach(sa.name)
    ...     float(np.asarray(other).sum())
    6.0
    """

    KIND: ClassVar[BlockKind] = BlockKind.ARRAY
    KIND_NAME: ClassVar[str] = "SharedArray"
    CONSTRUCTORS: ClassVar[str] = "SharedArray.allocate(), .allocate_like(), .copy() or .attach()"

    # Class-level defaults so close() works after a failed constructor.
    _layout: ArrayLayout
    _data_offset: int = 0
    _manager: SharedMemoryManager | None = None

    # -- cores ---------------------------------------------------------------------------

    @classmethod
    def _new(
        cls,
        manager: SharedMemoryManager | None,
        layout: ArrayLayout,
        source: Any = None,
        name: str | None = None,
    ) -> Self:
        """Create the block for ``layout`` (and copy ``source`` in): every constructor's core."""
        _check_safe(layout)
        # Generated names all have the length of new_name()'s.
        data_offset = header_size_for(
            ndim=len(layout.shape),
            descr_len=len(descr_text(layout.dtype)),
            name=name or new_name(),
        )
        # A source already in the block's order goes in by positional writes, without
        # faulting the pages into this mapping; anything else is copied through a
        # populated mapping.
        raw = _raw_bytes(source, layout) if source is not None else None
        size = data_offset + max(layout.nbytes, 1)
        # Populated unless every byte is written below (a page never written would count as
        # a hole, see _handle): allocate's zeros are mapped in, and first writes take no fault.
        self = cls._create(size, name=name, populate=raw is None)
        with self._creating():
            block = self._live_block()
            header = layout.header(block.name)
            self._layout, self._data_offset = layout, len(header)
            if raw is not None:
                block.write_at(len(header), raw)
            elif source is not None:
                np.copyto(self.as_array(), source, casting="no")
            self._publish(header)  # last: an attaching process waits for the header
            if manager is not None:
                _track_in_manager(manager, block.name)
                self._manager = manager
        return self

    @classmethod
    def _attach(
        cls,
        name: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: np.dtype[Any] | None = None,
        fortran_order: bool | None = None,
        verify_checksum: bool = True,
        private: bool = False,
        identity: str | None = None,
        block_id: bytes | None = None,
    ) -> Self:
        """Open block ``name`` as an array and compare whatever is not ``None`` with its header."""
        self = cls._open(
            name,
            private=private,
            identity=identity,
            block_id=block_id,
            verify_checksum=verify_checksum,
        )
        try:
            header = self._header
            assert header is not None
            layout = self._layout = ArrayLayout.from_header(header, self._name)
            self._data_offset = header.data_offset
            if (
                (shape is not None and shape != layout.shape)
                or (dtype is not None and dtype != layout.dtype)
                or (fortran_order is not None and fortran_order != layout.fortran_order)
            ):
                raise LayoutError(
                    f"block {self._name!r} holds shape {layout.shape}, dtype {layout.dtype}, "
                    f"order {layout.order}; the caller expected shape "
                    f"{layout.shape if shape is None else shape}, dtype "
                    f"{layout.dtype if dtype is None else dtype}"
                )
        except BaseException:
            self.close()
            raise
        return self

    def _pickle_state(self) -> tuple[Any, ...]:
        layout = self._layout
        private = self._block is not None and self._block.private
        return (self._name, layout.shape, layout.dtype, layout.fortran_order, private)

    @classmethod
    def _open_from_state(
        cls, state: tuple[Any, ...], identity: str | None, block_id: bytes | None
    ) -> Self:
        name, shape, dtype, fortran_order, private = state
        return cls._attach(
            name,
            shape=shape,
            dtype=dtype,
            fortran_order=fortran_order,
            private=private,
            identity=identity,
            block_id=block_id,
        )

    def _restore_unreachable(self, state: tuple[Any, ...]) -> None:
        name, shape, dtype, fortran_order, _ = state
        self._name = name
        self._layout = ArrayLayout(tuple(shape), np.dtype(dtype), bool(fortran_order))

    def _unlink_name(self, block: SharedBlock) -> bool:
        manager, self._manager = self._manager, None
        # The manager unlinks by name: only while the name is still this block's.
        if (
            manager is not None
            and block.still_named()
            and _release_from_manager(manager, block.name)
        ):
            return True
        return block.unlink()

    # -- constructors ----------------------------------------------------------------------
    #
    # Each constructor takes an optional leading ``manager``: the overloads spell out both
    # forms for type checkers, and _leading_manager() sorts them out at run time. mypy cannot
    # see that a leading non-manager takes the next parameter's place, hence the
    # ``type: ignore[misc]`` on each implementation ("does not accept all possible
    # parameters"): the tests call every form.

    @overload
    @classmethod
    def allocate(
        cls,
        manager: SharedMemoryManager | None,
        shape: ShapeLike,
        dtype: _DTypeOf[_ScalarT],
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate(
        cls,
        manager: SharedMemoryManager | None,
        shape: ShapeLike,
        dtype: None = None,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[np.float64]: ...
    @overload
    @classmethod
    def allocate(
        cls,
        manager: SharedMemoryManager | None,
        shape: ShapeLike,
        dtype: DTypeLike,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[Any]: ...
    @overload
    @classmethod
    def allocate(
        cls,
        shape: ShapeLike,
        dtype: _DTypeOf[_ScalarT],
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate(
        cls,
        shape: ShapeLike,
        dtype: None = None,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[np.float64]: ...
    @overload
    @classmethod
    def allocate(
        cls, shape: ShapeLike, dtype: DTypeLike, *, order: OrderLike = "C", name: str | None = None
    ) -> SharedArray[Any]: ...
    @classmethod  # type: ignore[misc]
    def allocate(
        cls,
        manager: Any = None,
        shape: Any = _UNSET,
        dtype: Any = _UNSET,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[Any]:
        """Create a zero-filled shared array.

        ``allocate(manager, shape, dtype)``, ``allocate(shape, dtype)`` and the
        keyword forms are all accepted: the first argument is the manager only
        when it is ``None`` or a ``SharedMemoryManager``.

        Parameters
        ----------
        manager
            A started ``SharedMemoryManager`` whose shutdown also unlinks the
            block, or ``None`` (the default): this handle owns the block.
        shape
            An int or an iterable of ints (numpy integers included); ``()`` is 0-d.
        dtype
            Anything ``numpy.dtype()`` accepts, structured included; not object.
            Default ``float64``.
        order
            ``"C"`` (row-major, default) or ``"F"`` (column-major).

        Raises
        ------
        TypeError, ValueError
            Invalid shape, dtype or order (see :meth:`ArrayLayout.parse`), or
            more arguments than parameters.
        AllocationError
            The system cannot provide the memory.

        Examples
        --------
        >>> with SharedArray.allocate((2, 3), "int32") as sa:
        ...     sa.shape, sa.dtype.name
        ((2, 3), 'int32')
        """
        manager, (shape, dtype) = _leading_manager(
            "allocate", manager, ("shape", "dtype"), shape, dtype
        )
        if shape is _UNSET or shape is None:
            raise TypeError("allocate() needs a shape")
        return cls._new(manager, ArrayLayout.parse(shape, _default_dtype(dtype), order), name=name)

    @overload
    @classmethod
    def allocate_unsafe(
        cls,
        manager: SharedMemoryManager | None,
        shape: ShapeLike,
        dtype: _DTypeOf[_ScalarT],
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate_unsafe(
        cls,
        manager: SharedMemoryManager | None,
        shape: ShapeLike,
        dtype: None = None,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[np.float64]: ...
    @overload
    @classmethod
    def allocate_unsafe(
        cls,
        manager: SharedMemoryManager | None,
        shape: ShapeLike,
        dtype: DTypeLike,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[Any]: ...
    @overload
    @classmethod
    def allocate_unsafe(
        cls,
        shape: ShapeLike,
        dtype: _DTypeOf[_ScalarT],
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate_unsafe(
        cls,
        shape: ShapeLike,
        dtype: None = None,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[np.float64]: ...
    @overload
    @classmethod
    def allocate_unsafe(
        cls, shape: ShapeLike, dtype: DTypeLike, *, order: OrderLike = "C", name: str | None = None
    ) -> SharedArray[Any]: ...
    @classmethod  # type: ignore[misc]
    def allocate_unsafe(
        cls,
        manager: Any = None,
        shape: Any = _UNSET,
        dtype: Any = _UNSET,
        *,
        order: OrderLike = "C",
        name: str | None = None,
    ) -> SharedArray[Any]:
        """:meth:`allocate` without argument validation; the caller guarantees them.

        The same forms as :meth:`allocate`. ``shape`` must be an int or a
        sequence of non-negative ints and ``dtype`` a valid, object-free dtype.
        """
        manager, (shape, dtype) = _leading_manager(
            "allocate_unsafe", manager, ("shape", "dtype"), shape, dtype
        )
        if shape is _UNSET or shape is None:
            raise TypeError("allocate_unsafe() needs a shape")
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        layout = ArrayLayout(dims, np.dtype(_default_dtype(dtype)), order in ("F", "f"))
        return cls._new(manager, layout, name=name)

    @overload
    @classmethod
    def allocate_like(
        cls,
        manager: SharedMemoryManager | None,
        template: _ArrayOf[_ScalarT],
        *,
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate_like(
        cls, manager: SharedMemoryManager | None, template: ArrayLike, *, name: str | None = None
    ) -> SharedArray[Any]: ...
    @overload
    @classmethod
    def allocate_like(
        cls, template: _ArrayOf[_ScalarT], *, name: str | None = None
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate_like(cls, template: ArrayLike, *, name: str | None = None) -> SharedArray[Any]: ...
    @classmethod  # type: ignore[misc]
    def allocate_like(
        cls, manager: Any = None, template: Any = _UNSET, *, name: str | None = None
    ) -> SharedArray[Any]:
        """Create a zero-filled shared array with the shape, dtype and order of ``template``.

        ``allocate_like(manager, template)`` or ``allocate_like(template)``.
        """
        manager, (template,) = _leading_manager("allocate_like", manager, ("template",), template)
        if template is _UNSET:
            raise TypeError("allocate_like() needs a template")
        template = np.asarray(template)
        return cls._new(
            manager,
            ArrayLayout.parse(template.shape, template.dtype, ArrayLayout.of(template).order),
            name=name,
        )

    @overload
    @classmethod
    def allocate_like_unsafe(
        cls,
        manager: SharedMemoryManager | None,
        template: NDArray[_ScalarT],
        *,
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def allocate_like_unsafe(
        cls, template: NDArray[_ScalarT], *, name: str | None = None
    ) -> SharedArray[_ScalarT]: ...
    @classmethod  # type: ignore[misc]
    def allocate_like_unsafe(
        cls, manager: Any = None, template: Any = _UNSET, *, name: str | None = None
    ) -> SharedArray[Any]:
        """:meth:`allocate_like` without validation; ``template`` must be an ndarray."""
        manager, (template,) = _leading_manager(
            "allocate_like_unsafe", manager, ("template",), template
        )
        if template is _UNSET:
            raise TypeError("allocate_like_unsafe() needs a template")
        return cls._new(manager, ArrayLayout.of(template), name=name)

    # The constructor ``copy`` is this classmethod behind the descriptor defined after it
    # (on an instance, ``copy`` is numpy's copy()); its overloads for type checkers are
    # _ndarray_like.CopyConstructor's.
    @classmethod
    def _copy(
        cls, manager: Any = None, array: Any = _UNSET, *, name: str | None = None
    ) -> SharedArray[Any]:
        """Create a shared array holding a copy of ``array`` (any array-like).

        ``copy(manager, array)`` or ``copy(array)``. An F-contiguous source
        stays F-contiguous; any other non-contiguous source (a slice, a
        transpose, a broadcast) is stored C-contiguous and compares equal.
        On an instance, ``sa.copy(order="C")`` is numpy's: a private ndarray.

        Examples
        --------
        >>> import numpy as np
        >>> with SharedArray.copy(np.arange(6).reshape(2, 3).T) as sa:
        ...     sa.shape, sa[0].tolist()
        ((3, 2), [0, 3])
        """
        manager, (array,) = _leading_manager("copy", manager, ("array",), array)
        if array is _UNSET:
            raise TypeError("copy() needs an array")
        source = np.asarray(array)
        layout = ArrayLayout.parse(source.shape, source.dtype, ArrayLayout.of(source).order)
        return cls._new(manager, layout, source, name=name)

    copy: ConstructorOrCopy[CopyConstructor] = ConstructorOrCopy(_copy)

    @overload
    @classmethod
    def copy_unsafe(
        cls,
        manager: SharedMemoryManager | None,
        array: NDArray[_ScalarT],
        *,
        name: str | None = None,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def copy_unsafe(
        cls, array: NDArray[_ScalarT], *, name: str | None = None
    ) -> SharedArray[_ScalarT]: ...
    @classmethod  # type: ignore[misc]
    def copy_unsafe(
        cls, manager: Any = None, array: Any = _UNSET, *, name: str | None = None
    ) -> SharedArray[Any]:
        """:meth:`copy` without validation; ``array`` must be an object-free ndarray."""
        manager, (array,) = _leading_manager("copy_unsafe", manager, ("array",), array)
        if array is _UNSET:
            raise TypeError("copy_unsafe() needs an array")
        return cls._new(manager, ArrayLayout.of(array), array, name=name)

    @overload
    @classmethod
    def attach(
        cls,
        name: str,
        shape: ShapeLike | None,
        dtype: _DTypeOf[_ScalarT],
        *,
        private: bool = False,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def attach(
        cls,
        name: str,
        shape: ShapeLike | None = None,
        *,
        dtype: _DTypeOf[_ScalarT],
        private: bool = False,
    ) -> SharedArray[_ScalarT]: ...
    @overload
    @classmethod
    def attach(
        cls,
        name: str,
        shape: ShapeLike | None = None,
        dtype: DTypeLike | None = None,
        *,
        private: bool = False,
    ) -> SharedArray[Any]: ...
    @classmethod
    def attach(
        cls,
        name: str,
        shape: ShapeLike | None = None,
        dtype: DTypeLike | None = None,
        *,
        private: bool = False,
    ) -> SharedArray[Any]:
        """Attach to an existing shared array by name; this handle does not own it.

        Shape and dtype are read from the block's header. When given, they are
        checked against it (so a ``dtype`` given here also types the result).

        Parameters
        ----------
        name
            The block's name (as ``sa.name`` gives it, or as given to ``name=``).
        shape, dtype
            Optional: compared with the header.
        private
            Map copy-on-write: the view is writable, its writes stay in this
            process (a page is copied when first written) and are never seen
            by others; pages nobody writes are shared, not copied.

        Raises
        ------
        BlockNotFoundError
            No block of that name exists.
        UntrustedBlockError
            The block belongs to another user, or others may write it.
        LayoutError
            The header is corrupt, belongs to another kind of block, or
            contradicts ``shape`` / ``dtype``.
        """
        return cls._attach(
            name,
            shape=None if shape is None else parse_shape(shape),
            dtype=None if dtype is None else parse_dtype(dtype),
            private=private,
        )

    @classmethod
    def attach_unsafe(
        cls,
        name: str,
        shape: ShapeLike | None = None,
        dtype: DTypeLike | None = None,
        *,
        private: bool = False,
    ) -> SharedArray[Any]:
        """:meth:`attach` without comparing ``shape``/``dtype`` and without the header CRC.

        The header's bounds are still checked, so a bad block raises
        :class:`LayoutError` rather than crashing.
        """
        return cls._attach(name, verify_checksum=False, private=private)

    # -- instance API ----------------------------------------------------------------------

    def as_array(self) -> NDArray[_ScalarT_co]:
        """Return a zero-copy ndarray view of the shared data.

        The view keeps the mapping alive on its own: it stays valid after
        :meth:`close` and after the block is unlinked.

        Raises
        ------
        ClosedError
            This handle is closed (a :class:`ValueError` too).
        BlockNotFoundError, UntrustedBlockError, LayoutError
            This handle was unpickled where its block cannot be reached (the
            reason is the error's message).
        """
        block = self._live_block()
        layout = self._layout
        # frombuffer holds a buffer export of the mapping, which is what keeps it alive
        # (np.ndarray(buffer=...) would not, and would crash after close()).
        flat = np.frombuffer(
            block.buf,
            dtype=layout.dtype,
            count=layout.nbytes // layout.dtype.itemsize,
            offset=self._data_offset,
        )
        return flat.reshape(layout.shape, order=layout.order)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape."""
        return self._layout.shape

    @property
    def dtype(self) -> np.dtype[_ScalarT_co]:
        """Array dtype."""
        return self._layout.dtype

    @property
    def strides(self) -> tuple[int, ...]:
        """Array strides in bytes (C- or Fortran-contiguous)."""
        return self._layout.strides

    @property
    def nbytes(self) -> int:
        """Bytes of array data (the block is larger by its header)."""
        return self._layout.nbytes

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self._layout.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self._layout.shape)

    # shared-memory-array's ``sa.shm`` (see _shm_view).
    @property
    def shm(self) -> SharedMemoryView:
        """A SharedMemory-like view of the block, as shared-memory-array had.

        ``.name`` (as :meth:`attach` takes it), ``.size`` and ``.buf``: the
        array's data bytes, so ``np.ndarray(sa.shape, sa.dtype, buffer=sa.shm.buf)``
        is the array (with ``order="F"`` for a Fortran-order one).
        """
        return SharedMemoryView(self)

    # -- wait and notify: a generation kept in the block (not in the data) ----------------

    def notify(self) -> int:
        """Bump the block's generation and wake every waiter, in any process.

        A producer writes a frame, then calls ``notify()``; consumers blocked in
        :meth:`wait` return. Where the system has futexes (Linux) the bump and
        the wake are one atomic kernel operation; elsewhere waiters poll with
        a bounded back-off (at most 10 ms).

        Returns
        -------
        int
            The generation after the bump (32 bits, wrapping).
        """
        return self._signal().bump()

    def wait(self, timeout: float | None = None, *, after: int | None = None) -> int:
        """Block until the generation passes ``after``; return the new generation.

        Parameters
        ----------
        timeout
            Seconds to wait at most (``None``: for ever).
        after
            The generation the caller last saw (what :meth:`notify` or a
            previous ``wait`` returned). ``None`` waits for the next
            :meth:`notify` after this call; pass the last generation instead
            to miss none in between (no lost wake-up: the wait compares and
            sleeps in one step).

        Raises
        ------
        TimeoutError
            ``timeout`` seconds passed with no new generation.
        ClosedError
            The handle is closed.
        """
        signal = self._signal()
        expected = signal.load() if after is None else after & 0xFFFFFFFF
        current = signal.wait(expected, deadline_of(timeout))
        if current == expected:
            raise TimeoutError(
                f"no notify() on SharedArray {self._name!r} within {timeout} s "
                f"(generation {expected})"
            )
        return current

    async def wait_async(self, timeout: float | None = None, *, after: int | None = None) -> int:
        """:meth:`wait` without blocking the event loop (a short-lived thread sleeps).

        Cancelling the awaiting task ends the wait; the thread goes with it.
        """
        signal = self._signal()
        expected = signal.load() if after is None else after & 0xFFFFFFFF
        current = await signal.wait_async(expected, deadline_of(timeout))
        if current == expected:
            raise TimeoutError(
                f"no notify() on SharedArray {self._name!r} within {timeout} s "
                f"(generation {expected})"
            )
        return current

    def managed(self) -> ManagedSharedMemoryArray[_ScalarT_co]:
        """A context manager yielding this handle and closing it on exit.

        See :class:`ManagedSharedMemoryArray`.
        """
        return ManagedSharedMemoryArray(self)

    # -- numpy protocol: the same zero-copy view as as_array() ----------------------------

    @overload
    def __array__(self, dtype: None = None, copy: bool | None = None) -> NDArray[_ScalarT_co]: ...
    @overload
    def __array__(self, dtype: DTypeLike, copy: bool | None = None) -> NDArray[Any]: ...
    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> NDArray[Any]:
        """The view of :meth:`as_array`, for ``np.asarray(sa)`` and every numpy function.

        Parameters
        ----------
        dtype
            Convert to this dtype (a copy) unless it is the array's own.
        copy
            numpy 2's protocol: ``None`` copies only for a conversion, ``True``
            always copies, ``False`` never does.

        Raises
        ------
        ValueError
            ``copy=False`` with a ``dtype`` that needs a conversion, or the
            handle is closed.
        """
        view = self.as_array()
        if dtype is not None and np.dtype(dtype) != view.dtype:
            if copy is False:
                raise ValueError(
                    f"SharedArray {self._name!r} holds {view.dtype}: an array of dtype "
                    f"{np.dtype(dtype)} needs a copy, which copy=False forbids"
                )
            return view.astype(dtype)
        return view.copy() if copy else view

    def __len__(self) -> int:
        """Length of the first axis, like ``len(ndarray)``; ``TypeError`` for 0-d."""
        if not self._layout.shape:
            raise TypeError("len() of a 0-d SharedArray")
        return self._layout.shape[0]

    def __getitem__(self, key: Any) -> Any:
        """``sa[key]`` is ``sa.as_array()[key]``: basic indexing gives views of shared memory."""
        return self.as_array()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        """``sa[key] = value`` writes into shared memory, seen by every process."""
        self.as_array()[key] = value

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the first axis of the view; ``TypeError`` for 0-d."""
        return iter(self.as_array())

    def __repr__(self) -> str:
        if self._unreachable is not None and not self.closed:
            state = "unreachable"
        else:
            state = "closed" if self.closed else ("owner" if self.owner else "attached")
        return (
            f"<SharedArray {self._name!r} shape={self._layout.shape} "
            f"dtype={self._layout.dtype} order={self._layout.order} {state}>"
        )


# NDArrayLike gives the wrapper the handle's numpy behaviour (through the
# forwarded as_array()).
class ManagedSharedMemoryArray(NDArrayLike[_ScalarT_co], Generic[_ScalarT_co]):
    """What :meth:`SharedArray.managed` returns: a context manager around one handle.

    ``with sa.managed() as a:`` yields the :class:`SharedArray` itself and closes
    it on exit (the owner's close also unlinks). Attribute access and the numpy
    protocol are forwarded to the handle, so ``m.shape``, ``m.as_array()``,
    ``np.asarray(m)``, ``m[0]``, ``m.sum()``, ``m + 1`` and ``np.sqrt(m)`` work
    on the managed object too.

    Each wrapper is entered once: entering it again after it exited raises
    :class:`ClosedError` (a :class:`ValueError`), "already closed". Several
    wrappers of one handle may be used one after another: the first exit closes
    the handle, the later ones enter and exit harmlessly (a second close is a
    no-op), though using the closed handle's data raises :class:`ClosedError`.
    Calling ``__exit__`` without ``__enter__`` just closes the handle.

    Examples
    --------
    >>> m = SharedArray.allocate(3, "int8").managed()
    >>> with m as sa:
    ...     sa[:] = 7
    ...     m.shape, int(m[0])
    ((3,), 7)
    >>> m.closed
    True
    """

    # _closed is this wrapper's own state (shared-memory-array's flag, which
    # its tests read), not the handle's: other wrappers of the handle stay usable.
    __slots__ = ("_array", "_closed")

    def __init__(self, array: SharedArray[_ScalarT_co]) -> None:
        self._array = array
        self._closed = False  # set on exit

    def __enter__(self) -> SharedArray[_ScalarT_co]:
        if self._closed:
            raise ClosedError(
                f"this ManagedSharedMemoryArray of {self._array!r} is already closed "
                "(it was exited): a managed array cannot be re-entered"
            )
        return self._array

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._array.close()

    def __getattr__(self, name: str) -> Any:
        if name in ("_array", "_closed"):  # not set yet (a half-built copy): no endless recursion
            raise AttributeError(name)
        return getattr(self._array, name)

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> NDArray[Any]:
        """The handle's ``__array__``: the zero-copy view."""
        return self._array.__array__(dtype, copy)

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, key: Any) -> Any:
        return self._array[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._array[key] = value

    def __iter__(self) -> Iterator[Any]:
        return iter(self._array)

    def __repr__(self) -> str:
        return f"<ManagedSharedMemoryArray {self._array!r}>"


SharedMemoryArray = SharedArray
