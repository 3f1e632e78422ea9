"""The platform layer: the only place that knows how operating systems differ.

One backend is chosen at import and used by every layer above
(:data:`backend`); nothing else in the package tests ``sys.platform``, reads
``/proc``, or names ``/dev/shm``:

=========  ==================================================================
backend    where
=========  ==================================================================
linux      Linux (the tested platform): tmpfs files, OFD locks, ``/proc``,
           futexes, ``fallocate`` (:mod:`._linux`)
posix      other POSIX systems (macOS): ``shm_open``, ``flock`` on lock files
           in a private directory, names of at most 30 bytes
           (:mod:`._posix`); on Linux with ``SHARED_MEMORY_ARRAY_BACKEND=posix``
windows    Windows: named file mappings (:mod:`._windows`; untested)
=========  ==================================================================

``SHARED_MEMORY_ARRAY_BACKEND`` (``linux``, ``posix`` or ``windows``) picks one
explicitly; ``SHARED_MEMORY_ARRAY_DIR`` puts blocks in another memory
filesystem (see :func:`shared_memory_array.configure`). Both are read once,
at import. The contract every backend keeps is :class:`._common.Backend`.
"""

from __future__ import annotations

import os
from typing import Final

from . import _linux, _posix
from ._common import COUNTER, DICT, HOLD, OWNER, PREFIX, Backend, BlockLocks, Limits, exhausted

__all__ = [
    "BACKEND_ENV",
    "COUNTER",
    "DICT",
    "DIRECTORY_ENV",
    "HOLD",
    "OWNER",
    "PREFIX",
    "Backend",
    "BlockLocks",
    "Limits",
    "backend",
    "exhausted",
]

BACKEND_ENV: Final = "SHARED_MEMORY_ARRAY_BACKEND"
DIRECTORY_ENV: Final = "SHARED_MEMORY_ARRAY_DIR"


def _choose() -> Backend:
    requested = os.environ.get(BACKEND_ENV, "").strip().lower()
    if requested == "posix" or (not requested and os.name == "posix" and not _linux.available()):
        if not _posix.available():
            raise ImportError(f"{BACKEND_ENV}=posix: this system has no POSIX shared memory")
        return _posix.PortableBackend()
    if requested == "windows" or (not requested and os.name == "nt"):
        from . import _windows

        windows: Backend = _windows.WindowsBackend()
        return windows
    if requested in ("", "linux"):
        if not _linux.available():
            raise ImportError(f"{BACKEND_ENV}=linux: this system has no OFD locks (Linux >= 3.15)")
        return _linux.LinuxBackend()
    raise ImportError(f"{BACKEND_ENV}={requested!r}: expected 'linux', 'posix' or 'windows'")


backend: Final[Backend] = _choose()
"""The backend of this process, chosen at import."""

if os.environ.get(DIRECTORY_ENV):
    backend.configure_directory(os.environ[DIRECTORY_ENV])
