"""Who holds a block, asked of the kernel: the one lifetime mechanism of every block kind.

API.md section 0 in one sentence: explicit ends free a block now; implicit ends
(garbage collection, exit, any signal) never pull the rug from a process that
still holds it or from a pickled handle on its way; nothing leaks. What that
rule needs to know -- *does any process still hold this block?*, *is its owner
still there?*, *is a pickled handle of it on its way?* -- is kept by the kernel
in locks and in the block's lifetime area, never guessed from pids.

Locks
-----
Each block has three lock roles (the platform layer holds them: OFD byte locks
on Linux, ``flock`` on lock files in the portable backend; see
:mod:`._platform._common`). They belong to an open file description, and the
kernel drops them when its last descriptor closes, also when the process dies
by any signal.

=======  ==========================================================================
role     held
=======  ==========================================================================
HOLD     shared, by every mapping that does not own its block, for as long as the
         mapping lives (views included); exclusive, for microseconds, by a process
         making sure nobody maps the block before it unlinks or rewrites it
COUNTER  exclusive, for microseconds, while the lifetime area changes
OWNER    exclusive, by the owner: the handle that created an array or a dict (or
         took it over, see :meth:`Hold.take_owner`), the writer of a codec block
=======  ==========================================================================

"Is the block in use?" is "is HOLD or OWNER held by anyone". An owner holds
OWNER instead of HOLD (so a codec writer can tell, by taking HOLD
exclusively, that no reader maps its block any more); when it lets go of
OWNER it takes HOLD first, so it is never unheld while it maps the block.

Each mapping keeps one :class:`Hold`: the locks of an open file description
of its own, closed when the mapping itself goes (after its last view), so the
locks follow the mapping exactly. A forked child gets a description of its
own for every hold, holding HOLD only (ownership does not fork): at the fork
hub's ``HOLDS`` phase (:mod:`._process`).

The lifetime area
-----------------
Format v3 keeps :data:`AREA_SIZE` bytes after the header, outside its checksum
(processes change them while the block is in use), at ``header_size``:

======  ====  ===========  =========================================================
offset  size  field        meaning
======  ====  ===========  =========================================================
0       8     state        0 live, 1 pooled (a codec writer keeps it for reuse), 2
                           closing (its owner ended it while handles were in flight)
8       4     notify       the generation of ``notify``/``wait`` (a futex word)
12      4     waiters      processes waiting on ``notify`` (a hint: wake only if > 0)
16      8     overflow     pickles counted without a ticket (the table was full)
24      8     overflow_ns  when the last of those was pickled
32      32    reserved     0
64      448   tickets      :data:`TICKETS` entries ``(ticket u64, stamp ns u64)``;
                           ticket 0 marks a free entry
======  ====  ===========  =========================================================

A pickled handle carries a random ticket, recorded in the table with the time
it was pickled; its first landing removes it, so a pickle counts once however
often its bytes are loaded, and loading one never uses up another's. When the
table is full the pickle is counted in ``overflow`` instead (then landing
decrements it, clamped at 0: the old bare count, for the 29th pickle on).

Times are read from the platform's shared clock (on Linux the host's
``CLOCK_BOOTTIME``, the same in every time namespace and never stepping); a
stamp from the future is treated as stamped now, and the reaper rewrites it
so, so that no clock step stretches a grace (API.md section 0, v3).
Changes happen under COUNTER; the reaper reads the area with ``pread`` while
it holds HOLD exclusively and OWNER is free, when nobody can change it.

Format v2 blocks (an older version of this library) have a 64-byte area with a
bare ``in_flight`` count, the wall-clock ``time_ns`` of the last pickle and the
state; they are read and counted that way (:class:`LegacyArea`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import threading
import time
from typing import Final

from ._platform import COUNTER, HOLD, OWNER, BlockLocks, backend
from ._process import ForkPhase, at_fork, this_pid

__all__ = [
    "AREA_SIZE",
    "DEFAULT_GRACE",
    "GRACE_ENV",
    "STATE_CLOSING",
    "STATE_LIVE",
    "STATE_POOLED",
    "TICKETS",
    "Area",
    "CounterLock",
    "Hold",
    "InFlight",
    "LegacyArea",
    "grace_seconds",
    "holds_of_this_process",
    "in_flight_at",
    "let_go_all",
]

AREA_SIZE: Final = 512
LEGACY_AREA_SIZE: Final = 64
TICKETS: Final = 28
STATE_LIVE: Final = 0
STATE_POOLED: Final = 1
STATE_CLOSING: Final = 2
NOTIFY_OFFSET: Final = 8
WAITERS_OFFSET: Final = 12
DEFAULT_GRACE: Final = 60.0
GRACE_ENV: Final = "SHARED_MEMORY_ARRAY_HANDOFF_GRACE"
BUSY_RETRY_SECONDS: Final = 2.0
"""How long an attach waits while the block is held exclusively (a reaper judging it)."""

_STATE: Final = struct.Struct("<Q")
_OVERFLOW: Final = struct.Struct("<QQ")
_OVERFLOW_AT: Final = 16
_TICKETS_AT: Final = 64
_ENTRY: Final = struct.Struct("<QQ")
_LEGACY: Final = struct.Struct("<qqq")


def grace_seconds() -> float:
    """Seconds a pickled handle is waited for (``$SHARED_MEMORY_ARRAY_HANDOFF_GRACE``, 60)."""
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE)))
    except ValueError:
        return DEFAULT_GRACE


class InFlight:
    """Pickled handles of one block not landed yet, as the reaper judges them.

    Attributes
    ----------
    count : int
        Pickles still within the grace.
    newest_age : float
        Seconds since the newest of them was pickled (0 if none).
    future : bool
        A stamp lay in the future (a clock step): it counted as now.
    """

    __slots__ = ("count", "future", "newest_age")

    def __init__(self, count: int = 0, newest_age: float = 0.0, future: bool = False) -> None:
        self.count = count
        self.newest_age = newest_age
        self.future = future


def in_flight_at(raw: bytes | memoryview, version: int, *, now_ns: int | None = None) -> InFlight:
    """The pickles in flight recorded in a lifetime area's bytes (``raw`` starts at it)."""
    grace_ns = grace_seconds() * 1e9
    if version < 3:
        count, last_ns, _ = _LEGACY.unpack_from(raw, 0)
        now = time.time_ns() if now_ns is None else now_ns
        age, future = (0, True) if last_ns > now else (now - last_ns, False)
        if count > 0 and age < grace_ns:
            return InFlight(count, age / 1e9, future)
        return InFlight()
    now = backend.shared_clock_ns() if now_ns is None else now_ns
    count, newest, future = 0, None, False
    stamps = [stamp for ticket, stamp in _entries(raw) if ticket]
    overflow, overflow_ns = _OVERFLOW.unpack_from(raw, _OVERFLOW_AT)
    if overflow:
        stamps.append(overflow_ns)
    for stamp in stamps:
        if stamp > now:
            age, future = 0, True
        else:
            age = now - stamp
        if age < grace_ns:
            count += 1
            newest = age if newest is None else min(newest, age)
    return InFlight(count, (newest or 0) / 1e9, future)


