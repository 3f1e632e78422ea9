"""The Windows backend: named file mappings. Documented here; NOT tested (no Windows CI).

Windows has no POSIX shared memory. A block is a named file mapping backed by
the paging file (``CreateFileMappingW`` with ``INVALID_HANDLE_VALUE``), as
``multiprocessing.shared_memory`` makes them, and it is mapped with
``mmap.mmap(-1, size, tagname=name)``.

How API.md's promises change here
---------------------------------
* **Lifetimes.** The kernel frees a mapping when its last handle closes: no
  block can leak, so there is no reaper, no ``cleanup`` work and no lock. But
  a block whose every holder has gone is gone: an owner's implicit end (its
  handle collected, its process exiting) frees the block unless another
  process maps it at that moment. A handle in flight is *not* protected: a
  worker that returns a ``SharedArray`` must keep it alive until the caller
  has loaded it (or the caller must own a handle first). ``unlink`` and an
  owner's ``close`` cannot remove a name others still map: they only drop this
  process's handle.
* **Listing.** Windows cannot enumerate named mappings: ``list_blocks`` is
  empty and ``cleanup`` does nothing.
* **Trust.** Mappings are created in the session's namespace with the default
  security descriptor (only this user and administrators can open them); the
  owner and mode checks of the POSIX backends do not apply.
* **No** ``pread``/``pwrite``, page reservation, huge pages, futexes or
  robust mutexes: reads and writes go through mappings, waiting polls with a
  bounded back-off, and a dict's lock is not available (``SharedDict`` needs a
  POSIX system).
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
from typing import Any, ClassVar

from ..errors import BlockExistsError, BlockNotFoundError
from ._common import Backend, BlockLocks, exhausted

__all__ = ["WindowsBackend"]

_INVALID_HANDLE_VALUE = -1
_PAGE_READWRITE = 0x04
_FILE_MAP_READ = 0x0004
_ERROR_ALREADY_EXISTS = 183


class _Mapping:
    """One opened (or, before it is sized, only named) file mapping."""

    __slots__ = ("handle", "name", "size")

    def __init__(self, name: str, handle: int = 0, size: int = 0) -> None:
        self.name, self.handle, self.size = name, handle, size


class _NoLocks:
    """Windows needs no lifetime locks: the kernel frees a mapping with its last handle."""

    __slots__ = ("_backend", "fd")

    def __init__(self, backend: WindowsBackend, fd: int) -> None:
        self._backend = backend
        self.fd = fd

    def descriptors(self) -> tuple[int, ...]:
        return ()

    def still_named(self) -> bool:
        return True

    def unlink_name(self) -> bool:
        return False  # a mapping's name goes with its last handle (see the module docstring)

    def try_lock(self, role: int, *, exclusive: bool) -> bool:
        return True

    def wait_lock(self, role: int, *, exclusive: bool) -> None:
        return None

    def unlock(self, role: int) -> None:
        return None

    def held_by_others(self, role: int) -> bool:
        return False

    def reopen_in_child(self) -> bool:
        return True

    def close(self) -> None:
        self._backend.close_descriptor(self.fd)
        self.fd = -1


class WindowsBackend(Backend):
    """Named file mappings on the paging file (untested: see the module docstring)."""

    name: ClassVar[str] = "windows"
    lock_files: ClassVar[bool] = False

    def __init__(self) -> None:
        self._mappings: dict[int, _Mapping] = {}
        self._numbers = itertools.count(1 << 20)  # never a real descriptor number

    def _winapi(self) -> Any:
        import _winapi  # type: ignore[import-not-found, unused-ignore]

        return _winapi

    def open_block(self, system_name: str, *, create: bool, writable: bool) -> int:
        number = next(self._numbers)
        if create:
            self._mappings[number] = _Mapping(system_name)  # sized by resize()
            return number
        winapi = self._winapi()
        try:
            handle = winapi.OpenFileMapping(_FILE_MAP_READ, False, system_name)
        except OSError as exc:
            raise BlockNotFoundError(system_name) from exc
        try:
            view = winapi.MapViewOfFile(handle, _FILE_MAP_READ, 0, 0, 0)
            try:
                size = winapi.VirtualQuerySize(view)
            finally:
                winapi.UnmapViewOfFile(view)
        except OSError:
            winapi.CloseHandle(handle)
            raise
        self._mappings[number] = _Mapping(system_name, handle, size)
        return number

    def resize(self, fd: int, size: int) -> None:
        mapping = self._mappings[fd]
        winapi = self._winapi()
        try:
            handle = winapi.CreateFileMapping(
                _INVALID_HANDLE_VALUE,
                0,
                _PAGE_READWRITE,
                size >> 32,
                size & 0xFFFFFFFF,
                mapping.name,
            )
        except OSError as exc:
            raise exhausted(exc, f"create block {mapping.name!r}", size) or exc from None
        if winapi.GetLastError() == _ERROR_ALREADY_EXISTS:
            winapi.CloseHandle(handle)
            raise BlockExistsError(mapping.name)
        mapping.handle, mapping.size = handle, size

    def fstat(self, fd: int) -> os.stat_result:
        mapping = self._mappings[fd]
        # A regular file of this user, mode 0600: the POSIX trust checks have nothing to say.
        return os.stat_result((stat.S_IFREG | 0o600, fd, 0, 1, -1, -1, mapping.size, 0, 0, 0))

    def close_descriptor(self, fd: int) -> None:
        mapping = self._mappings.pop(fd, None)
        if mapping is not None and mapping.handle:
            self._winapi().CloseHandle(mapping.handle)

    def unlink(self, system_name: str) -> bool:
        return False  # the kernel removes a mapping with its last handle

    def read_at(self, fd: int, size: int, offset: int) -> bytes:
        mapping = self._mappings[fd]
        end = min(mapping.size, offset + size)
        if end <= offset:
            return b""
        view = mmap.mmap(-1, mapping.size, tagname=mapping.name, access=mmap.ACCESS_READ)  # type: ignore[call-arg, unused-ignore]
        try:
            return view[offset:end]
        finally:
            view.close()

    def map(
        self, fd: int, size: int, *, readonly: bool, private: bool, populate: bool
    ) -> mmap.mmap:
        mapping = self._mappings[fd]
        access = (
            mmap.ACCESS_COPY if private else mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
        )
        return mmap.mmap(-1, size, tagname=mapping.name, access=access)  # type: ignore[call-arg, unused-ignore]

    def locks(self, fd: int, system_name: str, *, writable: bool, created: bool) -> BlockLocks:
        return _NoLocks(self, fd)

    @staticmethod
    def uid() -> int:
        return -1
