"""Named shared-memory blocks: create, attach, close, unlink.

This is the bottom layer. A :class:`SharedBlock` is one process's mapping of
one named POSIX shared-memory object; it knows nothing of headers or arrays.

Rules this module keeps, and why
--------------------------------
* **Names.** Generated names are ``sma_`` + 16 hex digits (21 characters with
  the leading slash, under macOS's 31-character limit). Every block of this
  library starts with :data:`PREFIX`, which is how ``list_blocks`` and
  ``cleanup`` find them. Names are passed around without the leading slash.
* **Creation** uses ``O_CREAT | O_EXCL`` and mode ``0600``: a name collision is
  an error, never a silent attach, and only the owning user can open the block.
* **No resource tracker.** ``multiprocessing.shared_memory.SharedMemory``
  registers every block it opens with the resource tracker, which on Python <
  3.13 unlinks it (and warns about a "leak") when *any* process that merely
  attached exits. This module calls ``_posixshmem`` directly, so no tracker ever
  hears of our blocks.
* **Lifetimes are asked of the kernel** (:mod:`._lifetime`, :mod:`._reaper`):
  every mapping keeps a descriptor holding a shared HOLD lock until the mapping
  itself goes (after its last view); the creator also holds OWNER. When a
  mapping goes and its block has no owner, the reaper unlinks it if nobody else
  holds it; the first block-creating call of a process (then every few seconds)
  and every normal exit reap what nobody holds. Kinds decide only when an end
  is explicit (``unlink`` now).
* **Only your own blocks.** ``attach`` refuses, on the descriptor it maps (not
  on the name, which can change in between), a block of another user or one
  that group or others may write (:class:`~shared_memory_array.UntrustedBlockError`),
  and on Linux one whose pages are not all allocated (reading it could SIGBUS:
  :class:`~shared_memory_array.LayoutError`). Symlinks, FIFOs and directories
  named like blocks are not blocks (:class:`~shared_memory_array.BlockNotFoundError`).
* **Exhaustion** of /dev/shm space or inodes, or of file descriptors, is an
  :class:`~shared_memory_array.AllocationError`, never a raw ``OSError``.
* **Reserve, don't overcommit.** On Linux the pages are reserved with
  ``posix_fallocate`` at creation, so a block that does not fit in /dev/shm
  fails at once with :class:`~shared_memory_array.AllocationError`, instead of
  a SIGBUS later when a page is first touched.
* **Views keep their memory alive.** ``close()`` drops this handle's reference
  to the mapping and unmaps it only if nothing else exports its buffer; arrays
  and memoryviews handed out earlier keep the mapping (through their ``.base``
  chain) until the last of them is gone. Closing never invalidates a view.
* **File descriptors.** One per mapping, kept until the mapping goes (its HOLD
  lock lives on it); :meth:`SharedBlock.fileno` hands it out for ``pwrite`` and
  ``flock``. On Python < 3.13 CPython's ``mmap`` keeps a private duplicate too
  (same open file description, so the same locks); 3.13 is told not to
  (``trackfd=False``).

Platforms: Linux is tested. macOS uses the same POSIX calls without
``posix_fallocate``. Windows falls back to ``SharedMemory`` (no tracker there);
its blocks vanish with their last handle, and ``unlink`` is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
import sys
import weakref
from typing import Final

from . import _lifetime, _reaper
from ._lifetime import this_pid
from .errors import (
    AllocationError,
    BlockExistsError,
    BlockNotFoundError,
    LayoutError,
    UntrustedBlockError,
)

__all__ = [
    "GENERATED_NAME_PATTERN",
    "PREFIX",
    "SharedBlock",
    "new_name",
    "normalize_name",
    "pwrite_all",
    "unlink_block",
]

PREFIX: Final = "sma_"
MAX_NAME_LENGTH: Final = 250  # NAME_MAX (255) of /dev/shm, in bytes, less a margin
_RANDOM_NAME_HEX: Final = 16
GENERATED_NAME_PATTERN: Final = re.escape(PREFIX) + f"[0-9a-f]{{{_RANDOM_NAME_HEX}}}"
"""Regular expression matching exactly the names :func:`new_name` generates."""

try:
    import _posixshmem
except ImportError:  # Windows
    _HAVE_POSIX_SHM = False
else:
    _HAVE_POSIX_SHM = True

_HAVE_PWRITE = hasattr(os, "pwrite")
_LINUX = sys.platform.startswith("linux")
_HAVE_FALLOCATE = _LINUX and hasattr(os, "posix_fallocate")
# errno values meaning "this filesystem cannot preallocate": go on without it.
_FALLOCATE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}
# errno values meaning "the system is out of something": an AllocationError.
_EXHAUSTED = {
    errno.EMFILE: "this process has no file descriptor left",
    errno.ENFILE: "the system has no file descriptor left",
    errno.ENOSPC: "/dev/shm is full (space or inodes)",
    errno.ENOMEM: "out of memory",
}
_UNTRUSTED_MODE_BITS = stat.S_IWGRP | stat.S_IWOTH
_HEADER_READ = 4096  # bytes read at once for a header: every common header fits


def normalize_name(name: object) -> str:
    """Return ``name`` without a leading slash, checked for type and form.

    Raises
    ------
    TypeError
        ``name`` is not a string.
    BlockNotFoundError
        ``name`` cannot name a block (empty, too long, with ``/`` or NUL inside,
        or not encodable: a lone surrogate).
    """
    if not isinstance(name, str):
        raise TypeError(f"a block name must be a str, not {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    try:
        encoded_length = len(bare.encode("utf-8"))
    except UnicodeEncodeError:
        raise BlockNotFoundError(
            bare, f"{name!r} is not a valid shared-memory block name (not encodable)"
        ) from None
    if not bare or encoded_length > MAX_NAME_LENGTH or "/" in bare or "\x00" in bare:
        raise BlockNotFoundError(bare, f"{name!r} is not a valid shared-memory block name")
    return bare


def new_name(prefix: str = PREFIX) -> str:
    """Return a fresh random block name starting with ``prefix``."""
    return prefix + secrets.token_hex(_RANDOM_NAME_HEX // 2)


def unlink_block(name: str) -> bool:
    """Unlink the block ``name``; return ``False`` if it was already gone."""
    if not _HAVE_POSIX_SHM:
        return False
    try:
        _posixshmem.shm_unlink("/" + normalize_name(name))
    except FileNotFoundError:
        return False
    return True


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (``pwrite`` may write less per call)."""
    while data:
        written = os.pwrite(fd, data, offset)  # Linux caps one call at about 2 GiB
        data = data[written:]
        offset += written


