"""The exceptions of ``shared_memory_array``.

Every error the library raises on purpose derives from :class:`SharedArrayError`
and also from the builtin exception it means, so ``except MemoryError`` or
``except KeyError`` keeps working for code that does not know this library.
"""

from __future__ import annotations

__all__ = ["AllocationError", "BlockNotFoundError", "LayoutError", "SharedArrayError"]


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


class BlockNotFoundError(SharedArrayError, KeyError):
    """No shared-memory block of that name exists (any more).

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

    def __str__(self) -> str:
        # KeyError.__str__ would quote the whole message.
        return self.message


class LayoutError(SharedArrayError, ValueError):
    """A block's header is missing, corrupt, of another kind, or contradicts the caller."""
