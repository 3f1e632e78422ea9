"""The exceptions of ``shared_memory_array``.

Every error the library raises on purpose derives from :class:`SharedArrayError`
and also from the builtin exception it means, so ``except MemoryError`` or
``except KeyError`` keeps working for code that does not know this library.
"""

from __future__ import annotations

import errno

__all__ = [
    "AllocationError",
    "BlockExistsError",
    "BlockNotFoundError",
    "ClosedError",
    "LayoutError",
    "SharedArrayError",
    "UntrustedBlockError",
]


class SharedArrayError(Exception):
    """Base class of every error raised by ``shared_memory_array``."""


class AllocationError(SharedArrayError, MemoryError):
    """Shared memory could not be reserved: the system, the heap or the table is full.

    Parameters
    ----------
    message
        What could not be allocated, and why.
    requested
        Bytes (or slots) that were asked for, when known.
    """

    def __init__(self, message: str, requested: int | None = None) -> None:
        super().__init__(message)
        self.requested = requested


class _NamedBlockError(SharedArrayError):
    """An error about one named block: keeps ``name`` and ``message``, shows the message.

    ``str()`` is the message (``KeyError`` would quote it, ``OSError`` prefix an
    errno), and the error pickles back whole (``OSError``'s own reduce would not
    call this ``__init__``).
    """

    name: str
    message: str

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.message))


class BlockNotFoundError(_NamedBlockError, KeyError, FileNotFoundError):
    """No shared-memory block of that name exists (any more), or it is not reachable here.

    Also a :class:`FileNotFoundError`, like a missing file (and a :class:`KeyError`,
    like a missing key).

    Parameters
    ----------
    name
        The block name, without a leading slash.
    message
        Optional text replacing the default message.
    """

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        self.message = message or f"shared-memory block {name!r} does not exist"
        super().__init__(self.message)
        # OSError's constructor does not run for a multiple-inheritance subclass like
        # this one: set the attributes callers of FileNotFoundError look at.
        self.errno = errno.ENOENT
        self.strerror = self.message
        self.filename = name


class BlockBusyError(BlockNotFoundError):
    """Internal: the block is held exclusively for longer than an attach waits.

    A codec writer rewriting a released block, or a reaper judging it. Callers
    pick it by type (a codec reader turns it into "released"); to anyone else
    it is a :class:`BlockNotFoundError`.
    """


class BlockBeingCreatedError(BlockNotFoundError):
    """Internal: the block exists but its creator has not finished it (no header yet).

    To anyone else it is a :class:`BlockNotFoundError`: a block still being
    created is not a corrupt one (``SharedDict.open`` waits for it).
    """


class BlockExistsError(_NamedBlockError, FileExistsError):
    """A block of that name exists already (``create`` of a name in use).

    Parameters
    ----------
    name
        The block name, without a leading slash.
    """

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        self.message = message or f"shared-memory block {name!r} exists already"
        super().__init__(errno.EEXIST, self.message, name)


class UntrustedBlockError(_NamedBlockError, PermissionError):
    """The block belongs to another user, or others may write it: reading it is refused.

    Reading such a block could run that user's code (pickle) or trust a header
    they wrote. Root is no exception.

    Parameters
    ----------
    name
        The block name, without a leading slash.
    message
        Why the block is not trusted.
    """

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(errno.EPERM, message, name)


class ClosedError(SharedArrayError, ValueError):
    """A closed handle (a ``SharedArray``, a ``SharedDict``) was used.

    Also a :class:`ValueError`, like using a closed file. Closing is this
    handle's own doing; views taken before :meth:`close` stay valid.
    """


class TableFullError(AllocationError):
    """Internal: a dict's table has no room for another key (it grows, or says so)."""


class HeapFullError(AllocationError):
    """Internal: a heap has no free block large enough (its owner grows it, or says so)."""


class LayoutError(SharedArrayError, ValueError):
    """A block's header is missing, corrupt, of another kind, or contradicts the caller."""
