"""Who holds a block, asked of the kernel: the one lifetime mechanism of every block kind.

API.md section 0 in one sentence: explicit ends free a block now; implicit ends
(garbage collection, exit, any signal) never pull the rug from a process that
still holds it; nothing leaks. Everything that rule needs to know -- *does any
process still hold this block?*, *is its owner still there?*, *is a pickled
handle of it on its way?* -- is kept by the kernel in locks, never guessed from
pids.

Locks
-----
Three bytes of every block file carry ``fcntl`` open-file-description (OFD)
locks (Linux >= 3.15). An OFD lock belongs to one *open file description*: every
descriptor ``dup``-ed from it shares it, and the kernel drops it when the last
such descriptor closes, also when the process dies by any signal. OFD locks are
independent of ``flock`` (the dict's operation lock) on Linux.

=======  ========  =====================================================================
byte     name      held
=======  ========  =====================================================================
0        HOLD      shared, by every mapping of the block, for as long as the mapping
                   lives (views included); exclusive, for microseconds, by a process
                   that checks nobody else holds it before it unlinks or rewrites it
1        COUNTER   exclusive, for microseconds, while the lifetime words change
2        OWNER     exclusive, by the owner: the handle that ``create``-d an array or a
                   dict (until it lets go), the writer of a codec block (until release)
=======  ========  =====================================================================

"Does anyone else hold it?" is ``F_OFD_GETLK`` for an exclusive lock: it reports
a conflicting lock of *another* description, so a process asks through its own
descriptor without counting itself, or through a fresh one to count everybody.

Descriptors
-----------
Each mapping keeps one descriptor (a :class:`Hold`), opened for it, whose
description carries its HOLD lock; the descriptor is closed when the mapping
itself goes (``weakref.finalize`` on the ``mmap``: after its last view), so the
lock follows the mapping exactly. (Python < 3.13's ``mmap`` also ``dup``-s the
descriptor for its own use: two descriptors, one description, one lock; on 3.13
``trackfd=False`` avoids the duplicate.)

A forked child shares its parent's descriptions, so it would share -- and, by
unlocking at its exit, take away -- its parent's locks. In the child, right
after ``fork``, every hold is reopened through ``/proc/self/fd`` into a
description of its own (holding HOLD, never OWNER: ownership does not fork).

Lifetime words
--------------
Header format v2 keeps 64 bytes after the header (:data:`~._header.LIFETIME_SIZE`),
changed only under COUNTER: ``in_flight`` (handles pickled and not yet
unpickled, clamped at 0: a pickle may be loaded twice or never), the
``time.time_ns()`` of the last pickle (``CLOCK_REALTIME``: the same in every
time namespace), and the block's ``state`` (0 live, 1 pooled).

Platforms without OFD locks (macOS) get no implicit reaping: the owner's
explicit ends and its normal exit still unlink (see :mod:`._reaper`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys
import threading
import time
from typing import Final

__all__ = [
    "HAVE_OFD_LOCKS",
    "Hold",
    "LifetimeWords",
    "holds_of_this_process",
    "let_go_all",
    "this_pid",
]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

HAVE_OFD_LOCKS: Final = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK")

HOLD: Final = 0
COUNTER: Final = 1
OWNER: Final = 2

STATE_LIVE: Final = 0
STATE_POOLED: Final = 1

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t).
_FLOCK: Final = struct.Struct("hhqqi4x")
_WORDS: Final = struct.Struct("<qqq")
_BUSY_RETRY_SECONDS: Final = 2.0

if HAVE_OFD_LOCKS:
    _SETLK: int = fcntl.F_OFD_SETLK
    _SETLKW: int = fcntl.F_OFD_SETLKW
    _GETLK: int = fcntl.F_OFD_GETLK
    _RDLCK: int = fcntl.F_RDLCK
    _WRLCK: int = fcntl.F_WRLCK
    _UNLCK: int = fcntl.F_UNLCK
else:  # pragma: no cover - never called: every entry point checks HAVE_OFD_LOCKS
    _SETLK = _SETLKW = _GETLK = _RDLCK = _WRLCK = _UNLCK = 0


def _fcntl_lock(fd: int, command: int, lock_type: int, byte: int) -> int:
    """One OFD lock call on ``byte``; returns the ``l_type`` the kernel wrote back."""
    answer = fcntl.fcntl(fd, command, _FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0))
    return int(_FLOCK.unpack(answer)[0])


def try_lock(fd: int, byte: int, *, exclusive: bool) -> bool:
    """Take a lock on ``byte`` without waiting; ``False`` if another description holds one."""
    if not HAVE_OFD_LOCKS:
        return True
    try:
        _fcntl_lock(fd, _SETLK, _WRLCK if exclusive else _RDLCK, byte)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def wait_lock(fd: int, byte: int, *, exclusive: bool) -> None:
    """Take a lock on ``byte``, waiting for it (only for locks held for microseconds)."""
    if HAVE_OFD_LOCKS:
        _fcntl_lock(fd, _SETLKW, _WRLCK if exclusive else _RDLCK, byte)


def unlock(fd: int, byte: int) -> None:
    """Drop this description's lock on ``byte`` (no error if it holds none)."""
    if HAVE_OFD_LOCKS:
        _fcntl_lock(fd, _SETLK, _UNLCK, byte)


