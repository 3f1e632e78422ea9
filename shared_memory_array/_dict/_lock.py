"""The dict's lock: re-entrant within a process, exclusive across threads and processes.

:class:`DictLock` combines a ``threading.RLock`` (threads of this process) with
one *process lock* over the dict's entry block (other processes), chosen by the
entry block's ``lock kind`` (:mod:`._layout`):

* **A robust, process-shared mutex** in the entry block (:class:`MutexLock`;
  the Linux backend, through glibc). The kernel marks it when its holder dies,
  however it dies, and the next taker is told (``EOWNERDEAD``): it repairs
  (:mod:`._journal`) and makes the mutex consistent. Nothing of it lives in a
  descriptor, so a forked child can never keep a dead parent's lock, and a
  fork at the descriptor limit changes nothing.
* **``flock``** on the dict's lock file (:class:`FileLock`; the portable
  backend, where there is no robust mutex). The kernel drops it with its
  holder; the next taker finds the mutation marker of :mod:`._journal` set
  and repairs. A ``flock`` belongs to an open file description, so each
  process has its own: a forked child opens one of its own at the fork hub's
  ``LOCKS`` phase (:mod:`.._process`); one that cannot (no descriptor left)
  must not share its parent's silently, so its next dict operation raises
  :class:`~shared_memory_array.AllocationError` saying why.

There is ONE :class:`DictLock` per dict per process (:meth:`DictLock.for_dict`,
keyed by the entry block's id), shared by every handle of the dict in the
process: re-entrancy works across handles. A process forked while one of its
threads held the lock does not hold it: the forking thread's pending releases
(leaving a ``with d.lock():`` block in the child) are counted as inherited and
ignored.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Protocol

from .._platform import DICT, BlockLocks, backend
from .._process import ForkPhase, at_fork
from .._waiting import Signal
from ..errors import AllocationError

__all__ = ["DictLock", "FileLock", "MutexLock", "ProcessLock"]

_get_ident = threading.get_ident


class ProcessLock(Protocol):
    """Exclusion between processes (not re-entrant; one per dict per process)."""

    def acquire(self) -> bool:
        """Take it; ``True`` if a holder died holding it (the caller repairs)."""
        ...

    def consistent(self) -> None:
        """The repair after a dead holder is done."""
        ...

    def release(self) -> None:
        """Give it back."""
        ...

    def after_fork_in_child(self) -> bool:
        """Make it this child's own; ``False`` if that is impossible."""
        ...

    def close(self) -> None:
        """Let go of what it holds (the last handle of the dict in this process closed)."""
        ...


class MutexLock:
    """A robust process-shared mutex in the entry block (see the module docstring)."""

    __slots__ = ("_address", "_view")

    def __init__(self, view: memoryview) -> None:
        from ctypes import addressof, c_char

        self._view = view  # keeps the mapping (and so the address) alive
        self._address = addressof(c_char.from_buffer(view))

    def acquire(self) -> bool:
        return backend.mutex_lock(self._address)

    def consistent(self) -> None:
        backend.mutex_consistent(self._address)

    def release(self) -> None:
        backend.mutex_unlock(self._address)

    def after_fork_in_child(self) -> bool:
        return True  # the state is in shared memory, owned by a thread id: nothing to reopen

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._view.release()


class FileLock:
    """``flock`` on the dict's lock file, through a description of this process's own."""

    __slots__ = ("_locks", "broken")

    def __init__(self, locks: BlockLocks) -> None:
        self._locks = locks
        self.broken: str | None = None

    def acquire(self) -> bool:
        if self.broken is not None:
            raise AllocationError(self.broken)
        self._locks.wait_lock(DICT, exclusive=True)
        return False  # a dead holder shows as the journal's marker, not here

    def consistent(self) -> None:
        return None

    def release(self) -> None:
        self._locks.unlock(DICT)

    def after_fork_in_child(self) -> bool:
        if not self._locks.reopen_in_child():
            self.broken = (
                "this forked process could not open its own description of the dict's "
                "lock file (no file descriptor left at fork): using the dict here would "
                "share the parent's lock and lose updates"
            )
            return False
        return True

    def close(self) -> None:
        self._locks.close()


