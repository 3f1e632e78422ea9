"""The pickle-5 codec: any picklable object across processes, numpy arrays zero-copy.

:func:`write` pickles an object once, with protocol 5 and a ``buffer_callback``,
so the data of numpy arrays (and of any :class:`pickle.PickleBuffer`) comes out
*out of band*, beside the pickle stream instead of inside it. Small results
travel inline in the token; large ones go into one shared-memory block, and
:func:`read` hands the out-of-band buffers to :func:`pickle.loads` as slices of
its mapping of that block, so arrays come back as views on shared memory.

The package splits along its seams:

=============  ===============================================================
module         job
=============  ===============================================================
_pickling      pickling with out-of-band buffers; the buffer table; inline frames
_tokens        the token grammar and the :class:`Token` type
_store         the codec block: its layout, its two state words, reading it
_writer        this process's blocks: the pool of released blocks, the collector
=============  ===============================================================
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, TypeVar, overload

from .._identity import forget as _forget_identity
from .._identity import shm_identity
from .._platform import DIRECTORY_ENV, backend
from ._pickling import MAX_BUFFERS, inline_frame, pickle_out_of_band, read_frame
from ._store import CodecBlock, read_block, release_foreign
from ._tokens import (
    MODE_FRAME,
    MODE_SHARED,
    TOKEN_PREFIX,
    Token,
    is_shared_token,
    parse,
    parse_shared,
    seal,
    unseal,
)
from ._writer import (
    POOL_BYTES_ENV,
    POOL_IDLE_SECONDS,
    POOL_MAX_BLOCKS,
    default_pool_limit,
    writer,
)

__all__ = [
    "MAX_BUFFERS",
    "POOL_BYTES_ENV",
    "POOL_IDLE_SECONDS",
    "POOL_MAX_BLOCKS",
    "TOKEN_PREFIX",
    "CodecBlock",
    "Token",
    "configure",
    "is_shared_token",
    "pickle_out_of_band",
    "read",
    "read_block",
    "release",
    "release_soon",
    "write",
    "writer",
]

_T = TypeVar("_T")
_configured_directory: list[str | None] = [os.environ.get(DIRECTORY_ENV) or None]


class _InlineSeen(threading.local):
    """The last inline token this thread made or read whole (so it is known to be valid)."""

    token: str | None = None


_inline_seen = _InlineSeen()


def configure(*, pool_bytes: int | None = None, directory: str | None = None) -> None:
    """Set how much released memory this process keeps, and where new blocks go.

    ``configure()`` with no argument restores both defaults.

    Parameters
    ----------
    pool_bytes
        At most this many bytes of released blocks stay mapped for reuse (they
        are freed 2 seconds after this process's last write anyway); ``0``
        turns reuse off and frees the pool now. ``None`` restores the default:
        ``$SHARED_MEMORY_ARRAY_POOL_BYTES``, else an eighth of the
        shared-memory filesystem, at most 2 GiB.
    directory
        Put new blocks of every kind in this directory, a memory filesystem (a
        tmpfs mounted with huge pages, a hugetlbfs), instead of the system's
        shared-memory place; ``None`` goes back to the default
        (``$SHARED_MEMORY_ARRAY_DIR`` if set, else that place). Every process
        that shares the blocks must use the same setting
        (``$SHARED_MEMORY_ARRAY_DIR``, read at import, sets it for a process);
        handles and tokens say where their block lives, so a process with
        another setting raises :class:`~shared_memory_array.BlockNotFoundError`
        rather than attaching a namesake. Blocks made before stay where they are.

    Raises
    ------
    TypeError, ValueError
        ``pool_bytes`` is not a non-negative int.
    FileNotFoundError
        ``directory`` does not exist.
    """
    if pool_bytes is None:
        limit = default_pool_limit()
    else:
        if isinstance(pool_bytes, bool) or not isinstance(pool_bytes, int):
            raise TypeError(f"pool_bytes must be an int or None, not {type(pool_bytes).__name__}")
        if pool_bytes < 0:
            raise ValueError(f"pool_bytes must be >= 0, got {pool_bytes}")
        limit = pool_bytes
    new_directory = (os.environ.get(DIRECTORY_ENV) or None) if directory is None else directory
    if new_directory != _configured_directory[0]:
        backend.configure_directory(None if new_directory is None else os.fspath(new_directory))
        _configured_directory[0] = new_directory
        writer.empty_pool()  # pooled blocks live in the old place
        _forget_identity()
    writer.set_pool_limit(limit)


def write(obj: _T, *, threshold: int = 1_000_000) -> Token[_T]:
    """Serialise ``obj`` and return a token that any process of this user can read.

    Parameters
    ----------
    obj
        Any picklable object; numpy arrays in it are stored without pickling their data.
    threshold
        Objects whose pickle stream plus out-of-band buffers total fewer bytes
        travel inline in the token; others go into a shared-memory block.

    Returns
    -------
    Token
        A ``str`` subclass typed by ``obj``: an ASCII token,
        ``SMA1:<mode>:<payload>``; shared-memory tokens are printable and under
        256 characters.

    Raises
    ------
    pickle.PicklingError
        ``obj`` cannot be pickled (or the pickler's own error); no block is left behind.

    Warns
    -----
    UserWarning
        Shared memory could not be allocated; the object travels inline instead.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold must be an int, not {type(threshold).__name__}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    pickled = pickle_out_of_band(obj)
    if pickled.nbytes < threshold:
        inline = _inline_seen.token = Token(seal(*inline_frame(pickled)))
        return inline
    try:
        return Token(writer.write(pickled, shm_identity()))
    except MemoryError as exc:  # AllocationError: no memory, inode or descriptor left
        warnings.warn(
            f"shared memory unavailable ({exc}); sending {pickled.nbytes} bytes inline",
            UserWarning,
            stacklevel=2,
        )
        return Token(seal(*inline_frame(pickled)))


@overload
def read(token: Token[_T], *, readonly: bool = True, private: bool = False) -> _T: ...
@overload
def read(token: str, *, readonly: bool = True, private: bool = False) -> Any: ...
def read(token: str, *, readonly: bool = True, private: bool = False) -> Any:
    """Rebuild the object behind ``token``.

    Parameters
    ----------
    token
        A token returned by :func:`write` (in any process of this user).
    readonly
        Whether numpy arrays and buffers come back read-only (enforced by the
        mapping, so ``setflags(write=True)`` fails). With ``False`` they are
        writable views whose writes reach the shared block, seen by every
        reader.
    private
        Writable arrays whose writes stay in this process: the block is mapped
        copy-on-write, so nothing is copied until a page is written, and only
        that page then. What a pandas or numpy user who wants to modify a
        received object needs. Overrides ``readonly``.

    Raises
    ------
    TypeError
        ``token`` is not a str.
    LayoutError
        The token is malformed, or its block's header or contents are invalid.
    BlockNotFoundError
        The block is gone (released, or its writer exited), or lives on
        another host's shared memory.
    UntrustedBlockError
        The block belongs to another user, or others may write it.
    """
    mode, payload = parse(token)
    if mode != MODE_SHARED:
        obj = read_frame(mode == MODE_FRAME, unseal(payload), readonly and not private)
        _inline_seen.token = token  # checked whole: its release need not decode it again
        return obj
    shared = parse_shared(token)
    return read_block(
        shared.name,
        generation=shared.generation,
        readonly=readonly and not private,
        private=private,
        block_id=shared.block_id,
        identity=shared.identity,
    )


def release(token: str) -> None:
    """Free the block behind ``token`` now; reading the token afterwards raises.

    Any process holding the token may call it. Views already returned by
    :func:`read` stay valid (the memory is reused only once none is left).
    Releasing twice, an inline token, or a token whose block is gone does
    nothing.

    Raises
    ------
    TypeError
        ``token`` is not a str.
    LayoutError
        The token is malformed, or its block's header is invalid.
    """
    mode, payload = parse(token)
    if mode != MODE_SHARED:
        # A malformed inline token raises as read() would; the common pattern
        # (write, read, release the same token) has it checked already.
        if _inline_seen.token is not token and _inline_seen.token != token:
            unseal(payload)
        return
    shared = parse_shared(token)
    if not writer.release(shared.name, shared.generation):
        release_foreign(shared.name, shared.generation, shared.block_id, shared.identity)


def release_soon(token: str) -> None:
    """:func:`release` a token this process wrote, from a finalizer: never blocks.

    The release is queued for the writer's collector (:meth:`._writer.Writer.release_soon`),
    which does it within its collection interval. Inline tokens, and tokens this process
    did not write, are ignored.
    """
    if is_shared_token(token):
        shared = parse_shared(token)
        writer.release_soon(shared.name, shared.generation)
