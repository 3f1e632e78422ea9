"""The portable POSIX backend: only what macOS offers.

Selected on POSIX systems other than Linux, and on Linux by
``SHARED_MEMORY_ARRAY_BACKEND=posix`` (which is how its behaviour is tested
here). What it does without Linux's extras, and what that changes:

* **No OFD locks.** "Who holds this block" is still asked of the kernel, with
  ``flock`` on small lock files in a private per-user directory (mode 0700):
  one file per block and role (``hold/``, ``owner/``, ``counter/``,
  ``dict/``). ``flock`` locks belong to an open file description, like OFD
  locks, and the kernel drops them with the holder; ``flock`` cannot ask
  without taking, so "does anyone else hold it" opens the file afresh and
  tries an exclusive lock (it is only asked for roles the asker does not hold).
  A forked child reopens its lock files by path.
* **No /dev/shm to list.** The ``hold/`` lock files are the listing. A lock
  file whose block is gone (a crash between the two removals) is removed by
  ``cleanup`` and by the reaper.
* **Names of at most 30 bytes** (macOS: 31 with the leading slash). A longer
  name maps to ``sma_~`` + 20 characters of its hash; the full name is kept in
  the block's header, so ``list``, ``inspect`` and ``attach`` show and take the
  user's name (and a hash collision is caught by comparing it).
* **No ``fallocate``, no ``pread``/``pwrite`` on shared memory.** A block is
  sized once with ``ftruncate`` (macOS allows only one) and read and written
  through mappings. Its pages are not reserved at creation: where the memory
  runs out, the kernel's answer comes when a page is first touched (on macOS,
  paging; on a full Linux tmpfs, SIGBUS, which the Linux backend prevents).
* **No futex.** Waiting on shared state polls with a bounded back-off (from
  0.1 ms to :data:`~.._waiting.MAX_POLL_INTERVAL`).
* **No /proc.** Creator start times are unknown (the pid alone explains who
  made a block); ``mapped_by`` and ``resident`` are unknown.
* **Clock.** ``CLOCK_MONOTONIC``, which on macOS is the same for every process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import stat
import tempfile
import time
from base64 import b32encode
from typing import ClassVar, Final

from ..errors import BlockExistsError, BlockNotFoundError, UntrustedBlockError
from ._common import COUNTER, DICT, HOLD, OWNER, PREFIX, Backend, BlockLocks, exhausted

__all__ = ["PortableBackend", "available"]

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None  # type: ignore[assignment]

MAX_NAME_BYTES: Final = 30
MAPPED_NAME_PREFIX: Final = PREFIX + "~"
_ROLE_DIRS: Final = {HOLD: "hold", OWNER: "owner", COUNTER: "counter", DICT: "dict"}
LOCK_DIR_ENV: Final = "SHARED_MEMORY_ARRAY_LOCK_DIR"


def available() -> bool:
    """Whether this system has POSIX shared memory and ``flock``."""
    return _posixshmem is not None and hasattr(fcntl, "flock")


def mapped_name(name: str) -> str:
    """The system name of a user name too long for the system (30 bytes at most)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=15).digest()
    return MAPPED_NAME_PREFIX + b32encode(digest).decode("ascii").lower().rstrip("=")[:20]