class DictLock:
    """The process's re-entrant lock on one dict. Get it with :meth:`for_dict`."""

    __slots__ = (
        "_depth",
        "_inherited",
        "_inherited_by",
        "_key",
        "_owner",
        "_process_lock",
        "_references",
        "_thread_lock",
        "_wake",
        "name",
    )

    def __init__(self, name: str, process_lock: ProcessLock, key: bytes) -> None:
        self.name = name
        self._process_lock = process_lock
        self._key = key
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._owner = 0  # thread ident of the holder while _depth > 0
        self._inherited = 0  # levels the forking thread held in the parent (in a child)
        self._inherited_by = 0
        self._references = 0
        self._wake: Signal | None = None  # to bump once the process lock is released

    @classmethod
    def for_dict(cls, key: bytes) -> DictLock | None:
        """This process's lock for the dict whose entry block id is ``key``, if it has one."""
        with _registry_lock:
            lock = _registry.get(key)
            if lock is not None:
                lock._references += 1
            return lock

    @classmethod
    def register(cls, key: bytes, name: str, process_lock: ProcessLock) -> DictLock:
        """Make (or, if another thread was first, get) this process's lock for a dict."""
        with _registry_lock:
            lock = _registry.get(key)
            if lock is None:
                lock = _registry[key] = cls(name, process_lock, key)
            else:
                process_lock.close()
            lock._references += 1
            return lock

    def release_ref(self) -> None:
        """Drop one handle's reference; the last one lets go of the process lock."""
        with _registry_lock:
            self._references -= 1
            if self._references > 0:
                return
            if _registry.get(self._key) is self:
                del _registry[self._key]
        self._process_lock.close()

    def acquire(self) -> bool:
        """Take the lock (blocking); ``True`` if a holder died holding it (repair now).

        Only the outermost acquisition in this process takes the process lock.
        """
        self._thread_lock.acquire()
        depth = self._depth = self._depth + 1
        if depth > 1:
            return False
        try:
            died = self._process_lock.acquire()
        except BaseException:
            self._depth -= 1
            self._thread_lock.release()
            raise
        self._owner = _get_ident()
        return died

    def consistent(self) -> None:
        """Tell the process lock the repair after a dead holder is done."""
        self._process_lock.consistent()

    def release(self) -> None:
        """Release one level; the outermost release gives the process lock back.

        In a forked child, a release by the forking thread of a level it took
        before the fork (it holds nothing of its own now) is ignored.
        """
        if self._inherited and self._release_inherited():
            return
        wake = None
        if self._depth == 1:
            self._process_lock.release()
            wake, self._wake = self._wake, None
        self._depth -= 1
        try:
            if wake is not None:
                wake.bump()
        finally:
            self._thread_lock.release()

    def wake_after_release(self, signal: Signal) -> None:
        """Bump ``signal`` (wake the dict's waiters) once the process lock is released.

        Call with the lock held. A waiter woken while the lock is still held
        would only go to sleep again on it; one counted in after the release
        evaluates its predicate after the change, so no wake-up is lost.
        """
        self._wake = signal

    @property
    def thread_lock(self) -> threading.RLock:
        """The in-process part alone: excludes this process's other threads, no process lock."""
        return self._thread_lock

    @property
    def held(self) -> bool:
        """Whether some thread of this process holds the lock."""
        return self._depth > 0

    @property
    def outermost(self) -> bool:
        """Whether the calling thread holds exactly one level (its release gives it back)."""
        return self._depth == 1

    def _release_inherited(self) -> bool:
        """Consume one inherited level if this release is one; return whether it was."""
        me = _get_ident()
        if me != self._inherited_by or (self._depth and self._owner == me):
            return False  # another thread, or a level this thread took in the child
        self._inherited -= 1
        return True

    def _after_fork_in_child(self) -> None:
        me = _get_ident()
        self._inherited = self._depth if self._depth and self._owner == me else 0
        self._inherited_by = me
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._process_lock.after_fork_in_child()


_registry_lock = threading.RLock()  # re-entrant: garbage collection may close a handle inside
_registry: dict[bytes, DictLock] = {}  # entry block id -> this process's lock


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.RLock()
    for lock in list(_registry.values()):
        lock._after_fork_in_child()


at_fork(ForkPhase.LOCKS, after_in_child=_after_fork_in_child)