def _entries(raw: bytes | memoryview) -> list[tuple[int, int]]:
    return [_ENTRY.unpack_from(raw, _TICKETS_AT + 16 * i) for i in range(TICKETS)]


def clamp_stamps(area: bytearray, now_ns: int) -> bool:
    """Rewrite every stamp of a v3 area later than ``now_ns`` as ``now_ns``; whether any was.

    A stamp from the future means the clock stepped back after it was taken:
    counting from now keeps the grace at its promised length, no longer.
    """
    changed = False
    for index in range(TICKETS):
        at = _TICKETS_AT + 16 * index
        ticket, stamp = _ENTRY.unpack_from(area, at)
        if ticket and stamp > now_ns:
            _ENTRY.pack_into(area, at, ticket, now_ns)
            changed = True
    count, stamp = _OVERFLOW.unpack_from(area, _OVERFLOW_AT)
    if count and stamp > now_ns:
        _OVERFLOW.pack_into(area, _OVERFLOW_AT, count, now_ns)
        changed = True
    return changed


def state_at(raw: bytes | memoryview, version: int) -> int:
    """The ``state`` word of a lifetime area's bytes."""
    if version < 3:
        return int(_LEGACY.unpack_from(raw, 0)[2])
    return int(_STATE.unpack_from(raw, 0)[0])