def _private_directory(path: str) -> None:
    """Make ``path`` (mode 0700) or check it is this user's and private."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise UntrustedBlockError(
            path,
            f"the lock directory {path!r} is not a private directory of this user "
            f"(mode {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}): refusing to use it",
        )


class _FileLocks:
    """The lifetime roles as ``flock`` on one lock file per role (see the module docstring)."""

    __slots__ = ("_backend", "_fds", "_inodes", "fd", "system_name", "writable")

    def __init__(
        self, backend: PortableBackend, system_name: str, *, writable: bool, fd: int = -1
    ) -> None:
        self._backend = backend
        self.system_name = system_name
        self.writable = writable
        self.fd = fd  # the block's own descriptor (no lock lives on it)
        self._fds: dict[int, int] = {}
        self._inodes: dict[int, tuple[int, int]] = {}

    def _fd(self, role: int) -> int:
        fd = self._fds.get(role)
        if fd is None:
            path = self._backend.lock_path(role, self.system_name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise BlockNotFoundError(
                    self.system_name, f"block {self.system_name!r} is being removed"
                ) from None
            except OSError as exc:
                raise exhausted(exc, f"open a lock file of {self.system_name!r}") or exc from None
            info = os.fstat(fd)
            self._fds[role] = fd
            self._inodes[role] = (info.st_dev, info.st_ino)
        return fd

    def try_lock(self, role: int, *, exclusive: bool) -> bool:
        try:
            fcntl.flock(
                self._fd(role), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            )
        except BlockingIOError:
            return False
        return True

    def wait_lock(self, role: int, *, exclusive: bool) -> None:
        fcntl.flock(self._fd(role), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def unlock(self, role: int) -> None:
        fd = self._fds.get(role)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def held_by_others(self, role: int) -> bool:
        path = self._backend.lock_path(role, self.system_name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False  # no lock file: nobody can hold it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops the probe's lock with its description
        return False

    def reopen_in_child(self) -> bool:
        ok = True
        for role, fd in list(self._fds.items()):
            path = self._backend.lock_path(role, self.system_name)
            try:
                new = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                ok = False  # out of descriptors, or the block is gone: keep sharing, say so
                continue
            info = os.fstat(new)
            if (info.st_dev, info.st_ino) != self._inodes[role]:
                os.close(new)  # another block's file now
                ok = False
                continue
            os.close(fd)
            self._fds[role] = new
        return ok

    def descriptors(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.fd, *self._fds.values()) if fd >= 0)

    def still_named(self) -> bool:
        try:
            info = os.lstat(self._backend.lock_path(HOLD, self.system_name))
        except OSError:
            return False
        recorded = self._inodes.get(HOLD)
        return recorded is None or recorded == (info.st_dev, info.st_ino)

    def remember_hold_file(self) -> None:
        """Record the hold file's inode without keeping it open (an owner holds no HOLD)."""
        if HOLD not in self._inodes:
            with contextlib.suppress(OSError):
                info = os.lstat(self._backend.lock_path(HOLD, self.system_name))
                self._inodes[HOLD] = (info.st_dev, info.st_ino)

    def remove_files(self) -> None:
        """Remove this block's lock files, unless they already belong to a new block of its name.

        A file this object opened is removed only if it is still that file; the
        others only if the hold file is still the one it knew.
        """
        recorded_hold = self._inodes.get(HOLD)
        for role in (OWNER, COUNTER, DICT, HOLD):  # the hold file last: the others check it
            path = self._backend.lock_path(role, self.system_name)
            with contextlib.suppress(OSError):
                now = os.lstat(path)
                recorded = self._inodes.get(role)
                if recorded is None and role != HOLD and recorded_hold is not None:
                    hold = os.lstat(self._backend.lock_path(HOLD, self.system_name))
                    if (hold.st_dev, hold.st_ino) != recorded_hold:
                        continue  # a new block of this name made its files meanwhile
                if recorded is None or recorded == (now.st_dev, now.st_ino):
                    os.unlink(path)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        block_fd, self.fd = self.fd, -1
        for fd in (*fds.values(), block_fd):
            if fd < 0:
                continue
            with contextlib.suppress(OSError):
                os.close(fd)


