"""An identity of the shared-memory namespace this process sees.

Two processes can share a block by name exactly when they see the same
shared-memory namespace. :func:`shm_identity` returns a short hex string that is
equal for every process of one effective uid that sees the same namespace, and
different otherwise. Handles and tokens carry it, so a handle that reaches
another host (or another container's /dev/shm) raises instead of attaching a
namesake; the Dask and Ray adapters compare a receiver's identity with their
own to decide whether a handle can go *by handle* (the receiver attaches) or
must go *by value* (one copy through the engine).

What goes into it, and why
--------------------------
* The device and inode of the blocks' directory (``/dev/shm``, or the one
  given to ``configure(directory=...)``): a tmpfs mount is one superblock with
  its own anonymous device number, so a worker in a private mount namespace
  with its own tmpfs on /dev/shm (a container without ``--ipc=host``) gets
  another identity, while a bind mount of the same tmpfs (``--ipc=host``,
  ``-v /dev/shm:/dev/shm``) keeps it: that is exactly "can attach by name".
  The portable backend has no such directory; it puts in its lock
  directory's instead (one per namespace, where its lifetime locks live:
  processes that do not share it cannot share a block's lifetime).
* The platform's boot id (random at each boot, not namespaced): device numbers
  are small integers that repeat from host to host and from boot to boot.
* The effective uid: blocks are created mode 0600 and another user's block is
  refused (``UntrustedBlockError``), so two uids never share a block.
* The backend (``linux``, ``posix``): their lifetime locks live in different
  places, so a block is shared only by processes of the same backend.

Never a hostname or an IP address: containers with host networking share
both without sharing /dev/shm. Where the platform knows no directory or boot
id, that part is left out and the identity is still stable for the processes
of one machine.

The value is cached per process and recomputed in a forked child (which may
have entered another mount namespace before it serialises anything) and after
``configure(directory=...)``.
"""

from __future__ import annotations

import hashlib
from typing import Final

from ._platform import backend
from ._process import ForkPhase, at_fork
from .errors import BlockNotFoundError

__all__ = ["IDENTITY_LENGTH", "check_same_shm", "forget", "shm_identity"]

IDENTITY_LENGTH: Final = 16  # hex digits

_cached: list[str] = []


def _compute() -> str:
    where = backend.namespace_key()
    text = f"sma-shm:{backend.name}:{backend.uid()}:{where}:{backend.boot_id()}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def shm_identity() -> str:
    """Identity of the shared-memory namespace this process sees, as 16 hex digits.

    Equal for all processes of the same effective uid that see the same
    namespace (same host, same boot, same tmpfs, same backend); different for
    a process on another host, after a reboot, or in a mount namespace with
    its own tmpfs on /dev/shm. Cached per process.

    Examples
    --------
    >>> len(shm_identity())
    16
    """
    if not _cached:
        _cached.append(_compute())
    return _cached[0]


def forget() -> None:
    """Compute the identity afresh at its next use (after a fork, or a new directory)."""
    _cached.clear()


def check_same_shm(name: str, identity: str | None) -> None:
    """Raise unless a handle made where ``identity`` was current can be attached here.

    Handles and tokens carry the identity of the process that made them;
    ``None`` (a handle that carried none) is accepted.

    Raises
    ------
    BlockNotFoundError
        ``identity`` is another namespace's: the block lives on another host.
    """
    if identity is not None and identity != shm_identity():
        raise BlockNotFoundError(
            name,
            f"block {name!r} lives on another host's /dev/shm (or another user's, or "
            "another mount namespace's): this handle cannot be attached here; send the "
            "data by value instead",
        )


at_fork(ForkPhase.PID, after_in_child=forget)
