"""The Linux backend: blocks are files of a tmpfs (``/dev/shm``), lifetimes are OFD locks.

* **Store.** A block is the file ``<directory>/<name>``: ``/dev/shm`` (what
  ``shm_open`` uses) or the directory given to ``configure(directory=...)``
  (another tmpfs, one mounted with huge pages). Opened with ``O_NOFOLLOW`` and
  ``O_NONBLOCK`` (a FIFO named like a block never hangs an open), created with
  ``O_EXCL`` and mode 0600.
* **Locks.** Byte-range open-file-description locks (``F_OFD_SETLK``, Linux >=
  3.15) on bytes 0-2 of the block's file, one byte per role. They belong to
  one open file description and go when its last descriptor closes, also when
  the process dies by any signal; ``F_OFD_GETLK`` tells whether another
  description holds one, without taking it.
* **Pages.** ``posix_fallocate`` reserves a new block's pages, so a block that
  does not fit fails at once instead of a SIGBUS at first touch; ``SEEK_HOLE``
  finds a page that is not there (a block of someone else's, or one cut short
  by a kill during its reservation) before anyone maps it.
* **Processes.** ``/proc``: start times, the boot id and boot time, who maps or
  holds a block open, the time namespace's clock offset.
* **Waiting.** ``futex`` through ``ctypes`` (``syscall``; the GIL is released
  while it sleeps), on shared (not ``FUTEX_PRIVATE``) words of a mapping.
* **Limits.** ``statvfs`` of the directory, and the memory limit of the
  process's cgroup (v2 ``memory.max``/``memory.current``, v1
  ``memory.limit_in_bytes``/``memory.usage_in_bytes``), up to the root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct
import sys
from collections.abc import Callable
from typing import ClassVar, Final

from .. import _accel
from ..errors import BlockExistsError, BlockNotFoundError, UntrustedBlockError
from . import _common
from ._common import HOLD, Backend, BlockLocks, Limits, exhausted

__all__ = ["LinuxBackend", "available"]

SHM_DIR: Final = "/dev/shm"
_PROC_OFFSETS: Final = "/proc/self/timens_offsets"
# struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t).
_FLOCK: Final = struct.Struct("hhqqi4x")
_UNLOCK_ALL: Final = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 4, 0)  # every role's byte
_FALLOCATE_UNSUPPORTED: Final = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}
_HUGE_PAGE_MIN: Final = 2 << 20
_CGROUP_UNLIMITED: Final = 1 << 62
# futex(2) system call numbers by machine.
_SYS_FUTEX: Final = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
    "riscv64": 98,
    "i386": 240,
    "i686": 240,
    "armv7l": 240,
    "ppc64le": 221,
    "ppc64": 221,
    "s390x": 238,
}
_MADV_POPULATE_READ: Final = 22
_MADV_POPULATE_WRITE: Final = 23
_FUTEX_WAIT: Final = 0
_FUTEX_WAKE: Final = 1
_FUTEX_WAKE_OP: Final = 5
_FUTEX_OP_ADD: Final = 1
_INT_MAX: Final = 0x7FFFFFFF


def available() -> bool:
    """Whether this system has what the backend needs (Linux with OFD locks)."""
    return sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_syscall() -> Callable[..., int] | None:
    if platform.machine().lower() not in _SYS_FUTEX:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover - a static interpreter
        return None
    function.restype = ctypes.c_long
    return function  # type: ignore[no-any-return, unused-ignore]


_syscall = _load_syscall()


def _load_madvise() -> Callable[[int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc symbols (static builds)
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return, unused-ignore]


_madvise = _load_madvise()


class _Pthread:
    """glibc's robust process-shared mutexes, through ``ctypes`` (the GIL is released)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        pointer = [ctypes.c_void_p]
        self.attr_init = libc.pthread_mutexattr_init
        self.attr_setpshared = libc.pthread_mutexattr_setpshared
        self.attr_setrobust = libc.pthread_mutexattr_setrobust
        self.attr_destroy = libc.pthread_mutexattr_destroy
        self.init = libc.pthread_mutex_init
        self.lock = libc.pthread_mutex_lock
        self.unlock = libc.pthread_mutex_unlock
        self.consistent = libc.pthread_mutex_consistent
        for function in (self.attr_init, self.attr_destroy, self.lock, self.unlock):
            function.argtypes = pointer
        self.consistent.argtypes = pointer
        self.attr_setpshared.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.attr_setrobust.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