class PortableBackend(Backend):
    """POSIX shared memory, ``flock`` on lock files, names of at most 30 bytes."""

    name: ClassVar[str] = "posix"
    kernel_holds: ClassVar[bool] = True
    can_list: ClassVar[bool] = True
    reserves_pages: ClassVar[bool] = False
    positional_io: ClassVar[bool] = False
    has_futex: ClassVar[bool] = False
    robust_mutex: ClassVar[bool] = False
    max_name_bytes: ClassVar[int] = MAX_NAME_BYTES

    def __init__(self) -> None:
        self._directory: str | None = None
        self._lock_root: str | None = None

    # -- lock files ----------------------------------------------------------------------

    def lock_root(self) -> str:
        """The private directory of this user's lock files (made on first use)."""
        root = self._lock_root
        if root is None:
            base = os.environ.get(LOCK_DIR_ENV) or os.path.join(
                tempfile.gettempdir(), f"shared_memory_array-{os.geteuid()}"
            )
            _private_directory(base)
            # One set of lock files per shared-memory namespace: on Linux a private
            # /dev/shm (a container, a test run) must not meet another's files.
            where = self._directory or "/dev/shm"
            try:
                info = os.stat(where)
                key = f"{info.st_dev}-{info.st_ino}"
            except OSError:
                key = "shm"
            root = os.path.join(base, key)
            _private_directory(root)
            for role_dir in _ROLE_DIRS.values():
                _private_directory(os.path.join(root, role_dir))
            self._lock_root = root
        return root

    def lock_path(self, role: int, system_name: str) -> str:
        """The lock file of ``role`` for block ``system_name``."""
        return os.path.join(self.lock_root(), _ROLE_DIRS[role], system_name)

    def _make_lock_files(self, system_name: str) -> None:
        """Create the lock files of a block just created (replacing stale ones)."""
        for role in _ROLE_DIRS:
            path = self.lock_path(role, system_name)
            for _ in range(3):
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_CLOEXEC, 0o600)
                except FileExistsError:
                    # Left by a crash, or by a process still removing an earlier block of this
                    # name (it removes only the file it knew: not the one made here).
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                os.close(fd)
                break

    # -- block store ---------------------------------------------------------------------

    @property
    def directory(self) -> str | None:
        return self._directory

    def configure_directory(self, path: str | None) -> None:
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        self._directory = None if path is None else os.path.abspath(path)
        self._lock_root = None

    def system_name(self, name: str) -> str:
        if len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
            return name
        return mapped_name(name)

    def open_block(self, system_name: str, *, create: bool, writable: bool) -> int:
        flags = os.O_RDWR if writable or create else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            if self._directory is not None:
                path = os.path.join(self._directory, system_name)
                fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
            else:
                fd = _posixshmem.shm_open("/" + system_name, flags, mode=0o600)
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
            if exc.errno == errno.ELOOP:
                raise BlockNotFoundError(
                    system_name, f"{system_name!r} is a symbolic link, not a shared-memory block"
                ) from None
            if exc.errno in (errno.EINVAL, errno.EISDIR, errno.ENXIO, errno.ENAMETOOLONG):
                raise BlockNotFoundError(
                    system_name, f"{system_name!r} is not a shared-memory block"
                ) from None
            raise exhausted(exc, f"open block {system_name!r}") or exc from None
        if create:
            with contextlib.suppress(OSError):  # macOS may refuse it; the object is 0600
                os.fchmod(fd, 0o600)
            try:
                self._make_lock_files(system_name)
            except BaseException:
                os.close(fd)
                self._unlink_object(system_name)
                raise
        return fd

    def _unlink_object(self, system_name: str) -> bool:
        try:
            if self._directory is not None:
                os.unlink(os.path.join(self._directory, system_name))
            else:
                _posixshmem.shm_unlink("/" + system_name)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, system_name: str) -> bool:
        # The object first: a crash between the two leaves lock files, which the listing
        # shows and cleanup removes, never an object nobody can find.
        gone = self._unlink_object(system_name)
        locks = _FileLocks(self, system_name, writable=False)
        with contextlib.suppress(OSError, UntrustedBlockError):
            locks.remove_files()
        return gone

    def list_names(self) -> list[str]:
        try:
            hold_dir = os.path.join(self.lock_root(), _ROLE_DIRS[HOLD])
            return sorted(name for name in os.listdir(hold_dir) if name.startswith(PREFIX))
        except (OSError, UntrustedBlockError):
            return []

    def exists(self, system_name: str) -> bool:
        if self._directory is not None:
            return os.path.lexists(os.path.join(self._directory, system_name))
        try:
            return os.path.lexists(self.lock_path(HOLD, system_name))
        except (OSError, UntrustedBlockError):
            return False

    def lstat_entry(self, system_name: str) -> os.stat_result:
        if self._directory is not None:
            return os.lstat(os.path.join(self._directory, system_name))
        fd = self.open_block(system_name, create=False, writable=False)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def open_for_judging(self, system_name: str) -> tuple[int, bool]:
        try:
            return self.open_block(system_name, create=False, writable=True), True
        except UntrustedBlockError:
            return self.open_block(system_name, create=False, writable=False), False
        except BlockNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such block", system_name) from None

    def forget_stale(self, system_name: str) -> bool:
        """Remove the lock files of a block whose object is gone; ``True`` if it was stale."""
        try:
            fd = self.open_block(system_name, create=False, writable=False)
        except BlockNotFoundError:
            locks = _FileLocks(self, system_name, writable=False)
            locks.remove_files()
            return True
        except Exception:
            return False
        os.close(fd)
        return False

    # -- bytes ---------------------------------------------------------------------------

    def read_at(self, fd: int, size: int, offset: int) -> bytes:
        """Read through a read-only mapping (macOS cannot ``read`` shared memory)."""
        length = os.fstat(fd).st_size
        end = min(length, offset + size)
        if end <= offset:
            return b""
        mapping = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            return mapping[offset:end]
        finally:
            mapping.close()

    def trust_error(self, name: str, info: os.stat_result) -> Exception | None:
        if self._directory is None and not stat.S_ISREG(info.st_mode):
            # macOS's fstat of shared memory may not say "regular file"; shm_open opens
            # nothing else (no FIFO, directory or link can be a shm object).
            info = os.stat_result((stat.S_IFREG | stat.S_IMODE(info.st_mode), *info[1:]))
        return super().trust_error(name, info)

    # -- locks ---------------------------------------------------------------------------

    def locks(self, fd: int, system_name: str, *, writable: bool, created: bool) -> BlockLocks:
        locks = _FileLocks(self, system_name, writable=writable, fd=fd)
        locks.remember_hold_file()
        return locks

    def fresh_locks(self, fd: int, system_name: str) -> BlockLocks:
        """Lock files opened afresh (a description of this process's own for each role)."""
        return _FileLocks(self, system_name, writable=True)

    # -- processes and time --------------------------------------------------------------

    def shared_clock_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
