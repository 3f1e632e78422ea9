"""Which /dev/shm a process sees: the identity a handle carries so it never attaches a stranger.

A handle (a pickled ``SharedArray`` or ``SharedDict``, a shared-memory token)
names a block. On another host, or in a container or mount namespace with a
/dev/shm of its own, the same name may be absent or, worse, name a different
block. So handles carry :func:`shm_identity` of the process that made them, and
the receiver compares it with its own before it attaches: another identity means
"this block lives on another host's /dev/shm" (a clear
:class:`~shared_memory_array.BlockNotFoundError`), never a wrong attach.

The identity hashes what decides which files a name reaches: the effective uid
(blocks are per-user, mode 0600), the device and inode of /dev/shm (a private
tmpfs mounted on it in another mount namespace is another device), and the
kernel's boot id (another host, or this one after a reboot). Never hostnames or
IP addresses: host-network containers share those without sharing /dev/shm.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Final

from .errors import BlockNotFoundError

__all__ = ["IDENTITY_LENGTH", "check_same_shm", "shm_identity"]

IDENTITY_LENGTH: Final = 16  # hex digits
_BOOT_ID: Final = "/proc/sys/kernel/random/boot_id"
_SHM_DIR: Final = "/dev/shm"


def _compute() -> str:
    parts = [str(os.geteuid() if hasattr(os, "geteuid") else -1)]
    try:
        info = os.stat(_SHM_DIR)
        parts.append(f"{info.st_dev}:{info.st_ino}")
    except OSError:
        parts.append("no-shm-dir")
    try:
        with open(_BOOT_ID, encoding="ascii") as boot:
            parts.append(boot.read().strip())
    except OSError:
        parts.append("no-boot-id")
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=IDENTITY_LENGTH // 2)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _identity_for(pid: int) -> str:
    return _compute()


def shm_identity() -> str:
    """Identity of the /dev/shm this process sees, as hex (recomputed after a fork).

    Equal in every process of one user that sees the same /dev/shm on the same
    boot; different on another host, in a mount namespace with its own
    /dev/shm, or for another user.
    """
    return _identity_for(os.getpid())


def check_same_shm(name: str, identity: str | None) -> None:
    """Raise unless a handle made where ``identity`` was current can be attached here.

    ``None`` (a handle from a version that carried no identity) is accepted.

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