def _exhausted(exc: OSError, what: str, size: int | None = None) -> AllocationError | None:
    """The AllocationError for an ``OSError`` that means a resource ran out, else ``None``."""
    why = _EXHAUSTED.get(exc.errno or 0)
    if why is None:
        return None
    error = AllocationError(f"cannot {what}: {why} ({exc.strerror})", size)
    error.__cause__ = exc
    return error


def _mapping_gone(hold: _lifetime.Hold) -> None:
    """The last view of a mapping went: close its descriptor; reap if the block has no owner."""
    name = hold.name
    try:
        hold.drop_owner()
        ownerless = not hold.owner_elsewhere()
        hold.close()
    except OSError:
        return
    if ownerless:
        _reaper.after_last_mapping(name)


_mapping_refs: dict[weakref.ref[mmap.mmap], _lifetime.Hold] = {}


def _mapping_collected(ref: weakref.ref[mmap.mmap]) -> None:
    hold = _mapping_refs.pop(ref, None)
    if hold is not None:
        # A weak-reference callback: it may run at any allocation, and at interpreter
        # shutdown; an error here has no caller to go to (the reaper's next scan retries).
        with contextlib.suppress(Exception):
            _mapping_gone(hold)


# Windows-only and platforms without OFD locks: what this process created, unlinked at exit.
_created_here: dict[str, int] = {}