class Area:
    """The lifetime area of one v3 block, changed through a shared mapping under COUNTER.

    Parameters
    ----------
    buf
        A writable shared view of the block (at least up to the area's end).
    offset
        Where the area starts (the header's ``header_size``).
    locks
        The locks of a description of the block (COUNTER is taken on it).
    """

    __slots__ = ("_buf", "_locks", "_offset")

    def __init__(self, buf: memoryview, offset: int, locks: BlockLocks) -> None:
        self._buf, self._offset, self._locks = buf, offset, locks

    @property
    def notify_offset(self) -> int:
        """Offset in the block of the ``notify`` word (the futex word)."""
        return self._offset + NOTIFY_OFFSET

    @property
    def waiters_offset(self) -> int:
        """Offset in the block of the ``waiters`` word."""
        return self._offset + WAITERS_OFFSET

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return CounterLock(self._locks)

    def state(self) -> int:
        """The block's state word (live, pooled, closing)."""
        return int(_STATE.unpack_from(self._buf, self._offset)[0])

    def set_state(self, state: int) -> None:
        """Set the state word (one aligned store)."""
        with self._locked():
            _STATE.pack_into(self._buf, self._offset, state)

    def pickled(self) -> int:
        """Record one pickle in flight now; return its ticket (0: counted in ``overflow``)."""
        now = backend.shared_clock_ns()
        grace_ns = grace_seconds() * 1e9
        ticket = secrets.randbits(64) | 1
        base = self._offset + _TICKETS_AT
        with self._locked():
            for index in range(TICKETS):
                at = base + 16 * index
                old, stamp = _ENTRY.unpack_from(self._buf, at)
                if not old or not 0 <= now - stamp < grace_ns:  # free, or its grace is over
                    _ENTRY.pack_into(self._buf, at, ticket, now)
                    return ticket
            at = self._offset + _OVERFLOW_AT
            count, _ = _OVERFLOW.unpack_from(self._buf, at)
            _OVERFLOW.pack_into(self._buf, at, count + 1, now)
        return 0

    def landed(self, ticket: int) -> bool:
        """A pickle landed: remove its ticket (first landing only).

        A ticket of 0 was counted in ``overflow``, which goes down by one
        (never below 0). Returns whether the block's name must go now: its
        owner ended it while handles were in flight, and this was the last.
        """
        base = self._offset + _TICKETS_AT
        with self._locked():
            if ticket:
                for index in range(TICKETS):
                    at = base + 16 * index
                    if _ENTRY.unpack_from(self._buf, at)[0] == ticket:
                        _ENTRY.pack_into(self._buf, at, 0, 0)
                        break
            else:
                at = self._offset + _OVERFLOW_AT
                count, stamp = _OVERFLOW.unpack_from(self._buf, at)
                _OVERFLOW.pack_into(self._buf, at, max(0, count - 1), stamp)
            return self.state() == STATE_CLOSING and not self.in_flight().count

    def close_unless_in_flight(self) -> bool:
        """An explicit end: ``True`` if nothing is in flight (unlink now), else mark it closing.

        Under COUNTER, so a landing cannot slip between the look and the mark:
        the last handle to land on a closing block unlinks it (:meth:`landed`).
        """
        with self._locked():
            if not self.in_flight().count:
                return True
            _STATE.pack_into(self._buf, self._offset, STATE_CLOSING)
            return False

    def in_flight(self) -> InFlight:
        """Pickles of this block still within their grace."""
        raw = self._buf[self._offset : self._offset + AREA_SIZE]
        try:
            return in_flight_at(raw, 3)
        finally:
            raw.release()


