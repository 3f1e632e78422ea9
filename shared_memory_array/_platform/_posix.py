"""The portable POSIX backend: only what macOS offers.

Selected on POSIX systems other than Linux, and on Linux by
``SHARED_MEMORY_ARRAY_BACKEND=posix``, under which CI runs the whole test suite
once more: that is how its behaviour is tested here (never on macOS itself).
What it does without Linux's extras, and what that changes:

* **No OFD locks.** "Who holds this block" is still asked of the kernel, with
  ``flock`` on small lock files in a private per-user directory: one file per
  block and role (``hold/``, ``owner/``, ``counter/``, ``dict/``) under
  ``$SHARED_MEMORY_ARRAY_LOCK_DIR``, else ``<temp dir>/shared_memory_array-<uid>``,
  then one subdirectory per shared-memory namespace. Every directory is made
  mode 0700 and refused (:class:`~shared_memory_array.UntrustedBlockError`)
  when it is not a directory of this user that only this user may enter.
  ``flock`` locks belong to an open file description, like OFD locks, and the
  kernel drops them with the holder, whatever kills it. A mapping opens its
  HOLD, OWNER and COUNTER files when it opens the block and keeps them (three
  descriptors more per mapping than on Linux), so its locks outlive the
  block's name as OFD locks do. ``flock`` cannot ask without taking: "does
  anyone else hold it" opens the file afresh and tries an exclusive lock (only
  asked for roles the asker does not hold). A forked child reopens its lock
  files by path; once the block's name is gone it cannot, and goes on sharing
  its parent's (Linux reopens through ``/proc/self/fd``).
* **Creation and removal in two steps.** A block is created as an object, then
  its lock files, the hold file first and the counter file only once the owner
  file is locked: a reaper that finds a new block either cannot open all its
  files yet (and keeps it) or sees it owned. Removal takes the object first,
  then the lock files, hold last. A missing lock file next to a hold file over
  :data:`ABANDONED_CREATION_SECONDS` old is a creator killed mid-creation: it
  is made again, unlocked, so that the block can be judged and reaped.
* **No /dev/shm to list.** The ``hold/`` lock files are the listing. A lock
  file whose object is gone (a crash between the two removals) is removed by
  ``cleanup`` and by the reaper. So an object made without this library's
  lock files (by another program, or by hand in ``/dev/shm`` on Linux) is not
  listed, and attaching it fails as "being created or removed".
* **Names of at most 30 bytes** (macOS: 31 with the leading slash). A longer
  name maps to ``sma_~`` + 20 characters of its hash; the full name is kept in
  the block's header, so ``list_blocks``, ``cleanup``, ``inspect`` and
  ``attach`` show and take the user's name (and a hash collision is caught by
  comparing it). No name can be undecodable bytes, a symlink, a FIFO or a
  directory: the odd entries of API.md section 5 cannot occur.
* **No ``fallocate``, no ``SEEK_HOLE``, no ``pread``/``pwrite`` on shared
  memory.** A block is sized once with ``ftruncate`` (macOS allows only one)
  and read and written through mappings. Its pages are not reserved at
  creation, and there is no filesystem whose free space a request could be
  compared with: a block the memory cannot hold is not refused up front, and
  a block whose pages are missing is not found before it is mapped (on macOS
  the memory is paged; on a full Linux tmpfs a touch is a SIGBUS, which the
  Linux backend prevents).
* **No private mappings of shared memory** (macOS refuses ``MAP_PRIVATE`` on
  it): a copy-on-write view (``attach(private=True)``, ``read(private=True)``)
  is a copy of the block made when it is mapped, in anonymous memory.
* **No futex** (:attr:`~._common.Backend.has_futex` is false): waiting on
  shared state has to poll with a bounded back-off.
* **No /proc.** Creator start times and process states are unknown: the pid
  alone says whether a creator runs (a reused pid or a zombie looks alive),
  and an unreadable block nobody holds a lock on is reaped after its grace
  even if some other program has it open. ``mapped_by`` and ``resident`` are
  unknown.
* **Clock.** ``CLOCK_MONOTONIC``, which on macOS is the same for every process.

* **A dict's lock** is ``flock`` on its ``dict/`` lock file, opened when a
  handle is set up (so it is that block's file even after the name is given
  to a new block). A child forked after the name is gone cannot open one of
  its own: its first use of the dict raises
  :class:`~shared_memory_array.AllocationError` (never a shared lock).

What the test suite skips or expects otherwise under this backend
(``needs(...)`` and ``has(...)`` in ``tests/conftest.py``): the free-space
checks before allocating, a sparse block refused before it can SIGBUS (3
tests), odd directory entries and undecodable names, a zombie creator and a
block open without a lock, a private view seeing others' later writes, and a
dict forked after its name is gone (an error in the child, not a lock).

macOS facts taken from its kernel's source, not checked on a Mac here:
``fstat`` of a shared-memory object fills in only mode (permission bits, no
file type), owner, group and size (page-rounded): device, inode and times are
0. So :meth:`PortableBackend.names_object` can only tell that a name exists,
and the layers that key blocks by ``(st_dev, st_ino)`` (the owners of
:mod:`.._lifetime`) cannot tell two blocks apart there. ``flock`` works on
regular files only, which is why every lock, the dict's too, is on a lock file.
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
_LIFETIME_ROLES: Final = (HOLD, OWNER, COUNTER)  # HOLD first: see _FileLocks.open_files
LOCK_DIR_ENV: Final = "SHARED_MEMORY_ARRAY_LOCK_DIR"
ABANDONED_CREATION_SECONDS: Final = 10.0
"""Age of a hold file past which a missing lock file of its block means its creator died."""


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
    """The lifetime roles as ``flock`` on one lock file per role (see the module docstring).

    The lock files of HOLD, OWNER and COUNTER are opened at once (:meth:`open_files`), as
    an OFD lock lives on a description of the block's own file: every role stays usable
    after the block's name (and so its lock files) is gone, and nothing opened later can
    be the file of a new block of the same name. DICT's file is opened at first use.
    """

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

    def adopt(self, role: int, fd: int) -> None:
        """Take over ``fd``, a descriptor of ``role``'s lock file (already locked by its maker)."""
        info = os.fstat(fd)
        self._fds[role] = fd
        self._inodes[role] = (info.st_dev, info.st_ino)

    def close_lock_files(self) -> None:
        """Close the lock files (dropping their locks), not the block's descriptor."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def open_files(self) -> None:
        """Open the lifetime roles' lock files, all of one block (or raise BlockNotFoundError).

        A block's files are made HOLD first and removed HOLD last, so checking
        that the hold file is still the one opened first, after opening the
        others, proves none of them belongs to a newer block of the same name.
        """
        for role in _LIFETIME_ROLES:
            self._fd(role)

    def follow(self, other: _FileLocks) -> None:
        """Know the block ``other`` knows (its hold file), to open only that block's files."""
        recorded = other._inodes.get(HOLD)
        if recorded is not None:
            self._inodes[HOLD] = recorded

    def open_role(self, role: int) -> None:
        """Open ``role``'s lock file now (or raise BlockNotFoundError)."""
        self._fd(role)

    def _open_role(self, role: int) -> int:
        path = self._backend.lock_path(role, self.system_name)
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            if not self._abandoned_creation():
                raise BlockNotFoundError(
                    self.system_name, f"block {self.system_name!r} is being created or removed"
                ) from None
        except OSError as exc:
            raise exhausted(exc, f"open a lock file of {self.system_name!r}") or exc from None
        # Its creator died between making the hold file and the others: make the missing
        # one (unlocked: nobody owns the block), so that the block can be judged and reaped.
        try:
            return os.open(path, flags | os.O_CREAT, 0o600)
        except OSError as exc:
            raise exhausted(exc, f"open a lock file of {self.system_name!r}") or exc from None

    def _abandoned_creation(self) -> bool:
        """Whether the block exists with a hold file so old that its creation has ended.

        A creator makes every lock file within microseconds of the hold file
        (:meth:`PortableBackend._make_lock_files`); removal takes the object
        first, so an object with an old hold file and a missing lock file is a
        creation cut short (a crash), never one in progress.
        """
        try:
            hold = os.lstat(self._backend.lock_path(HOLD, self.system_name))
        except OSError:
            return False
        recorded = self._inodes.get(HOLD)
        if recorded is not None and recorded != (hold.st_dev, hold.st_ino):
            return False
        if time.time() - hold.st_mtime < ABANDONED_CREATION_SECONDS:
            return False
        return self.fd >= 0 and self._backend.names_object(self.system_name, self.fd)

    def _fd(self, role: int) -> int:
        fd = self._fds.get(role)
        if fd is None:
            fd = self._open_role(role)
            info = os.fstat(fd)
            if role == HOLD:
                self._inodes[HOLD] = (info.st_dev, info.st_ino)
            elif not self._hold_file_unchanged():
                os.close(fd)
                raise BlockNotFoundError(
                    self.system_name, f"block {self.system_name!r} was removed meanwhile"
                )
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

    def _hold_file_unchanged(self) -> bool:
        """Whether the hold file is still the one this object knew (no newer block's)."""
        try:
            info = os.lstat(self._backend.lock_path(HOLD, self.system_name))
        except OSError:
            return False
        recorded = self._inodes.get(HOLD)
        return recorded is None or recorded == (info.st_dev, info.st_ino)

    def still_named(self) -> bool:
        """Whether the name still names this block: its lock files and its object."""
        return self._hold_file_unchanged() and (
            self.fd < 0 or self._backend.names_object(self.system_name, self.fd)
        )

    def unlink_name(self) -> bool:
        return self.still_named() and self._backend.unlink(self.system_name)

    def remember_hold_file(self) -> None:
        """Record the hold file's inode without opening it (to remove only that block's files)."""
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
    lock_files: ClassVar[bool] = True
    copy_on_write: ClassVar[bool] = False

    def __init__(self) -> None:
        self._directory: str | None = None
        self._lock_root: str | None = None
        self._lock_root_uid = -1
        # system name -> the locked OWNER file of a block open_block just created, until
        # locks() takes it over.
        self._new_owners: dict[str, int] = {}

    # -- lock files ----------------------------------------------------------------------

    def lock_root(self) -> str:
        """The private directory of this user's lock files (made on first use).

        Per effective uid: a process that drops privileges after using the
        library (a server starting as root) gets the new user's directory.
        """
        root = self._lock_root
        if root is None or self._lock_root_uid != os.geteuid():
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
            self._lock_root, self._lock_root_uid = root, os.geteuid()
        return root

    def namespace_key(self) -> str:
        """The lock root's path and inode: blocks are shared only by processes using one.

        It is made per shared-memory namespace (:meth:`lock_root`), and a
        process that keeps its lock files elsewhere cannot see another's locks.
        """
        try:
            root = self.lock_root()
            info = os.stat(root)
        except (OSError, UntrustedBlockError):
            return "-"
        return f"{root}:{info.st_dev}:{info.st_ino}"

    def lock_path(self, role: int, system_name: str) -> str:
        """The lock file of ``role`` for block ``system_name``."""
        return os.path.join(self.lock_root(), _ROLE_DIRS[role], system_name)

    def _make_lock_files(self, system_name: str) -> int:
        """Create the lock files of a block just created (replacing stale ones).

        Returns a descriptor of the OWNER file, already locked exclusively: the
        block is owned before a reaper can judge it. The hold file (the listing)
        is made first and the counter file after the owner is locked, so a
        reaper that finds the block either cannot open all its files yet (and
        keeps it) or sees it owned.
        """
        owner_fd = -1
        try:
            for role in _ROLE_DIRS:  # HOLD, OWNER, COUNTER, DICT
                fd = self._create_lock_file(self.lock_path(role, system_name))
                if role == OWNER:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never blocks
                    owner_fd = fd
                else:
                    os.close(fd)
        except BaseException:
            if owner_fd >= 0:
                os.close(owner_fd)
            raise
        return owner_fd

    @staticmethod
    def _create_lock_file(path: str) -> int:
        for _ in range(3):
            try:
                return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                # Left by a crash, or by a process still removing an earlier block of this
                # name (it removes only the file it knew: not the one made here).
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        raise BlockExistsError(path, f"cannot replace the stale lock file {path!r}")

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
                # O_NONBLOCK: on Linux a FIFO named like a block must not hang a read-only
                # open (macOS keeps the flag on the descriptor and has no shm FIFOs).
                fd = _posixshmem.shm_open("/" + system_name, flags | os.O_NONBLOCK, mode=0o600)
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
                self._new_owners[system_name] = self._make_lock_files(system_name)
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
        pending = self._new_owners.pop(system_name, None)
        if pending is not None:  # a creation that failed before its locks were made
            os.close(pending)
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

    def names_object(self, system_name: str, fd: int) -> bool:
        """Whether ``system_name`` still names the object open on ``fd`` (not unlinked, not new).

        Compared by device and inode where ``fstat`` gives them; macOS gives 0
        for both on shared memory, and then only the name's existence is known.
        """
        try:
            other = self.open_block(system_name, create=False, writable=False)
        except (OSError, UntrustedBlockError):
            return False
        try:
            now, mine = os.fstat(other), os.fstat(fd)
        finally:
            os.close(other)
        return not mine.st_ino or (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def forget_stale(self, system_name: str) -> bool:
        """Remove the lock files of a block whose object is gone; ``True`` if it was stale."""
        locks = _FileLocks(self, system_name, writable=False)
        # Before looking for the object: a block of this name created meanwhile replaces
        # the hold file, and then none of its files is removed here.
        locks.remember_hold_file()
        try:
            fd = self.open_block(system_name, create=False, writable=False)
        except BlockNotFoundError:
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

    def map(
        self, fd: int, size: int, *, readonly: bool, private: bool, populate: bool
    ) -> mmap.mmap:
        """Map a block; a private mapping is a copy in anonymous memory.

        macOS refuses ``MAP_PRIVATE`` on shared memory (``EINVAL``): a private
        (copy-on-write) view is a copy of the block's bytes made now, not page
        by page when first written.
        """
        if not private:
            return super().map(fd, size, readonly=readonly, private=False, populate=populate)
        copy = mmap.mmap(-1, size)  # anonymous and private
        source = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            with memoryview(copy) as target, memoryview(source) as data:
                target[:] = data
        finally:
            source.close()
        return copy

    def trust_error(self, name: str, info: os.stat_result) -> Exception | None:
        if self._directory is None and not stat.S_IFMT(info.st_mode):
            # macOS's fstat of shared memory gives the permission bits alone, no file type.
            info = os.stat_result((stat.S_IFREG | stat.S_IMODE(info.st_mode), *info[1:]))
        return super().trust_error(name, info)

    # -- locks ---------------------------------------------------------------------------

    def locks(self, fd: int, system_name: str, *, writable: bool, created: bool) -> BlockLocks:
        locks = _FileLocks(self, system_name, writable=writable, fd=fd)
        owner = self._new_owners.pop(system_name, None) if created else None
        try:
            if owner is not None:
                locks.adopt(OWNER, owner)
            locks.open_files()
        except BaseException:
            locks.close_lock_files()
            raise
        return locks

    def fresh_locks(self, locks: BlockLocks, system_name: str) -> BlockLocks:
        """The block's DICT lock file, opened afresh now (a description of this process's own).

        Opened at once, and only while the hold file is still the one ``locks``
        knew: a lock file opened later could be a newer block's of the same name.
        """
        assert isinstance(locks, _FileLocks)
        fresh = _FileLocks(self, system_name, writable=True)
        fresh.follow(locks)
        try:
            fresh.open_role(DICT)
        except BaseException:
            fresh.close()
            raise
        return fresh

    # -- processes and time --------------------------------------------------------------

    def shared_clock_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