def held_by_others(fd: int, byte: int) -> bool:
    """Whether another open file description holds any lock on ``byte`` of ``fd``'s file."""
    if not HAVE_OFD_LOCKS:
        return False
    return _fcntl_lock(fd, _GETLK, _WRLCK, byte) != _UNLCK


def hold_shared(fd: int, *, wait: bool) -> bool:
    """Take the HOLD lock shared; with ``wait``, retry while someone holds it exclusively.

    The exclusive HOLD is only ever taken for microseconds (a reaper checking,
    a codec writer rewriting), so the retry is short; ``False`` after
    :data:`_BUSY_RETRY_SECONDS` or at once without ``wait``.
    """
    deadline = time.monotonic() + _BUSY_RETRY_SECONDS
    delay = 1e-4
    while not try_lock(fd, HOLD, exclusive=False):
        if not wait or time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


_pid = os.getpid()


def this_pid() -> int:
    """``os.getpid()``, cached (glibc makes every call a system call), refreshed after fork."""
    return _pid


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh_pid)


class LifetimeWords:
    """The lifetime words of one v2 block, read and changed through a mapping under COUNTER."""

    __slots__ = ("_buf", "_fd", "_offset")

    def __init__(self, buf: memoryview, fd: int, offset: int) -> None:
        self._buf, self._fd, self._offset = buf, fd, offset

    def read(self) -> tuple[int, int, int]:
        """``(in_flight, last_pickled_ns, state)`` as they are now."""
        in_flight, last_ns, state = _WORDS.unpack_from(self._buf, self._offset)
        return max(0, in_flight), last_ns, state

    def _update(self, in_flight_change: int, state: int | None) -> None:
        wait_lock(self._fd, COUNTER, exclusive=True)
        try:
            in_flight, last_ns, old_state = self.read()
            if in_flight_change > 0:
                last_ns = time.time_ns()
            _WORDS.pack_into(
                self._buf,
                self._offset,
                max(0, in_flight + in_flight_change),
                last_ns,
                old_state if state is None else state,
            )
        finally:
            unlock(self._fd, COUNTER)

    def pickled(self) -> None:
        """Count one more handle in flight, now."""
        self._update(1, None)

    def unpickled(self) -> None:
        """Count one handle less in flight (never below 0)."""
        self._update(-1, None)

    def set_state(self, state: int) -> None:
        """Mark the block live or pooled (shown by ``list_blocks``)."""
        self._update(0, state)


def decode_words(raw: bytes | memoryview, offset: int) -> tuple[int, int, int]:
    """``(in_flight, last_pickled_ns, state)`` from the bytes of a block (for the reaper)."""
    in_flight, last_ns, state = _WORDS.unpack_from(raw, offset)
    return max(0, in_flight), last_ns, state