class LegacyArea:
    """The 64-byte lifetime words of a format v2 block (an older version of this library)."""

    __slots__ = ("_buf", "_locks", "_offset")

    def __init__(self, buf: memoryview, offset: int, locks: BlockLocks) -> None:
        self._buf, self._offset, self._locks = buf, offset, locks

    notify_offset = waiters_offset = -1

    def _update(self, change: int, state: int | None = None) -> None:
        with CounterLock(self._locks):
            count, last_ns, old_state = _LEGACY.unpack_from(self._buf, self._offset)
            if change > 0:
                last_ns = time.time_ns()
            new_state = old_state if state is None else state
            _LEGACY.pack_into(self._buf, self._offset, max(0, count + change), last_ns, new_state)

    def state(self) -> int:
        return int(_LEGACY.unpack_from(self._buf, self._offset)[2])

    def set_state(self, state: int) -> None:
        self._update(0, state)

    def pickled(self) -> int:
        self._update(1)
        return 0

    def landed(self, ticket: int) -> bool:
        self._update(-1)
        return False

    def close_unless_in_flight(self) -> bool:
        return True  # format v2 knew no closing state: the old rule, unlink now

    def in_flight(self) -> InFlight:
        return in_flight_at(self._buf[self._offset : self._offset + LEGACY_AREA_SIZE], 2)


class CounterLock:
    """COUNTER held exclusively for the duration of a ``with`` (microseconds).

    Every read-modify-write of a word of the lifetime area that no atomic covers
    (the lifetime words here, the waiter count of :mod:`._waiting`) takes it.
    """

    __slots__ = ("_locks",)

    def __init__(self, locks: BlockLocks) -> None:
        self._locks = locks

    def __enter__(self) -> None:
        self._locks.wait_lock(COUNTER, exclusive=True)

    def __exit__(self, *exc: object) -> None:
        self._locks.unlock(COUNTER)


