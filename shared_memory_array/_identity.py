"""An identity of the shared-memory filesystem this process sees.

Two processes can share a block by name exactly when they see the same
/dev/shm. :func:`shm_identity` returns a short hex string that is equal for
every process of one effective uid that sees the same /dev/shm, and different
otherwise. The adapters for Dask and Ray compare a receiver's identity with
their own to decide whether a handle can go *by handle* (the receiver attaches)
or must go *by value* (one copy through the engine).

What goes into it, and why
--------------------------
* ``st_dev`` and ``st_ino`` of /dev/shm: a tmpfs mount is one superblock with
  its own anonymous device number, so a worker in a private mount namespace
  with its own tmpfs on /dev/shm (a container without ``--ipc=host``) gets
  another identity, while a bind mount of the same tmpfs (``--ipc=host``,
  ``-v /dev/shm:/dev/shm``) keeps it: that is exactly "can attach by name".
* The kernel's ``boot_id`` (``/proc/sys/kernel/random/boot_id``, random at each
  boot, not namespaced): device numbers are small integers that repeat from
  host to host and from boot to boot; the boot id tells those apart.
* The effective uid: blocks are created mode 0600 and another user's block is
  refused (``UntrustedBlockError``), so two uids never share a block.

Never a hostname or an IP address: containers with host networking share
both without sharing /dev/shm. Where /dev/shm or the boot id is missing (not
Linux), the corresponding part is left out and the identity is still stable
for the processes of one machine.

The value is cached per process and recomputed in a forked child (a stat and
a 37-byte read, about 10 µs), since a child may have entered another mount
namespace before it serialises anything.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

from .errors import BlockNotFoundError

__all__ = ["IDENTITY_LENGTH", "check_same_shm", "shm_identity"]

IDENTITY_LENGTH: Final = 16  # hex digits

SHM_DIR = "/dev/shm"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"

_cache: dict[int, str] = {}  # pid -> identity: a forked child sees another pid


def _compute(shm_dir: str = SHM_DIR) -> str:
    try:
        info = os.stat(shm_dir)
        where = f"{info.st_dev}:{info.st_ino}"
    except OSError:
        where = "-"
    try:
        with open(_BOOT_ID, encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "-"
    euid = os.geteuid() if hasattr(os, "geteuid") else -1
    digest = hashlib.blake2b(f"sma-shm:{euid}:{where}:{boot}".encode(), digest_size=8)
    return digest.hexdigest()


def shm_identity() -> str:
    """Identity of the /dev/shm this process sees, as 16 hex digits.

    Equal for all processes of the same effective uid that see the same
    /dev/shm (same host, same boot, same tmpfs); different for a process on
    another host, after a reboot, or in a mount namespace with its own tmpfs on
    /dev/shm. Cached per process (and recomputed after ``fork``).

    Examples
    --------
    >>> len(shm_identity())
    16
    """
    pid = os.getpid()
    identity = _cache.get(pid)
    if identity is None:
        identity = _compute()
        _cache.clear()  # drop the parent's entry in a forked child
        _cache[pid] = identity
    return identity


def check_same_shm(name: str, identity: str | None) -> None:
    """Raise unless a handle made where ``identity`` was current can be attached here.

    Handles and tokens carry the identity of the process that made them;
    ``None`` (a handle that carried none) is accepted.

    Raises
    ------
    BlockNotFoundError
        ``identity`` is another /dev/shm's: the block lives on another host.
    """
    if identity is not None and identity != shm_identity():
        raise BlockNotFoundError(
            name,
            f"block {name!r} lives on another host's /dev/shm (or another user's, or "
            "another mount namespace's): this handle cannot be attached here; send the "
            "data by value instead",
        )