class SharedBlock:
    """One mapping of a named shared-memory block.

    Use :meth:`create` or :meth:`attach`; the constructor is not public.

    Attributes
    ----------
    name : str
        Block name without the leading slash.
    size : int
        Mapped size in bytes (the size of the block when it was mapped).
    readonly : bool
        Whether the mapping is read-only.
    """

    name: str
    size: int
    readonly: bool
    # Class-level defaults so close() works on a half-built instance.
    _mmap: mmap.mmap | None = None
    _view: memoryview | None = None
    _hold: _lifetime.Hold | None = None
    _owner_pid: int = 0
    _shm: object = None  # Windows fallback only

    def __init__(self) -> None:
        raise TypeError("use SharedBlock.create() or SharedBlock.attach()")

    @classmethod
    def create(
        cls,
        size: int,
        *,
        name: str | None = None,
        populate: bool = False,
    ) -> SharedBlock:
        """Create a new block of ``size`` bytes, zero-filled, readable by its owner only.

        The new mapping holds the block and owns it (its OWNER lock, see
        :mod:`._lifetime`) until :meth:`._lifetime.Hold.drop_owner` or until it goes.

        Parameters
        ----------
        size
            Bytes to reserve (> 0).
        name
            Exact name to use; a random name with :data:`PREFIX` when ``None``.
        populate
            Map every page now (``MAP_POPULATE``) so first writes take no page faults.

        Raises
        ------
        AllocationError
            The system cannot provide ``size`` bytes of shared memory, an inode
            in /dev/shm, or a file descriptor.
        BlockExistsError
            ``name`` was given and a block of that name already exists.
        """
        if size <= 0:
            raise ValueError(f"a block needs a positive size, got {size}")
        _reaper.maybe_reap_all()
        self = object.__new__(cls)
        self.readonly = False
        self.size = size
        if not _HAVE_POSIX_SHM:
            self._create_windows(size, name)
            return self
        explicit = name is not None
        while True:
            self.name = normalize_name(name) if explicit else new_name()
            try:
                fd = _posixshmem.shm_open(
                    "/" + self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600
                )
            except FileExistsError:
                if explicit:
                    raise BlockExistsError(self.name) from None
                continue  # random-name collision: draw again
            except OSError as exc:
                raise _exhausted(exc, f"create block {self.name!r}", size) or exc from None
            break
        self._owner_pid = this_pid()
        try:
            info = os.fstat(fd)
            self._hold = _lifetime.Hold(
                fd, self.name, writable=True, dev=info.st_dev, ino=info.st_ino
            )
        except BaseException:
            os.close(fd)
            unlink_block(self.name)
            raise
        try:
            _lifetime.hold_shared(fd, wait=False)  # a new file: nobody else can hold it
            self._hold.take_owner()
            self._reserve(size)
            self._map(size, populate=populate)
        except BaseException:
            self.close()
            unlink_block(self.name)
            raise
        if not _lifetime.HAVE_OFD_LOCKS:
            _created_here[self.name] = self._owner_pid
        _reaper.exit_hook.arm()
        return self

    @classmethod
    def attach(cls, name: str, *, readonly: bool = False, wait: bool = True) -> SharedBlock:
        """Map the existing block ``name`` in full.

        ``wait``: while another process holds the block exclusively (a reaper
        judging it, a codec writer rewriting it: microseconds to milliseconds),
        wait for it; without, raise :class:`BlockNotFoundError` ("busy") at once.

        Raises
        ------
        BlockNotFoundError
            No block of that name exists (or the name is a symlink, FIFO or directory).
        UntrustedBlockError
            The block belongs to another user, or group or others may write it.
        LayoutError
            The block's pages are not all allocated (Linux): reading it could SIGBUS.
        AllocationError
            No file descriptor or address space is left.
        TypeError
            ``name`` is not a string.
        """
        bare = normalize_name(name)
        self = object.__new__(cls)
        self.name = bare
        self.readonly = readonly
        if not _HAVE_POSIX_SHM:
            self._attach_windows(bare)
            return self
        # O_NONBLOCK: opening a FIFO named like a block must not hang (no effect on a block).
        access = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NONBLOCK
        try:
            fd = _posixshmem.shm_open("/" + bare, access)
        except FileNotFoundError:
            raise BlockNotFoundError(bare) from None
        except PermissionError:
            raise UntrustedBlockError(
                bare, f"block {bare!r} belongs to another user (permission denied)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # glibc opens with O_NOFOLLOW
                raise BlockNotFoundError(
                    bare, f"{bare!r} is a symbolic link, not a shared-memory block"
                ) from None
            if exc.errno == errno.EINVAL:  # glibc's answer for a directory of that name
                raise BlockNotFoundError(bare, f"{bare!r} is not a shared-memory block") from None
            raise _exhausted(exc, f"open block {bare!r}") or exc from None
        try:
            info = os.fstat(fd)
            _check_trusted(bare, info)
            self._hold = _lifetime.Hold(
                fd, bare, writable=not readonly, dev=info.st_dev, ino=info.st_ino
            )
        except BaseException:
            os.close(fd)
            raise
        try:
            if not _lifetime.try_lock(fd, _lifetime.HOLD, exclusive=False):
                # A reaper (or a codec writer rewriting it) holds it for microseconds.
                if not _lifetime.hold_shared(fd, wait=wait):
                    raise BlockNotFoundError(bare, f"block {bare!r} is busy (being rewritten)")
                _check_still_named(bare, info)
            self.size = info.st_size
            if self.size > 0:
                self._map(self.size, populate=False)
            else:  # mmap refuses 0 bytes; an empty view lets the header parser say what is wrong
                self._view = memoryview(b"")
        except BaseException:
            self.close()
            raise
        _reaper.exit_hook.arm()
        return self

    # -- internals -------------------------------------------------------------------

    def _reserve(self, size: int) -> None:
        fd = self.fileno()
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise AllocationError(
                f"cannot size shared-memory block {self.name!r} to {size} bytes: {exc.strerror}",
                size,
            ) from exc
        if not _HAVE_FALLOCATE:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in _FALLOCATE_UNSUPPORTED:
                return
            raise AllocationError(
                f"cannot reserve {size} bytes of shared memory for {self.name!r}: "
                f"{exc.strerror} (is /dev/shm full?)",
                size,
            ) from exc

    def _map(self, size: int, *, populate: bool) -> None:
        hold = self._hold
        assert hold is not None
        flags = mmap.MAP_SHARED
        if populate and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE
        prot = mmap.PROT_READ if self.readonly else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            if sys.version_info >= (3, 13):
                # The hold's own descriptor carries the locks; mmap need not duplicate it.
                self._mmap = mmap.mmap(hold.fd, size, flags=flags, prot=prot, trackfd=False)
            else:
                self._mmap = mmap.mmap(hold.fd, size, flags=flags, prot=prot)
        except OSError as exc:
            raise _exhausted(exc, f"map {size} bytes of {self.name!r}", size) or exc from None
        # The descriptor, and with it the HOLD lock, goes when the mapping goes: after the
        # last view of it, however long after close() that is.
        # A weak reference with a callback (cheaper than weakref.finalize, and not run at
        # interpreter exit, where the exit hook lets go of every hold at once: _reaper).
        ref = weakref.ref(self._mmap, _mapping_collected)
        _mapping_refs[ref] = hold
        self._view = memoryview(self._mmap)

    def _create_windows(self, size: int, name: str | None) -> None:  # pragma: no cover
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=name or new_name(), create=True, size=size)
        self._shm, self.name, self._view = shm, shm.name, shm.buf
        self._owner_pid = this_pid()

    def _attach_windows(self, name: str) -> None:  # pragma: no cover
        from multiprocessing import shared_memory

        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise BlockNotFoundError(name) from None
        self._shm, self.size, self._view = shm, shm.size, shm.buf

    # -- public surface ----------------------------------------------------------------

    @property
    def buf(self) -> memoryview:
        """The whole mapping as a (1-D, unsigned byte) memoryview.

        Raises
        ------
        ValueError
            The handle is closed.
        """
        view = self._view
        if view is None:
            raise ValueError(f"shared-memory block {self.name!r} is closed")
        return view

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._view is None

    @property
    def created_here(self) -> bool:
        """Whether this process created the block (a forked child did not)."""
        return self._owner_pid == this_pid()

    @property
    def hold(self) -> _lifetime.Hold:
        """This mapping's descriptor and locks (see :mod:`._lifetime`).

        Raises
        ------
        ValueError
            The handle is closed.
        """
        hold = self._hold
        if hold is None or hold.fd < 0:
            raise ValueError(f"shared-memory block {self.name!r} is closed")
        return hold

    def fileno(self) -> int:
        """Return this mapping's descriptor (valid until :meth:`close`)."""
        return self.hold.fd

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the block at byte ``offset``.

        This is ``pwrite``: the kernel copies into the block's pages without
        faulting them into this mapping, much cheaper for fresh pages (1 GiB
        here: 0.56 s, against 0.9 s to populate the mapping and copy through it).
        """
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise ValueError(f"{len(view)} bytes at offset {offset} overflow block {self.name!r}")
        if _HAVE_PWRITE and self._hold is not None and self._hold.fd >= 0:
            pwrite_all(self._hold.fd, view, offset)
        else:
            self.buf[offset : offset + len(view)] = view

    def header_bytes(self) -> bytes | memoryview:
        """The block's first bytes, at least its whole header, read without the mapping.

        ``pread`` copies them from the page cache: touching the mapping instead
        would fault a page into it and make the ``munmap`` of ``close()`` pay a
        TLB flush, more than half the cost of an attach here. Pass the result
        to ``parse_header(..., block_size=block.size)``.
        """
        hold = self._hold
        if not _HAVE_PWRITE or hold is None or hold.fd < 0 or self.size == 0:
            return self.buf
        raw = os.pread(hold.fd, min(self.size, _HEADER_READ), 0)
        if len(raw) >= 20:
            header_size = int.from_bytes(raw[16:20], "little")
            if len(raw) < header_size <= min(self.size, 1 << 20):
                raw = os.pread(hold.fd, header_size, 0)  # a long header (many dims, a big dtype)
        return raw

    def lifetime_words(self, offset: int) -> _lifetime.LifetimeWords | None:
        """The lifetime words at ``offset`` (a v2 header's), ``None`` if they cannot change."""
        if self.readonly or not _lifetime.HAVE_OFD_LOCKS:
            return None
        return _lifetime.LifetimeWords(self.buf, self.fileno(), offset)

    def close(self) -> None:
        """Release this handle's mapping; idempotent.

        Views handed out earlier stay valid: the mapping is unmapped, and its
        descriptor closed (which drops this process's hold on the block), when
        the last of them is garbage collected.
        """
        view, self._view = self._view, None
        mapping, self._mmap = self._mmap, None
        # BufferError below means views handed out earlier are alive: they keep
        # the mapping, which is unmapped when the last of them is collected.
        if view is not None:
            with contextlib.suppress(BufferError):
                view.release()
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()
            del mapping  # the last reference, unless views keep it: runs _mapping_gone
        elif self._hold is not None and self._hold.fd >= 0:
            _mapping_gone(self._hold)  # never mapped (an empty block, a failed create)
        shm, self._shm = self._shm, None
        if shm is not None:  # pragma: no cover - Windows
            with contextlib.suppress(BufferError):
                shm.close()  # type: ignore[attr-defined]

    def unlink(self) -> None:
        """Remove the block's name from the system now; idempotent.

        Mappings (in any process) stay valid until they are closed; no new
        process can attach afterwards.
        """
        _created_here.pop(self.name, None)
        unlink_block(self.name)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes"
        return f"<SharedBlock {self.name!r} {state}>"


def _check_trusted(name: str, info: os.stat_result) -> None:
    """Refuse what is not a block, not this user's, writable by others, or sparse."""
    if not stat.S_ISREG(info.st_mode):  # a FIFO, directory, device... named like a block
        raise BlockNotFoundError(name, f"{name!r} is not a shared-memory block")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise UntrustedBlockError(
            name,
            f"block {name!r} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}): refusing to read it",
        )
    if info.st_mode & _UNTRUSTED_MODE_BITS:
        raise UntrustedBlockError(
            name,
            f"block {name!r} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}): refusing to read it",
        )
    # tmpfs counts allocated pages in st_blocks (512-byte units): a block we created is
    # fully reserved; fewer blocks mean holes, whose first touch may SIGBUS when
    # /dev/shm is full.
    if _LINUX and info.st_blocks * 512 < info.st_size:
        raise LayoutError(
            f"block {name!r} has {info.st_blocks * 512} of its {info.st_size} bytes "
            "allocated: reading the rest could crash this process (SIGBUS)"
        )


def _check_still_named(name: str, info: os.stat_result) -> None:
    """After waiting for a reaper: the name must still be the file that was opened."""
    if not _LINUX:
        return
    try:
        now = os.stat(os.path.join(_reaper.SHM_DIR, name))
    except FileNotFoundError:
        raise BlockNotFoundError(name) from None
    if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
        raise BlockNotFoundError(name, f"block {name!r} was removed while being attached")


def unlink_created_at_exit() -> None:
    """Platforms without OFD locks: unlink what this process created (the old rule)."""
    pid = this_pid()
    for name, creator in list(_created_here.items()):
        if creator == pid:
            with contextlib.suppress(OSError):
                unlink_block(name)
    _created_here.clear()


if not _lifetime.HAVE_OFD_LOCKS:  # pragma: no cover - macOS
    import atexit

    atexit.register(unlink_created_at_exit)