class Hold:
    """The lifetime locks one mapping keeps (see the module docstring).

    Attributes
    ----------
    locks : BlockLocks
        The locks of this mapping's own open description.
    name : str
        The block's system name, for the reaper's look once the mapping went.
    owner : bool
        Whether this hold owns the block (the one record of ownership).
    forked_apart : bool
        In a forked child: whether the locks got a description of their own.
        ``False`` means the child still shares its parent's (it could not
        reopen them: no descriptor left), and must not rely on them.
    """

    __slots__ = (
        "__weakref__",
        "_holding",
        "dev",
        "forked_apart",
        "ino",
        "locks",
        "name",
        "owner",
        "pid",
        "writable",
    )

    def __init__(
        self, locks: BlockLocks, name: str, *, writable: bool, dev: int = 0, ino: int = 0
    ) -> None:
        self.locks = locks
        self.name = name
        self.writable = writable
        self.dev, self.ino = dev, ino
        self.pid = this_pid()
        self.owner = False
        self.forked_apart = True
        self._holding = False  # whether this description holds HOLD shared
        with _registry_lock:
            _holds[id(self)] = self

    @property
    def closed(self) -> bool:
        """Whether the locks were let go (the mapping went)."""
        return self.pid == 0

    def hold(self, *, wait: bool) -> bool:
        """Take HOLD shared; with ``wait``, retry while someone holds it exclusively.

        Exclusive HOLD is only ever held for microseconds (a reaper judging, a
        codec writer rewriting), so the retry is short: ``False`` after
        :data:`BUSY_RETRY_SECONDS`, or at once without ``wait``.
        """
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        delay = 1e-4
        while not self.locks.try_lock(HOLD, exclusive=False):
            if not wait or time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        self._holding = True
        return True

    def held(self) -> None:
        """HOLD was taken shared on this description already (an accelerated open)."""
        self._holding = True

    def create_owned(self) -> None:
        """A block just created: its creator owns it (nobody else can hold it yet)."""
        if not self.locks.try_lock(OWNER, exclusive=True):  # pragma: no cover - a new file
            raise RuntimeError(f"block {self.name!r} was owned before it was created")
        self._set_owner(True)

    def take_owner(self) -> bool:
        """Become the block's owner if nobody is; ``True`` if this hold owns it now."""
        if self.owner:
            return True
        if self.writable and not self.closed and self.locks.try_lock(OWNER, exclusive=True):
            self._set_owner(True)
        return self.owner

    def drop_owner(self) -> None:
        """Stop owning the block, still holding it (a no-op if this hold does not own it)."""
        if not self.owner or self.closed:
            return
        if not self._holding:
            self.hold(wait=True)
        self._set_owner(False)
        with contextlib.suppress(OSError):
            self.locks.unlock(OWNER)

    def _set_owner(self, owner: bool) -> None:
        if owner == self.owner:
            return
        self.owner = owner
        key = (self.dev, self.ino)
        count = _owners_here.get(key, 0) + (1 if owner else -1)
        if count > 0:
            _owners_here[key] = count
        else:
            _owners_here.pop(key, None)

    def owner_elsewhere(self) -> bool:
        """Whether another description (another handle or process) owns the block."""
        if self.closed or self.owner:
            return False
        if _owners_here.get((self.dev, self.ino), 0):
            return True  # another hold of this process owns it: no need to ask the kernel
        return self.locks.held_by_others(OWNER)

    def readers_gone(self) -> bool:
        """Take HOLD exclusively if nobody maps the block but this owner; ``True`` if taken.

        Only for an owner (which holds no HOLD): the codec writer's proof that
        no reader has a view of its block any more. Release with :meth:`unhold`.
        """
        return self.owner and self.locks.try_lock(HOLD, exclusive=True)

    def unhold(self) -> None:
        """Drop this description's HOLD (after :meth:`readers_gone`)."""
        with contextlib.suppress(OSError):
            self.locks.unlock(HOLD)
        self._holding = False

    def close(self) -> None:
        """Let go of every lock (the kernel drops them with the description); idempotent."""
        with _registry_lock:
            _holds.pop(id(self), None)
            if self.closed:
                return
            self.pid = 0
        self._set_owner(False)
        self._holding = False
        self.locks.close()

    def _reopen_in_child(self) -> None:
        """After ``fork``: a description of this process's own, holding HOLD only."""
        self.owner = False  # the table of owners was emptied: ownership does not fork
        self._holding = False
        self.forked_apart = self.locks.reopen_in_child()
        if not self.forked_apart:
            return  # keeps sharing the parent's description; it is not this process's hold
        self.pid = this_pid()
        with contextlib.suppress(OSError):
            self.hold(wait=True)


_holds: dict[int, Hold] = {}
_registry_lock = threading.RLock()  # re-entrant: garbage collection may close a hold inside
# (st_dev, st_ino) -> holds of this process that own that block: owner_elsewhere() without
# a system call when another handle of this process owns it.
_owners_here: dict[tuple[int, int], int] = {}


def holds_of_this_process() -> list[Hold]:
    """Every hold this process opened itself (not those a fork inherited), oldest first."""
    pid = this_pid()
    with _registry_lock:
        return [hold for hold in _holds.values() if hold.pid == pid]


def let_go_all() -> set[str]:
    """At exit: drop every lock of every hold of this process; return their block names.

    The process is ending: its views die with it, so it no longer keeps anyone's
    block alive, and the reaper that runs next may unlink what nobody else holds.
    """
    names = set()
    for hold in holds_of_this_process():
        names.add(hold.name)
        with contextlib.suppress(OSError):
            hold.close()
    return names


def _before_fork() -> None:
    _registry_lock.acquire()


def _after_fork_in_parent() -> None:
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.RLock()
    _owners_here.clear()
    for hold in list(_holds.values()):
        if not hold.closed:
            hold._reopen_in_child()


if backend.kernel_holds:
    at_fork(
        ForkPhase.HOLDS,
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