class Hold:
    """The descriptor one mapping keeps, and with it the HOLD lock (see the module docstring).

    Attributes
    ----------
    fd : int
        The descriptor; -1 once closed.
    name : str
        The block's name, for the reaper's look after the last mapping went.
    writable : bool
        Whether ``fd`` was opened read-write (needed for exclusive locks).
    """

    __slots__ = ("__weakref__", "dev", "fd", "ino", "name", "owner", "pid", "writable")

    def __init__(self, fd: int, name: str, *, writable: bool, dev: int, ino: int) -> None:
        self.fd = fd
        self.name = name
        self.writable = writable
        self.dev, self.ino = dev, ino
        self.pid = _pid
        self.owner = False
        with _registry_lock:
            _holds[id(self)] = self

    def take_owner(self) -> bool:
        """Become the block's owner if nobody is; ``True`` if this hold now owns it."""
        if (
            not self.owner
            and self.writable
            and self.fd >= 0
            and try_lock(self.fd, OWNER, exclusive=True)
        ):
            self.owner = True
            key = (self.dev, self.ino)
            _owners_here[key] = _owners_here.get(key, 0) + 1
        return self.owner

    def drop_owner(self) -> None:
        """Stop owning the block (a no-op if this hold does not own it)."""
        if self.owner:
            self._forget_owner()
            if self.fd >= 0:
                with contextlib.suppress(OSError):
                    unlock(self.fd, OWNER)

    def _forget_owner(self) -> None:
        self.owner = False
        key = (self.dev, self.ino)
        count = _owners_here.get(key, 0) - 1
        if count > 0:
            _owners_here[key] = count
        else:
            _owners_here.pop(key, None)

    def owner_elsewhere(self) -> bool:
        """Whether another description (another handle or process) owns the block."""
        if self.fd < 0:
            return False
        if _owners_here.get((self.dev, self.ino), 0) > self.owner:
            return True  # another hold of this process owns it: no need to ask the kernel
        return held_by_others(self.fd, OWNER)

    def others_hold(self) -> bool:
        """Whether any other description maps the block (this one not counted)."""
        return self.fd >= 0 and held_by_others(self.fd, HOLD)

    def close(self) -> None:
        """Close the descriptor (the kernel drops its locks with the last one); idempotent."""
        with _registry_lock:
            _holds.pop(id(self), None)
            fd, self.fd = self.fd, -1
        if self.owner:
            self._forget_owner()
        if fd >= 0:
            os.close(fd)

    def _reopen_in_child(self) -> None:
        """After ``fork``: a description of this process's own, holding HOLD only."""
        old = self.fd
        try:
            flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
            self.fd = os.open(f"/proc/self/fd/{old}", flags)
        except OSError:
            return  # no /proc: keep sharing the parent's description
        os.close(old)
        self.pid = os.getpid()
        self.owner = False  # ownership does not fork (the table of owners was emptied)
        with contextlib.suppress(OSError):
            hold_shared(self.fd, wait=False)


_holds: dict[int, Hold] = {}
_registry_lock = threading.RLock()  # re-entrant: garbage collection may close a hold inside
# (st_dev, st_ino) -> holds of this process that own that block.
_owners_here: dict[tuple[int, int], int] = {}


def holds_of_this_process() -> list[Hold]:
    """Every hold this process opened itself (not those a fork inherited), oldest first."""
    pid = _pid
    with _registry_lock:
        return [hold for hold in _holds.values() if hold.pid == pid]


def let_go_all() -> set[str]:
    """At exit: drop HOLD and OWNER on every hold of this process; return their block names.

    The process is ending: its views die with it, so it no longer keeps anyone's
    block alive, and the reaper that runs next may unlink what nobody else holds.
    """
    names = set()
    for hold in holds_of_this_process():
        names.add(hold.name)
        with contextlib.suppress(OSError):
            unlock(hold.fd, OWNER)
            unlock(hold.fd, HOLD)
        if hold.owner:
            hold._forget_owner()
    return names


def _before_fork() -> None:
    _registry_lock.acquire()


def _after_fork_in_parent() -> None:
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.RLock()
    _owners_here.clear()
    _refresh_pid()  # this hook may run before _refresh_pid's own
    for hold in list(_holds.values()):
        if hold.fd >= 0:
            hold._reopen_in_child()


if HAVE_OFD_LOCKS and hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
