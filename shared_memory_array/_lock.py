"""A re-entrant lock over one shared block, across threads and processes.

:class:`BlockLock` combines a ``threading.RLock`` (threads of this process) with
``flock(LOCK_EX)`` on a descriptor of the block (other processes). The kernel
drops a ``flock`` when the last descriptor of its open file description is
closed, which happens when the holding process dies, however it dies: a killed
holder never deadlocks the others.

``flock`` locks belong to an open file description, so two descriptions opened
by one process would exclude each other. Hence there is ONE lock per block per
process (:meth:`BlockLock.for_block`, keyed by the block's device and inode, as
a name can be reused by a new block), shared by every handle of the block in
the process, with its own duplicated descriptor; re-entrancy works across
handles.

After ``fork`` the child gets a fresh thread lock and a new open file
description of the same block, so parent and child exclude each other again. It
reopens the block through ``/proc/self/fd`` (the very inode, even after its name
was unlinked), else by name if that still names the same inode; without either
the child keeps the inherited description and then does NOT exclude its parent.
The child does not hold what the parent held: if the forking thread held the
lock, its pending releases (leaving a ``with d.lock():`` block in the child) are
counted as inherited and ignored.

Requires ``fcntl.flock`` (Linux, macOS and other POSIX systems).
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

from ._block import SharedBlock
from ._process import ForkPhase, at_fork

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    _flock = None
    _LOCK_EX = _LOCK_UN = 0
else:
    _flock = fcntl.flock  # bound once: these run twice per dict operation
    _LOCK_EX, _LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None  # type: ignore[assignment]

__all__ = ["BlockLock"]

_get_ident = threading.get_ident
_registry_lock = threading.RLock()  # re-entrant: garbage collection may close a hold inside
_registry: dict[tuple[int, int], BlockLock] = {}  # (st_dev, st_ino) of the block -> lock


class BlockLock:
    """The process's re-entrant lock on the block ``name``.

    Get it with :meth:`for_block`; give it back with :meth:`release_ref`.
    """

    __slots__ = (
        "_depth",
        "_fd",
        "_identity",
        "_inherited",
        "_inherited_by",
        "_owner",
        "_references",
        "_thread_lock",
        "name",
    )

    def __init__(self, name: str, fd: int, identity: tuple[int, int]) -> None:
        self.name = name
        self._fd = fd
        self._identity = identity
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._owner = 0  # thread ident of the holder while _depth > 0
        self._inherited = 0  # levels the forking thread held in the parent (in a child)
        self._inherited_by = 0
        self._references = 0

    @classmethod
    def for_block(cls, block: SharedBlock) -> BlockLock:
        """Return this process's lock for ``block`` (a ``flock`` on a dup of its descriptor).

        Raises
        ------
        NotImplementedError
            The platform has no ``fcntl.flock``.
        """
        if fcntl is None:  # pragma: no cover - Windows
            raise NotImplementedError("SharedDict needs fcntl.flock (a POSIX system)")
        info = os.fstat(block.fileno())
        identity = (info.st_dev, info.st_ino)  # not the name: a name can be reused
        with _registry_lock:
            lock = _registry.get(identity)
            if lock is None:
                lock = cls(block.name, os.dup(block.fileno()), identity)
                _registry[identity] = lock
            lock._references += 1
            return lock

    def release_ref(self) -> None:
        """Drop one handle's reference; the last one closes the descriptor."""
        with _registry_lock:
            self._references -= 1
            if self._references > 0:
                return
            if _registry.get(self._identity) is self:
                del _registry[self._identity]
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def acquire(self) -> bool:
        """Take the lock (blocking); return ``True`` if this call took the file lock.

        ``True`` means the outermost acquisition in this process: the caller is
        the first to look at the shared state since another process may have
        held it.
        """
        self._thread_lock.acquire()
        depth = self._depth = self._depth + 1
        if depth > 1:
            return False
        try:
            _flock(self._fd, _LOCK_EX)  # type: ignore[misc]
        except BaseException:
            self._depth -= 1
            self._thread_lock.release()
            raise
        self._owner = _get_ident()
        return True

    def release(self) -> None:
        """Release one level of the lock; the outermost release drops the file lock.

        In a forked child, a release by the forking thread of a level it took
        before the fork (it holds nothing of its own now) is ignored.
        """
        if self._inherited and self._release_inherited():
            return
        if self._depth == 1:
            _flock(self._fd, _LOCK_UN)  # type: ignore[misc]
        self._depth -= 1
        self._thread_lock.release()

    @property
    def thread_lock(self) -> threading.RLock:
        """The in-process part alone: excludes this process's other threads, no file lock."""
        return self._thread_lock

    @property
    def held(self) -> bool:
        """Whether some thread of this process holds the lock."""
        return self._depth > 0

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _release_inherited(self) -> bool:
        """Consume one inherited level if this release is one; return whether it was."""
        me = _get_ident()
        if me != self._inherited_by or (self._depth and self._owner == me):
            return False  # another thread, or a level this thread took in the child
        self._inherited -= 1
        return True

    def _reopen_after_fork(self) -> None:
        me = _get_ident()
        self._inherited = self._depth if self._depth and self._owner == me else 0
        self._inherited_by = me
        self._thread_lock = threading.RLock()
        self._depth = 0
        if self._fd < 0:
            return
        fd = self._reopen()
        if fd >= 0:
            os.close(self._fd)  # the parent's description: its lock state is not ours
            self._fd = fd

    def _reopen(self) -> int:
        """A new description of this lock's inode, or -1 if none can be had."""
        for path in (f"/proc/self/fd/{self._fd}", None):
            try:
                if path is not None:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                elif _posixshmem is not None:
                    fd = _posixshmem.shm_open("/" + self.name, os.O_RDWR, mode=0o600)
                else:  # pragma: no cover
                    break
            except OSError:
                continue  # no /proc, or the name was unlinked meanwhile
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == self._identity:
                return fd
            os.close(fd)  # the name now belongs to another block
        return -1


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.RLock()
    for lock in list(_registry.values()):
        lock._reopen_after_fork()


at_fork(ForkPhase.LOCKS, after_in_child=_after_fork_in_child)
