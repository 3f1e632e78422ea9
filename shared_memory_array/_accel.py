"""Which implementation of the hot paths this process uses: the C accelerator or pure Python.

Decided once, at import: the compiled module :mod:`._native` (built by ``pip install`` where a
C compiler exists, optional everywhere) is used when it imports and
``SHARED_MEMORY_ARRAY_PURE`` is not set to a true value (``1``, ``yes``, ...). :data:`lib` is
the module then, else ``None``; the layers ask it, never ``_native`` itself:

============================  =================================================================
layer                         what the accelerator does in C
============================  =================================================================
:mod:`._heap`                 ``Heap.alloc``, ``free``, ``extend`` (:func:`heap_address`)
:mod:`._dict._table`          ``Table.probe``, ``put``, ``entry_value``, ``set_number``,
                              ``unpublish`` (a ``Core`` per mapped data block)
:mod:`._dict._facade`         whole locked steps: a read (``_fetch``), a store of one item
                              (``__setitem__``), ``increment`` of a raw number
:mod:`._platform._linux`      robust mutexes and futexes (:func:`install`)
:mod:`._block`                the first steps of an attach (open, fstat, hold, header read)
============================  =================================================================

The pure-Python code stays complete and is the reference: each accelerated method is the
pure one with a first line that hands the work to C when :data:`lib` is there. Both write
the same bytes in the same order under the same lock and crash protocol, so processes
using either share a block (``tests/test_native.py`` checks both, byte for byte).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from ctypes import addressof, c_char
from types import ModuleType
from typing import TYPE_CHECKING, Final

__all__ = ["PURE_ENV", "address_of", "install", "lib", "native"]

PURE_ENV: Final = "SHARED_MEMORY_ARRAY_PURE"
"""Set to ``1`` to force the pure-Python path even where the accelerator is built."""


def _forced_pure() -> bool:
    return os.environ.get(PURE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load() -> ModuleType | None:
    if _forced_pure():
        return None
    try:
        from . import _native
    except ImportError:  # not built (no compiler at install time), or not this platform
        return None
    return _native


if TYPE_CHECKING:  # the stub's API (_native.pyi); at run time ``None`` on the pure path
    from . import _native as lib
else:
    lib = _load()
    """The accelerator module, or ``None`` on the pure-Python path."""

native: Final = lib is not None
"""Whether this process uses the accelerator."""


def address_of(view: memoryview) -> int:
    """The address of a writable view's first byte (0 where there is none: read-only, empty).

    The caller keeps ``view`` (or another view of the same memory) alive while C uses it.
    """
    if view.readonly or not view.nbytes:
        return 0
    return addressof(c_char.from_buffer(view))


def install(owner: type, names: Iterable[str]) -> None:
    """Make each method ``name`` of ``owner`` (the pure twin) the accelerator's function.

    A no-op on the pure-Python path.
    """
    if lib is None:
        return
    for name in names:
        setattr(owner, name, staticmethod(getattr(lib, name)))
