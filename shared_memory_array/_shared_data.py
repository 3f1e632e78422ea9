"""Broadcast: serialise one object once, let any number of processes load it by name.

:class:`SharedData` writes its object into one codec block (the format of
:mod:`shared_memory_array._codec`, generation 0, never reused) on entering the
``with`` block and unlinks it on exit, so a ``SharedData`` that is built but never
entered holds no shared memory. :meth:`SharedData.load` reads a block by name
through the codec's reader, so numpy arrays are read-only zero-copy views, and
caches the result per process.

Cache hits after the block was unlinked: :meth:`SharedData.load` checks that the
name still exists on every call (one ``stat`` of the block's file on Linux),
drops the entry and raises :class:`~shared_memory_array.BlockNotFoundError` if
it is gone, so every process sees the same answer for a finished broadcast.
Objects already returned stay valid: their views keep the mapping alive.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any, ClassVar, Literal

from typing_extensions import Self

from ._block import normalize_name
from ._codec import CodecBlock, pickle_out_of_band, read_block
from ._platform import backend
from .errors import BlockNotFoundError

__all__ = ["SharedData"]


def _block_exists(name: str) -> bool:
    return backend.exists(backend.system_name(name))


class SharedData:
    """One object serialised once into a shared-memory block, for many readers.

    Parameters
    ----------
    obj
        Any picklable object; numpy arrays in it are not pickled but copied
        once into the block.

    The block is created on entering ``with`` (``obj`` is pickled then, once)
    and unlinked on leaving it. :attr:`name` and :attr:`size` exist only in
    between; a ``SharedData`` is entered once.

    Raises
    ------
    pickle.PicklingError
        On entering: ``obj`` cannot be pickled (no block is created).
    AllocationError
        On entering: shared memory is full.
    RuntimeError
        :attr:`name` or :attr:`size` outside the ``with`` block, or entering
        a second time.

    Examples
    --------
    >>> import numpy as np
    >>> with SharedData(np.ones(4)) as sd:
    ...     float(SharedData.load(sd.name).sum())
    4.0
    """

    _cache: ClassVar[dict[str, object]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    _block: CodecBlock | None = None

    def __init__(self, obj: object) -> None:
        self._obj: object = obj
        self._state: Literal["new", "open", "done"] = "new"

    def _open_block(self, what: str) -> CodecBlock:
        if self._block is None or self._state != "open":
            when = "before entering" if self._state == "new" else "after leaving"
            # "not entered or already exited": fastshare's words, which its users match.
            raise RuntimeError(
                f"SharedData.{what} exists only inside its with block: not entered or "
                f"already exited (here: {when} it)"
            )
        return self._block

    @property
    def name(self) -> str:
        """The block's name: pass it to workers, which call :meth:`load`.

        Raises
        ------
        RuntimeError
            Outside the ``with`` block.
        """
        return self._open_block("name").name

    @property
    def size(self) -> int:
        """Size of the block in bytes.

        Raises
        ------
        RuntimeError
            Outside the ``with`` block.
        """
        return self._open_block("size")._live_block().size

    def __enter__(self) -> Self:
        if self._state != "new":
            # "does not support re-entry": fastshare's words, which its users match.
            raise RuntimeError(
                "a SharedData is entered once (it does not support re-entry); "
                "make a new one to share again"
            )
        # Kept open until the end: this process holds the block for as long as it serves it.
        block = CodecBlock.create(pickle_out_of_band(self._obj))
        self._block, self._state = block, "open"
        self._obj = None  # the block holds it now; let the caller's object go when it may
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.unlink()
        self._state = "done"

    def unlink(self) -> None:
        """Remove the block now (idempotent); objects already loaded stay valid.

        Before entering it does nothing: there is no block yet.
        """
        block = self._block
        if block is None:
            return
        block.unlink()
        block.close()
        with self._cache_lock:
            self._cache.pop(block.name, None)

    @classmethod
    def load(cls, name: str) -> Any:
        """Return the object in block ``name``, cached in this process after the first call.

        Raises
        ------
        TypeError
            ``name`` is not a str.
        BlockNotFoundError
            The block is gone (also for a name cached earlier).
        LayoutError
            ``name`` is not a codec block of this library, or is corrupt.
        """
        bare = normalize_name(name)
        with cls._cache_lock:
            if bare in cls._cache:
                if _block_exists(bare):
                    return cls._cache[bare]
                del cls._cache[bare]
                raise BlockNotFoundError(bare)
        obj = read_block(bare, readonly=True)
        with cls._cache_lock:
            return cls._cache.setdefault(bare, obj)

    @classmethod
    def clear_cache(cls) -> None:
        """Forget every object loaded in this process (their mappings go with their last use)."""
        with cls._cache_lock:
            cls._cache.clear()

    def __repr__(self) -> str:
        if self._block is None or self._state != "open":
            return f"<SharedData {'not entered' if self._state == 'new' else 'left'}>"
        return f"<SharedData {self._block.name!r} {self.size} bytes>"