def _load_pthread() -> _Pthread | None:
    try:
        return _Pthread()
    except (OSError, AttributeError):  # pragma: no cover - a libc without robust mutexes
        return None


_pthread = _load_pthread()
_PTHREAD_PROCESS_SHARED: Final = 1
_PTHREAD_MUTEX_ROBUST: Final = 1


class _OFDLocks:
    """The lifetime roles as OFD locks on one byte each of a block's file.

    Two open file descriptions: the block's own (``fd``: ``pread``, ``pwrite``,
    the mapping, and a *shared* HOLD), which never carries an exclusive lock,
    and a second one opened when first needed for every exclusive lock (OWNER,
    COUNTER, an exclusive HOLD, the dict's DICT byte). On Python < 3.13 a
    mapping keeps a duplicate of the descriptor it was made from, and a forked
    child inherits it: made from a description that holds no exclusive lock,
    no child can keep one of ours alive after we die.
    """

    __slots__ = ("_exclusive_fd", "fd", "path", "writable")

    def __init__(self, fd: int, path: str, *, writable: bool) -> None:
        self.fd = fd
        self.path = path
        self.writable = writable
        self._exclusive_fd = -1

    def still_named(self) -> bool:
        try:
            now, mine = os.lstat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def unlink_name(self) -> bool:
        if not self.still_named():
            return False
        try:
            os.unlink(self.path)  # the path it was opened at, whatever the directory is now
        except FileNotFoundError:
            return False
        return True

    def _fd_for(self, role: int, exclusive: bool) -> int:
        if role == HOLD and not exclusive:
            return self.fd
        fd = self._exclusive_fd
        if fd < 0:
            flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
            fd = self._exclusive_fd = os.open(f"/proc/self/fd/{self.fd}", flags)
        return fd

    @staticmethod
    def _call(fd: int, command: int, lock_type: int, role: int) -> int:
        answer = fcntl.fcntl(fd, command, _FLOCK.pack(lock_type, os.SEEK_SET, role, 1, 0))
        return int(_FLOCK.unpack(answer)[0])

    def try_lock(self, role: int, *, exclusive: bool) -> bool:
        fd = self._fd_for(role, exclusive)
        try:
            self._call(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, role)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def wait_lock(self, role: int, *, exclusive: bool) -> None:
        fd = self._fd_for(role, exclusive)
        self._call(fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, role)

    def unlock(self, role: int) -> None:
        if role == HOLD:
            self._call(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, role)
        if self._exclusive_fd >= 0:
            self._call(self._exclusive_fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, role)

    def held_by_others(self, role: int) -> bool:
        return self._call(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, role) != fcntl.F_UNLCK

    def descriptors(self) -> tuple[int, ...]:
        """Every descriptor these locks keep open."""
        return tuple(fd for fd in (self.fd, self._exclusive_fd) if fd >= 0)

    def reopen_in_child(self) -> bool:
        """Descriptions of the child's own (the very file, through ``/proc/self/fd``).

        The parent's exclusive locks do not fork: the inherited exclusive
        descriptor is closed (the parent's own keeps the locks).
        """
        exclusive, self._exclusive_fd = self._exclusive_fd, -1
        if exclusive >= 0:
            os.close(exclusive)
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", flags)
        except OSError:
            return False  # out of descriptors: the caller must not rely on these locks
        os.close(self.fd)
        self.fd = fd
        return True

    def close(self) -> None:
        """Unlock every role, then close: a mapping may keep the description alive."""
        fd, self.fd = self.fd, -1
        exclusive, self._exclusive_fd = self._exclusive_fd, -1
        for descriptor in (fd, exclusive):
            if descriptor >= 0:
                try:  # noqa: SIM105 (every close's path; suppress costs 0.27 µs)
                    fcntl.fcntl(descriptor, fcntl.F_OFD_SETLK, _UNLOCK_ALL)
                except OSError:
                    pass
                os.close(descriptor)


