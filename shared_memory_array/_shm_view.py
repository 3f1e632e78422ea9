"""``SharedArray.shm``: the SharedMemory-like object shared-memory-array's users read.

shared-memory-array (the package this library replaces) kept a standard-library
``SharedMemory`` as ``sa.shm``; its users read ``sa.shm.name`` above all, and
``sa.shm.buf`` and ``sa.shm.size``. :class:`SharedMemoryView` is that surface and
no more:

* It is not the standard library's ``SharedMemory``: opening the block through
  it would register it with the resource tracker, which on Python < 3.13 unlinks
  it when this process exits (see :mod:`._block`).
* ``buf`` is the array's data, not the whole block. In shared-memory-array the
  block held nothing else, so ``np.ndarray(sa.shape, sa.dtype, buffer=sa.shm.buf)``
  was the array; here the block starts with a header, and a ``buf`` that covered
  it would make that same line read the header as data, silently.
* No ``close()`` or ``unlink()``: the handle's own do that, under the library's
  lifetime rules (an owner's ``close`` unlinks; a ``SharedMemory.close`` never did).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._array import SharedArray

__all__ = ["SharedMemoryView"]


class SharedMemoryView:
    """A SharedMemory-like view of one :class:`SharedArray`'s block: ``name``, ``size``, ``buf``.

    Parameters
    ----------
    handle
        The array handle whose block this describes.
    """

    __slots__ = ("_handle",)

    def __init__(self, handle: SharedArray[Any]) -> None:
        self._handle = handle

    @property
    def name(self) -> str:
        """The block's name, as :meth:`SharedArray.attach` takes it (also after close)."""
        return self._handle.name

    @property
    def size(self) -> int:
        """Bytes of ``buf``: the array's data (``sa.nbytes``)."""
        return self._handle.nbytes

    @property
    def buf(self) -> memoryview:
        """The array's data bytes in memory order: a writable, zero-copy, 1-D ``B`` memoryview.

        Like the views of ``as_array()``, it keeps the mapping alive on its own.

        Raises
        ------
        ClosedError
            The handle is closed.
        """
        # as_array() is contiguous in its memory order, so ravel("K") is a view, never a copy.
        data: memoryview = self._handle.as_array().ravel(order="K").view(np.uint8).data
        return data

    def __repr__(self) -> str:
        return f"<SharedMemoryView {self.name!r} size={self.size}>"
