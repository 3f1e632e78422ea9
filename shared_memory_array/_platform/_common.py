"""What every backend offers, and the parts the two POSIX backends share.

:class:`Backend` is the contract: the capability flags and the operations the
layers above call (block store, names, positional I/O, lifetime locks, the
process readers, wait/wake, clocks, free space). Each backend module fills it
in for one operating system (:mod:`._linux`, :mod:`._posix`, :mod:`._windows`);
defaults written here use only POSIX calls both POSIX backends have.

Lock roles
----------
The lifetime protocol (:mod:`.._lifetime`) names three locks per block, and
the dict one more. How a role is held is the backend's business: byte-range
OFD locks on the block's own file (Linux), or ``flock`` on one small lock file
per role in a private per-user directory (the portable backend).

=======  =================================================================
role     meaning
=======  =================================================================
HOLD     shared by every mapping that is not its block's owner; exclusive
         for microseconds by a process checking that nobody maps it
COUNTER  exclusive for microseconds while the lifetime words change
OWNER    exclusive by the block's owner
DICT     exclusive by the process inside a dict operation (only where the
         dict cannot use a robust mutex: the portable backend)
=======  =================================================================
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from ..errors import (
    AllocationError,
    BlockNotFoundError,
    UntrustedBlockError,
)

__all__ = [
    "COUNTER",
    "DICT",
    "HOLD",
    "OWNER",
    "PREFIX",
    "Backend",
    "BlockLocks",
    "Limits",
]

PREFIX: Final = "sma_"
"""Every block of this library has a system name starting with this."""

HOLD: Final = 0
COUNTER: Final = 1
OWNER: Final = 2
DICT: Final = 3

_UNTRUSTED_MODE_BITS: Final = stat.S_IWGRP | stat.S_IWOTH
# errno values meaning "this system is out of something": an AllocationError.
_EXHAUSTED: Final = {
    errno.EMFILE: "this process has no file descriptor left",
    errno.ENFILE: "the system has no file descriptor left",
    errno.ENOSPC: "the shared-memory filesystem is full (space or inodes)",
    errno.ENOMEM: "out of memory",
}


class BlockLocks(Protocol):
    """The lifetime locks one open description holds on one block (see the module docstring).

    It takes over the block's descriptor (``fd``) and closes it with the locks.
    ``unlink_name()`` removes the block's name only while it still names this
    block (never a newer block given the name since, nor one in another
    directory configured since) and says whether it did.
    ``held_by_others(role)`` asks whether any *other* holder has ``role``; it
    is only asked for roles this object does not hold itself, where both
    backends can answer it exactly.
    """

    fd: int

    def descriptors(self) -> tuple[int, ...]: ...
    def still_named(self) -> bool: ...
    def unlink_name(self) -> bool: ...
    def try_lock(self, role: int, *, exclusive: bool) -> bool: ...
    def wait_lock(self, role: int, *, exclusive: bool) -> None: ...
    def unlock(self, role: int) -> None: ...
    def held_by_others(self, role: int) -> bool: ...
    def reopen_in_child(self) -> bool: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    """What the system can still give a new block (API.md section 5: know before allocating).

    Attributes
    ----------
    free : int or None
        Bytes free on the shared-memory filesystem for this user.
    total : int or None
        Size of that filesystem.
    memory_limit : int or None
        The memory limit of this process's container (cgroup), where there is one.
    memory_used : int or None
        Memory the container uses now (shared pages included).
    where : str
        The filesystem, for messages.
    cgroup : str or None
        The control group whose limit applies, for messages.
    """

    free: int | None
    total: int | None
    memory_limit: int | None
    memory_used: int | None
    where: str
    cgroup: str | None = None


def exhausted(exc: OSError, what: str, size: int | None = None) -> AllocationError | None:
    """The :class:`AllocationError` for an ``OSError`` that means a resource ran out, else None."""
    why = _EXHAUSTED.get(exc.errno or 0)
    if why is None:
        return None
    error = AllocationError(f"cannot {what}: {why} ({exc.strerror})", size)
    error.__cause__ = exc
    return error


class Backend:
    """The contract every platform backend keeps; defaults use POSIX calls.

    Capabilities (class attributes) tell the layers above what holds where;
    they never test ``sys.platform`` themselves.
    """

    name: ClassVar[str] = "abstract"
    kernel_holds: ClassVar[bool] = False
    """Whether "does any process hold this block" can be asked of the kernel (implicit reaping)."""
    can_list: ClassVar[bool] = False
    """Whether this library's blocks can be enumerated (``list_blocks``, ``cleanup``, reaping)."""
    reserves_pages: ClassVar[bool] = False
    """Whether a new block's pages are reserved at creation (no SIGBUS on a full filesystem)."""
    positional_io: ClassVar[bool] = False
    """Whether blocks support ``pread``/``pwrite`` (else reads and writes go through a mapping)."""
    has_futex: ClassVar[bool] = False
    """Whether waiting on a shared word sleeps in the kernel (else a bounded back-off poll)."""
    robust_mutex: ClassVar[bool] = False
    """Whether a dict's lock can be a robust process-shared mutex in the block itself."""
    copy_on_write: ClassVar[bool] = True
    """Whether a private mapping shares the pages it has not written (else it is a copy)."""
    max_name_bytes: ClassVar[int] = 250
    """Longest system name, in bytes, without the leading slash."""
    lock_files: ClassVar[bool] = False
    """Whether the lifetime locks live in lock files beside the blocks, not on the blocks.

    Blocks made this way carry :attr:`~.._header.HeaderFlags.PORTABLE`; a
    backend of the other kind cannot see their locks, so it never reaps them.
    """

    # -- block store ---------------------------------------------------------------------

    @property
    def directory(self) -> str | None:
        """The directory whose files are the blocks, ``None`` for a shm namespace."""
        return None

    def namespace_key(self) -> str:
        """What tells this shared-memory namespace from others of the same boot, ``"-"`` if nothing.

        The blocks' directory's device and inode where blocks are files: a
        private tmpfs (a container without ``--ipc=host``) is another device.
        """
        directory = self.directory
        if directory is None:
            return "-"
        try:
            info = os.stat(directory)
        except OSError:
            return "-"
        return f"{directory}:{info.st_dev}:{info.st_ino}"

    def configure_directory(self, path: str | None) -> None:
        """Put new blocks in ``path`` (a memory filesystem), ``None`` for the system's place."""
        raise NotImplementedError(f"the {self.name} backend cannot place blocks in a directory")

    def system_name(self, name: str) -> str:
        """The system's name for the block a user calls ``name`` (already normalised)."""
        return name

    def open_block(self, system_name: str, *, create: bool, writable: bool) -> int:
        """Open (or with ``create``, exclusively create, mode 0600) a block; return a descriptor.

        Raises
        ------
        BlockExistsError, BlockNotFoundError, UntrustedBlockError, AllocationError
            As the names say; a symlink, FIFO or directory is a BlockNotFoundError.
        """
        raise NotImplementedError

    def open_held(
        self, system_name: str, *, writable: bool, header_bytes: int
    ) -> tuple[int, os.stat_result, bytes] | None:
        """:meth:`open_block`, :meth:`fstat`, the trust check and HOLD in one step, if it can.

        Returns ``(descriptor, its fstat, the first header_bytes of the block)`` with HOLD
        held shared on the descriptor, or ``None``: the caller takes those steps one by
        one (which also says why one of them fails). Only the accelerator does it here.
        """
        return None

    def fstat(self, fd: int) -> os.stat_result:
        """``fstat`` of a block's descriptor."""
        return os.fstat(fd)

    def close_descriptor(self, fd: int) -> None:
        """Close a descriptor :meth:`open_block` returned (before its locks took it over)."""
        os.close(fd)

    def unlink(self, system_name: str) -> bool:
        """Remove a block's name; ``False`` if it was gone already."""
        raise NotImplementedError

    def list_names(self) -> list[str]:
        """System names of this library's blocks (prefix :data:`PREFIX`), sorted."""
        return []

    def exists(self, system_name: str) -> bool:
        """Whether a block of this system name exists (cheaply: no open where avoidable)."""
        try:
            self.lstat_entry(system_name)
        except (OSError, ValueError):
            return False
        return True

    def forget_stale(self, system_name: str) -> bool:
        """Remove what is left of a block whose object is gone; ``True`` if anything was."""
        return False

    def lstat_entry(self, system_name: str) -> os.stat_result:
        """``lstat`` of the entry behind a name (never follows a link); FileNotFoundError."""
        raise FileNotFoundError(system_name)

    def open_for_judging(self, system_name: str) -> tuple[int, bool]:
        """Open a block to judge it: ``(descriptor, writable)``, never following a link.

        Raises
        ------
        OSError
            It cannot be opened (gone: FileNotFoundError).
        """
        raise NotImplementedError

    # -- bytes ---------------------------------------------------------------------------

    def read_at(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` without mapping (never a SIGBUS)."""
        return os.pread(fd, size, offset)

    def write_at(self, fd: int, data: memoryview, offset: int) -> bool:
        """Write all of ``data`` at ``offset``; ``False`` if blocks take no positional writes."""
        if not self.positional_io:
            return False
        while data:
            written = os.pwrite(fd, data, offset)  # Linux caps one call at about 2 GiB
            data = data[written:]
            offset += written
        return True

    def patch(self, fd: int, data: bytes, offset: int) -> None:
        """Write a few bytes at ``offset``: positionally, or through a brief mapping."""
        if self.write_at(fd, memoryview(data), offset):
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, offset + len(data) - start, offset=start)
        try:
            mapping[offset - start : offset - start + len(data)] = data
        finally:
            mapping.close()

    def resize(self, fd: int, size: int) -> None:
        """Set a new block's size (``ftruncate``; once only on some systems)."""
        os.ftruncate(fd, size)

    def reserve(self, fd: int, start: int, size: int) -> None:
        """Reserve the pages of ``[start, start + size)`` now, where the system can.

        Raises
        ------
        OSError
            The filesystem is full (ENOSPC); other errors of an unsupported
            reservation are swallowed.
        """

    def first_hole(self, fd: int, start: int, end: int) -> int | None:
        """The first offset in ``[start, end)`` with no page behind it, ``None`` if all there.

        Only where pages are reserved at creation; ``None`` elsewhere.
        """
        return None

    def map(
        self, fd: int, size: int, *, readonly: bool, private: bool, populate: bool
    ) -> mmap.mmap:
        """Map ``size`` bytes of the block open on ``fd``.

        The mapping never shares the open file description that carries the
        block's locks (see :mod:`.._lifetime`): a forked child inherits what a
        mapping keeps, and must not inherit a lock with it.
        """
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        if populate and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(fd, size, flags=flags, prot=prot)

    can_populate: ClassVar[bool] = False
    """Whether :meth:`populate` can map pages in without touching them (``MADV_POPULATE``)."""

    def populate(self, address: int, length: int) -> int:
        """Map ``length`` bytes at ``address`` into the page tables (read, then write pass).

        Returns 0, or an errno (``EINVAL``: the system cannot; the caller
        falls back to reading a byte of every page).
        """
        import errno as _errno

        return _errno.EINVAL

    def advise_huge_pages(self, mapping: mmap.mmap) -> None:
        """Ask for huge pages for a large mapping where the filesystem honours the advice."""

    # -- trust ---------------------------------------------------------------------------

    def trust_error(self, name: str, info: os.stat_result) -> Exception | None:
        """Why the block behind ``info`` must not be read, ``None`` if it may.

        Not a regular file: not a block. Another user's, or writable by group
        or others: untrusted (reading it could run their code or trust their
        header). Root is no exception.
        """
        if not stat.S_ISREG(info.st_mode):
            return BlockNotFoundError(name, f"{name!r} is not a shared-memory block")
        uid = self.uid()
        if uid >= 0 and info.st_uid != uid:
            return UntrustedBlockError(
                name,
                f"block {name!r} belongs to uid {info.st_uid}, not to this user "
                f"(uid {uid}): refusing to read it",
            )
        if info.st_mode & _UNTRUSTED_MODE_BITS:
            return UntrustedBlockError(
                name,
                f"block {name!r} is writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):o}): refusing to read it",
            )
        return None

    @staticmethod
    def uid() -> int:
        """This process's effective uid, -1 where there is none."""
        return os.geteuid() if hasattr(os, "geteuid") else -1

    # -- locks ---------------------------------------------------------------------------

    def locks(self, fd: int, system_name: str, *, writable: bool, created: bool) -> BlockLocks:
        """The lifetime locks of one open description of a block (see the module docstring).

        ``created``: the block was just created by this call (set up what its
        locks need, such as lock files).
        """
        raise NotImplementedError

    def fresh_locks(self, locks: BlockLocks, system_name: str) -> BlockLocks:
        """Locks of new open descriptions of the block ``locks`` lock (a dict's own lock).

        They lock that very block for as long as they live, even after its name
        is removed or given to a new block; :class:`BlockNotFoundError` if it
        already was.
        """
        raise NotImplementedError(f"the {self.name} backend cannot lock a dict")

    # -- processes -----------------------------------------------------------------------

    def start_time(self, pid: int) -> int:
        """Start time of process ``pid`` in clock ticks since boot, 0 where unknown."""
        return 0

    def process_state(self, pid: int) -> tuple[bytes, int] | None:
        """``(state letter, start time)`` of ``pid``, ``None`` where unknown."""
        return None

    def boot_id(self) -> str:
        """An id that changes at every boot, ``"-"`` where unknown."""
        return "-"

    def boot_time(self) -> float | None:
        """Seconds since the epoch at which the machine booted, ``None`` where unknown."""
        return None

    def clock_ticks(self) -> int:
        """Clock ticks per second (the unit of :meth:`start_time`)."""
        try:
            return os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError, AttributeError):
            return 100

    def inodes_in_use(self, exclude: tuple[int, ...] = ()) -> set[int] | None:
        """Inodes of blocks any visible process maps or has open, ``None`` where unknown."""
        return None

    def mappers(self) -> dict[int, list[int]] | None:
        """Inode of each mapped block -> the pids that map it (sorted), in one look.

        ``None`` where the system does not tell.
        """
        return None

    def resident_bytes(self, info: os.stat_result) -> int | None:
        """Bytes of a block in memory, ``None`` where unknown."""
        return None

    def thread_gone(self, native_id: int | None) -> bool:
        """Whether the operating-system thread ``native_id`` has exited."""
        return True

    # -- waiting and time ----------------------------------------------------------------

    def shared_clock_ns(self) -> int:
        """Nanoseconds on a clock that every process of this host reads alike and never steps.

        The default is the wall clock, which can step: callers clamp stamps
        from the future (API.md section 0: clocks never stretch a bound).
        """
        import time

        return time.time_ns()

    def futex_wait(self, address: int, expected: int, timeout: float | None) -> None:
        """Sleep while the u32 at ``address`` equals ``expected`` (at most ``timeout`` s).

        Only where :attr:`has_futex`; may return early (the caller re-checks).
        """
        raise NotImplementedError

    def futex_wake(self, address: int) -> None:
        """Wake every process sleeping on the u32 at ``address``."""

    def futex_add(self, address: int, delta: int) -> bool:
        """Atomically add ``delta`` (-2048 to 2047) to the u32 at ``address``; wake its sleepers.

        ``False`` where there is no such atomic operation (the caller locks).
        """
        return False

    # -- robust process-shared mutexes (where :attr:`robust_mutex`) -----------------------

    MUTEX_BYTES: ClassVar[int] = 64
    """Bytes a mutex may take in shared memory (glibc's ``pthread_mutex_t``: 40 or 48)."""

    def mutex_init(self, address: int) -> None:
        """Make a robust, process-shared mutex at ``address`` (a shared mapping)."""
        raise NotImplementedError(f"the {self.name} backend has no robust mutex")

    def mutex_lock(self, address: int) -> bool:
        """Lock; ``True`` if the previous holder died holding it (the caller repairs)."""
        raise NotImplementedError

    def mutex_consistent(self, address: int) -> None:
        """After a repair: the mutex a dead holder left is consistent again."""
        raise NotImplementedError

    def mutex_unlock(self, address: int) -> None:
        """Unlock."""
        raise NotImplementedError

    # -- limits --------------------------------------------------------------------------

    def limits(self) -> Limits:
        """What the system can still give (free space; the container's memory)."""
        directory = self.directory
        if directory is None:
            return Limits(None, None, None, None, "shared memory")
        try:
            fs = os.statvfs(directory)
        except OSError:
            return Limits(None, None, None, None, directory)
        return Limits(fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize, None, None, directory)


def scan_prefixed(directory: str) -> Iterator[str]:
    """Names in ``directory`` that start with :data:`PREFIX` (nothing if it cannot be read)."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(PREFIX):
                    yield entry.name
    except OSError:
        return