class LinuxBackend(Backend):
    """Blocks as tmpfs files, lifetimes as OFD locks, ``/proc`` for processes."""

    name: ClassVar[str] = "linux"
    kernel_holds: ClassVar[bool] = True
    can_list: ClassVar[bool] = True
    reserves_pages: ClassVar[bool] = True
    positional_io: ClassVar[bool] = True
    has_futex: ClassVar[bool] = _syscall is not None
    robust_mutex: ClassVar[bool] = _pthread is not None
    max_name_bytes: ClassVar[int] = 250  # NAME_MAX (255) of tmpfs, less a margin
    lock_files: ClassVar[bool] = False

    def __init__(self) -> None:
        self._directory = SHM_DIR
        self._huge_advice = False
        self._timens_offset: tuple[int, int] | None = None  # (pid, boottime offset ns)
        self._cgroup_files: list[tuple[str, str]] | None = None
        self.configure_directory(None)

    # -- block store ---------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._directory

    def configure_directory(self, path: str | None) -> None:
        directory = SHM_DIR if path is None else os.path.abspath(path)
        if path is not None and not os.path.isdir(directory):
            raise FileNotFoundError(errno.ENOENT, "no such directory", directory)
        self._directory = directory
        self._huge_advice = _wants_huge_page_advice(directory)

    def _path(self, system_name: str) -> str:
        return f"{self._directory}/{system_name}"

    def open_block(self, system_name: str, *, create: bool, writable: bool) -> int:
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        flags |= os.O_RDWR if writable or create else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(self._path(system_name), flags, 0o600)
        except FileExistsError:
            raise BlockExistsError(system_name) from None
        except FileNotFoundError:
            raise BlockNotFoundError(system_name) from None
        except PermissionError:
            raise UntrustedBlockError(
                system_name,
                f"block {system_name!r} belongs to another user (permission denied)",
            ) from None
        except OSError as exc:
            raise _open_error(system_name, exc) from None
        if create:
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o600)  # whatever the umask made of it
        return fd

    def open_held(
        self, system_name: str, *, writable: bool, header_bytes: int
    ) -> tuple[int, os.stat_result, bytes] | None:
        """The accelerator's attach step: open, fstat, trust, HOLD and header in one call."""
        if _accel.lib is None:
            return None
        answer = _accel.lib.open_held(self._path(system_name), writable, header_bytes)
        if type(answer) is int:
            return None  # refused, or an error: the step by step path says which
        fd, fields, header = answer  # type: ignore[misc]
        return fd, os.stat_result(fields), header

    def unlink(self, system_name: str) -> bool:
        try:
            os.unlink(self._path(system_name))
        except FileNotFoundError:
            return False
        return True

    def list_names(self) -> list[str]:
        return sorted(_common.scan_prefixed(self._directory))

    def lstat_entry(self, system_name: str) -> os.stat_result:
        return os.lstat(self._path(system_name))

    def open_for_judging(self, system_name: str) -> tuple[int, bool]:
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        path = self._path(system_name)
        try:
            return os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            return os.open(path, os.O_RDONLY | flags), False

    # -- bytes ---------------------------------------------------------------------------

    def reserve(self, fd: int, start: int, size: int) -> None:
        try:
            os.posix_fallocate(fd, start, size)
        except OSError as exc:
            if exc.errno not in _FALLOCATE_UNSUPPORTED:
                raise

    def first_hole(self, fd: int, start: int, end: int) -> int | None:
        if start >= end:
            return None
        try:
            hole = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # start at or past the end of the file
                return start
            return None  # the filesystem cannot tell
        return hole if hole < end else None

    def map(
        self, fd: int, size: int, *, readonly: bool, private: bool, populate: bool
    ) -> mmap.mmap:
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        if populate:
            flags |= mmap.MAP_POPULATE
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        # A mapping references the open file description it was made from for its whole
        # life (the kernel's vma, whatever Python does with the descriptor; CPython < 3.13
        # also keeps a dup of it), and a forked child inherits it. That description never
        # holds an exclusive lock (_OFDLocks), and its shared HOLD is unlocked explicitly
        # when the hold closes (at exit too, while views still map the block): no mapping,
        # here or in a child, keeps one of our locks alive.
        if sys.version_info >= (3, 13):
            return mmap.mmap(fd, size, flags=flags, prot=prot, trackfd=False)
        return mmap.mmap(fd, size, flags=flags, prot=prot)

    can_populate: ClassVar[bool] = _madvise is not None

    def populate(self, address: int, length: int) -> int:
        """``madvise(MADV_POPULATE_READ)`` then ``MADV_POPULATE_WRITE`` (Linux >= 5.14).

        The read pass goes first because read faults of a file mapping map up
        to 16 neighbouring pages at once ("fault-around"); the write pass then
        only walks them. Populating fails with an error code, never a SIGBUS,
        if the file was truncated under us.
        """
        if _madvise is None:
            return errno.EINVAL
        for advice in (_MADV_POPULATE_READ, _MADV_POPULATE_WRITE):
            if _madvise(address, length, advice) != 0:
                return ctypes.get_errno()
        return 0

    def advise_huge_pages(self, mapping: mmap.mmap) -> None:
        if self._huge_advice and len(mapping) >= _HUGE_PAGE_MIN:
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(mmap.MADV_HUGEPAGE)

    # -- locks ---------------------------------------------------------------------------

    def locks(self, fd: int, system_name: str, *, writable: bool, created: bool) -> BlockLocks:
        return _OFDLocks(fd, self._path(system_name), writable=writable)

    def fresh_locks(self, locks: BlockLocks, system_name: str) -> BlockLocks:
        """OFD locks of a new description of the very file (``/proc/self/fd``)."""
        new = os.open(f"/proc/self/fd/{locks.fd}", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        return _OFDLocks(new, self._path(system_name), writable=True)

    # -- processes -----------------------------------------------------------------------

    def process_state(self, pid: int) -> tuple[bytes, int] | None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            return None
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
        except (IndexError, ValueError):
            return None

    def start_time(self, pid: int) -> int:
        state = self.process_state(pid)
        return 0 if state is None else state[1]

    def boot_id(self) -> str:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                return f.read().strip()
        except OSError:
            return "-"

    def boot_time(self) -> float | None:
        try:
            with open("/proc/stat", "rb") as stat:
                for line in stat:
                    if line.startswith(b"btime "):
                        return float(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def inodes_in_use(self, exclude: tuple[int, ...] = ()) -> set[int] | None:
        own_pid = str(os.getpid())
        excluded = {str(fd) for fd in exclude}
        inodes: set[int] = set()
        prefix, device = self._files_here()
        try:
            pids = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
        except OSError:
            return None
        for pid in pids:
            inodes.update(_mapped_files(pid, prefix, device))
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if pid == own_pid and fd in excluded:
                        continue
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                            info = os.stat(f"/proc/{pid}/fd/{fd}")
                            if info.st_dev == device:
                                inodes.add(info.st_ino)
        return inodes

    def mappers(self) -> dict[int, list[int]] | None:
        prefix, device = self._files_here()
        try:
            pids = sorted(int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit())
        except OSError:
            return None
        found: dict[int, list[int]] = {}
        for pid in pids:
            for inode in set(_mapped_files(str(pid), prefix, device)):
                found.setdefault(inode, []).append(pid)
        return found

    def _files_here(self) -> tuple[str, int]:
        """The path prefix of blocks in ``/proc`` and the device of their filesystem.

        A process in another mount namespace may have its own tmpfs mounted at
        the same path, whose inode numbers start low too: the same path and
        inode on another device is another file.
        """
        prefix = self._directory.rstrip("/") + "/"
        try:
            return prefix, os.stat(self._directory).st_dev
        except OSError:
            return prefix, -1  # no directory: no block of ours can be mapped

    def resident_bytes(self, info: os.stat_result) -> int | None:
        return info.st_blocks * 512  # tmpfs: allocated pages are memory (or swap)

    def thread_gone(self, native_id: int | None) -> bool:
        return native_id is None or not os.path.exists(f"/proc/self/task/{native_id}")

    # -- waiting and time ----------------------------------------------------------------

    def shared_clock_ns(self) -> int:
        """The host's ``CLOCK_BOOTTIME``: this time namespace's, less its offset.

        Never steps (unlike the wall clock), counts suspend, and reads alike in
        every time namespace of the host.
        """
        import time

        pid = os.getpid()
        cached = self._timens_offset
        if cached is None or cached[0] != pid:
            cached = self._timens_offset = (pid, _boottime_offset_ns())
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - cached[1]

    def futex_wait(self, address: int, expected: int, timeout: float | None) -> None:
        assert _syscall is not None
        number = _SYS_FUTEX[platform.machine().lower()]
        if timeout is None:
            _syscall(number, ctypes.c_void_p(address), _FUTEX_WAIT, expected, None, None, 0)
            return
        seconds = max(0.0, timeout)
        spec = _Timespec(int(seconds), int((seconds % 1) * 1e9))
        _syscall(
            number, ctypes.c_void_p(address), _FUTEX_WAIT, expected, ctypes.byref(spec), None, 0
        )

    def futex_wake(self, address: int) -> None:
        if _syscall is not None:
            number = _SYS_FUTEX[platform.machine().lower()]
            _syscall(number, ctypes.c_void_p(address), _FUTEX_WAKE, _INT_MAX, None, None, 0)

    def futex_add(self, address: int, delta: int) -> bool:
        """``FUTEX_WAKE_OP`` on one word: the kernel adds ``delta`` atomically and wakes.

        The kernel takes ``delta`` as a 12-bit signed number (-2048 to 2047).
        """
        if _syscall is None or not -2048 <= delta < 2048:
            return False
        number = _SYS_FUTEX[platform.machine().lower()]
        operation = (_FUTEX_OP_ADD << 28) | ((delta & 0xFFF) << 12)  # compare: unused
        pointer = ctypes.c_void_p(address)
        result = _syscall(number, pointer, _FUTEX_WAKE_OP, _INT_MAX, None, pointer, operation)
        return bool(result >= 0)

    # -- robust mutexes ------------------------------------------------------------------

    def mutex_init(self, address: int) -> None:
        assert _pthread is not None
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes on glibc
        _pthread.attr_init(attr)
        try:
            _pthread.attr_setpshared(attr, _PTHREAD_PROCESS_SHARED)
            _pthread.attr_setrobust(attr, _PTHREAD_MUTEX_ROBUST)
            error = _pthread.init(ctypes.c_void_p(address), attr)
        finally:
            _pthread.attr_destroy(attr)
        if error:
            raise OSError(error, os.strerror(error))

    def mutex_lock(self, address: int) -> bool:
        assert _pthread is not None
        error = _pthread.lock(address)  # argtypes convert the int
        if error == errno.EOWNERDEAD:
            return True
        if error:
            raise OSError(error, f"cannot lock the dict's mutex: {os.strerror(error)}")
        return False

    def mutex_consistent(self, address: int) -> None:
        assert _pthread is not None
        _pthread.consistent(ctypes.c_void_p(address))

    def mutex_unlock(self, address: int) -> None:
        assert _pthread is not None
        error = _pthread.unlock(address)
        if error:
            raise OSError(error, f"cannot unlock the dict's mutex: {os.strerror(error)}")

    # -- limits --------------------------------------------------------------------------

    def limits(self) -> Limits:
        base = super().limits()
        limit, used, where = self._cgroup_memory()
        return Limits(base.free, base.total, limit, used, base.where, where)

    def _cgroup_memory(self) -> tuple[int | None, int | None, str | None]:
        """The tightest cgroup memory limit over this process's cgroup and its parents."""
        if self._cgroup_files is None:
            self._cgroup_files = _cgroup_limit_files()
        best: tuple[int | None, int | None, str | None] = (None, None, None)
        for limit_file, usage_file in self._cgroup_files:
            try:
                with open(limit_file, encoding="ascii") as f:
                    text = f.read().strip()
                if text == "max":
                    continue
                limit = int(text)
                if limit >= _CGROUP_UNLIMITED:
                    continue
                with open(usage_file, encoding="ascii") as f:
                    used = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if best[0] is None or best[1] is None or limit - used < best[0] - best[1]:
                best = (limit, used, os.path.dirname(limit_file))
        return best


# Where the accelerator is used, these calls are its C twins: the same glibc and futex calls
# (a bump is an atomic add then FUTEX_WAKE, one with FUTEX_WAKE_OP), the GIL released too.
_accel.install(
    LinuxBackend,
    (
        "futex_wait",
        "futex_wake",
        "futex_add",
        "mutex_init",
        "mutex_lock",
        "mutex_consistent",
        "mutex_unlock",
    ),
)


def _open_error(name: str, exc: OSError) -> Exception:
    if exc.errno == errno.ELOOP:
        return BlockNotFoundError(name, f"{name!r} is a symbolic link, not a shared-memory block")
    if exc.errno in (errno.EISDIR, errno.EINVAL, errno.ENXIO):
        return BlockNotFoundError(name, f"{name!r} is not a shared-memory block")
    if exc.errno == errno.ENAMETOOLONG:
        return BlockNotFoundError(name, f"{name!r} is not a valid shared-memory block name")
    return exhausted(exc, f"open block {name!r}") or exc


def _mapped_files(pid: str, prefix: str, device: int) -> list[int]:
    """Inodes of the mappings of files under ``prefix`` on ``device`` in ``/proc/PID/maps``."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            lines = maps.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []  # exited, or not ours to read
    found = []
    for line in lines:
        fields = line.split(None, 5)  # address perms offset dev inode path
        if len(fields) == 6 and fields[5].startswith(prefix) and fields[4].isdigit():
            major, _, minor = fields[3].partition(":")
            try:
                mapped_device = os.makedev(int(major, 16), int(minor, 16))
            except ValueError:
                continue
            if mapped_device == device:
                found.append(int(fields[4]))
    return found


def _boottime_offset_ns() -> int:
    """This time namespace's ``boottime`` offset (0 outside a time namespace)."""
    try:
        with open(_PROC_OFFSETS, encoding="ascii") as offsets:
            for line in offsets:
                fields = line.split()
                if len(fields) == 3 and fields[0] in ("boottime", "7"):
                    return int(fields[1]) * 1_000_000_000 + int(fields[2])
    except (OSError, ValueError):
        pass
    return 0


def _mount_of(directory: str) -> tuple[str, str, str] | None:
    """``(filesystem type, mount options, super options)`` of the mount holding ``directory``."""
    best: tuple[int, tuple[str, str, str]] | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 6 or len(tail) < 3:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = directory == point or directory.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= best[0]):
                    best = (len(point), (tail[0], fields[5], tail[2]))
    except OSError:
        return None
    return None if best is None else best[1]


def _wants_huge_page_advice(directory: str) -> bool:
    """Whether ``madvise(MADV_HUGEPAGE)`` gets huge pages for files of ``directory``.

    A tmpfs mounted ``huge=advise`` honours it; the kernel's own shm mount
    (``/dev/shm`` is usually a plain tmpfs) follows ``shmem_enabled``.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    mount = _mount_of(directory)
    if mount is None or mount[0] != "tmpfs":
        return False
    if "huge=advise" in mount[2]:
        return True
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled", encoding="ascii") as f:
            return "[advise]" in f.read() and "huge=" not in mount[2]
    except OSError:
        return False


def _cgroup_limit_files() -> list[tuple[str, str]]:
    """``(limit file, usage file)`` of this process's memory cgroup and every parent."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts: dict[str, str] = {}  # "v2" or "v1" -> mount point
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 5 or len(tail) < 3:
                    continue
                if tail[0] == "cgroup2":
                    mounts.setdefault("v2", fields[4])
                elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
                    mounts.setdefault("v1", fields[4])
    except OSError:
        return []
    files: list[tuple[str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and "v2" in mounts:
            root, limit, usage = mounts["v2"], "memory.max", "memory.current"
        elif "memory" in controllers.split(",") and "v1" in mounts:
            root, limit, usage = mounts["v1"], "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        directory = os.path.join(root, path.lstrip("/"))
        if not os.path.isdir(directory):
            directory = root  # a cgroup namespace: this process sees its own cgroup as the root
        while True:
            if os.path.exists(os.path.join(directory, limit)):
                files.append((os.path.join(directory, limit), os.path.join(directory, usage)))
            if os.path.normpath(directory) == os.path.normpath(root):
                break
            directory = os.path.dirname(directory)
    return files
