"""The reaper: unlink blocks that nobody holds, whoever created them, whenever they let go.

The one decision of API.md section 0, made in one place for every kind of block
(:func:`judge`, :func:`reap`), and the moments it runs without being asked:

* when a mapping goes and its block has no owner any more ("whichever process
  lets go last": the block layer calls :func:`after_last_mapping`);
* on the first block-creating call of a process, then at most every
  :data:`SCAN_INTERVAL` seconds (:func:`maybe_reap_all`);
* at a process's normal exit (interpreter exit, and multiprocessing children,
  which skip ``atexit``): it lets go of everything it holds and reaps, so the
  blocks of its dead children (a ``Pool`` SIGTERMs its workers) go too.

:func:`~shared_memory_array.cleanup` is the same decision on request.

The decision, for one name
--------------------------
1. Not a regular file, another user's, or writable by others: never touched.
2. In use: a process maps it (HOLD) or owns it (OWNER), asked of the kernel
   (see :mod:`._lifetime`). The reaper takes HOLD exclusively to ask, and keeps
   it until it has unlinked, so no process can attach in between. Kept --
   except a block whose owner ended it explicitly while pickled handles of it
   were in flight (state ``closing``): once none is in flight any more, its
   name goes even while it is mapped, as the owner's ``close()`` asked.
3. A pickled handle of it in flight less than the grace ago
   (:func:`~._lifetime.grace_seconds`): kept. A stamp from the future (a
   clock step) counts as now, and the reaper rewrites it so.
4. A policy of its kind says to keep it (:data:`KIND_POLICIES`: a dict's
   data block while its dict uses it).
5. A v1 block (no lifetime locks: an older version of this library): kept
   while its creator's pid runs (pid and start time).
6. An unreadable header: kept while it may still be being created (changed
   less than :data:`UNREADABLE_QUIET` ago, its first bytes name a running
   creator, or a process has it open or mapped: asked of ``/proc`` where the
   platform has it, else of the locks alone).
7. A v2 or v3 block of the other POSIX backend (its locks live elsewhere):
   kept. (A v1 block has no locks anywhere: rule 5 decides it on every backend.)
8. Otherwise unlinked, after checking that the name still names the file judged.

Headers are read with ``pread``, never through a mapping: a block cut short by
a kill during its reservation is all holes, and reading a hole through a
mapping of a full filesystem is a SIGBUS.

Creator pids and start times never decide a v2 or v3 block's fate (they differ
across pid and time namespaces); they only explain, in ``list_blocks``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import multiprocessing.util
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from . import _block, _lifetime
from ._header import BlockKind, Header, parse_header, peek_creator
from ._platform import HOLD, OWNER, BlockLocks, backend
from ._process import is_alive, this_pid
from .errors import LayoutError

__all__ = [
    "KIND_POLICIES",
    "SCAN_INTERVAL",
    "UNREADABLE_QUIET",
    "Judgement",
    "Verdict",
    "after_last_mapping",
    "block_names",
    "exit_hook",
    "judge",
    "maybe_reap_all",
    "reap",
]

UNREADABLE_QUIET: Final = 60.0
"""Seconds an unreadable block is left alone after its last change (it may be mid-creation).

Not the handoff grace of :mod:`._lifetime` (how long a pickled handle is waited for),
though both are 60 s by default."""
SCAN_INTERVAL: Final = 5.0
_HEADER_READ: Final = 4096


class Verdict(enum.Enum):
    """What the reaper decided for one block."""

    REAP = "reap"
    KEEP = "keep"
    GONE = "gone"  # vanished while being judged


@dataclass(frozen=True)
class Judgement:
    """The reaper's view of one block: what it is, who holds it, and what to do with it.

    Attributes
    ----------
    name : str
        The block's system name (no leading slash).
    verdict : Verdict
        Reap, keep, or gone meanwhile.
    reason : str
        One line saying why.
    state : str
        ``"live"``, ``"pooled"``, ``"orphan"`` (nobody holds it: it goes) or ``"unreadable"``.
    in_use : bool or None
        Whether a process maps or owns it, asked of the kernel; ``None`` if that
        cannot be asked.
    header : Header or None
        The parsed header, ``None`` when unreadable.
    stat : os.stat_result or None
        ``fstat`` of the file judged.
    error : str or None
        Why the header could not be read.
    in_flight : int
        Handles pickled and not yet unpickled, within their grace.
    raw_creator : tuple of int or None
        The creator pid and start time an unreadable header's first bytes name.
    followers : tuple of Judgement
        The judgements of the blocks reaped with this one (a dict's data
        blocks), by :func:`reap`.
    """

    name: str
    verdict: Verdict
    reason: str
    state: str
    in_use: bool | None
    header: Header | None = None
    stat: os.stat_result | None = None
    error: str | None = None
    in_flight: int = 0
    raw_creator: tuple[int, int] | None = None
    followers: tuple[Judgement, ...] = ()


@dataclass(frozen=True)
class BlockFacts:
    """What a kind's policy may look at: the block's header and how to read more of it."""

    name: str
    header: Header
    read: Callable[[int, int], bytes]


KIND_POLICIES: dict[BlockKind, Callable[[BlockFacts], str | None]] = {}
"""Per kind, a policy that returns a reason to keep an unheld block (or ``None``)."""
KIND_FOLLOWERS: dict[BlockKind, Callable[[BlockFacts], list[str]]] = {}
"""Per kind, the blocks that go with one: reaped right after it (a dict's data blocks)."""


def _read_header(
    read: Callable[[int, int], bytes], size: int, name: str
) -> tuple[Header | None, str | None, tuple[int, int] | None, bytes]:
    """Parse the header read through ``read`` (never a mapping); also the lifetime area's bytes.

    Returns ``(header, error, raw creator, area bytes)``.
    """
    if size == 0:
        return None, f"block {name!r} is 0 bytes, too short for a header", None, b""
    raw = read(min(size, _HEADER_READ), 0)
    if len(raw) >= 20:
        header_size = int.from_bytes(raw[16:20], "little")
        if len(raw) < header_size <= min(size, 1 << 20):
            raw = read(header_size, 0)
    try:
        header = parse_header(raw, name=name, block_size=size)
    except LayoutError as exc:
        return None, str(exc), peek_creator(raw), b""
    area = b""
    if header.lifetime_offset is not None:
        area = read(header.area_size, header.lifetime_offset)
    return header, None, None, area


def _judge_open(
    name: str,
    fd: int,
    locks: BlockLocks,
    info: os.stat_result,
    *,
    exclusive: bool,
    now: float,
) -> Judgement:
    """Judge the block open on ``fd``; with ``exclusive``, HOLD was taken exclusively."""
    if exclusive:
        in_use: bool | None = locks.held_by_others(OWNER)
    elif backend.kernel_holds:
        in_use = locks.held_by_others(HOLD) or locks.held_by_others(OWNER)
    else:
        in_use = None

    def read(size: int, offset: int) -> bytes:
        return backend.read_at(fd, size, offset)

    try:
        header, error, raw_creator, area = _read_header(read, info.st_size, name)
    except OSError as exc:
        return Judgement(name, Verdict.KEEP, f"cannot read: {exc.strerror}", "unreadable", in_use)
    if header is None:
        return _judge_unreadable(name, info, error or "", in_use, raw_creator, now, locks)
    in_flight = _lifetime.InFlight()
    state_word = _lifetime.STATE_LIVE
    if header.lifetime_offset is not None and len(area) >= header.area_size:
        in_flight = _lifetime.in_flight_at(area, header.version)
        state_word = _lifetime.state_at(area, header.version)

    def judged(verdict: Verdict, reason: str, state: str) -> Judgement:
        return Judgement(
            name,
            verdict,
            reason,
            state,
            in_use,
            header=header,
            stat=info,
            in_flight=in_flight.count,
        )

    alive = is_alive(header.creator_pid, header.creator_start)
    creator = f"creator pid {header.creator_pid} {'is running' if alive else 'has exited'}"
    state = "pooled" if state_word == _lifetime.STATE_POOLED else "live"
    if header.version >= 2 and header.portable != backend.lock_files:  # v1: no locks at all
        other = "portable" if header.portable else "linux"
        return judged(Verdict.KEEP, f"made by the {other} backend: its locks live elsewhere", state)
    closing = state_word == _lifetime.STATE_CLOSING
    if closing and not in_flight.count:
        return judged(Verdict.REAP, "its owner ended it; no handle of it is in flight", "orphan")
    if in_use:  # before the v1 rule: this version's mappings of a v1 block hold HOLD too
        return judged(Verdict.KEEP, f"in use: a process maps it ({creator})", state)
    if header.version < 2:  # no lifetime locks from older versions: the creator's pid decides
        if alive:
            return judged(Verdict.KEEP, creator, "live")
        return judged(Verdict.REAP, f"{creator} (format v1)", "orphan")
    if in_use is None:
        return judged(Verdict.KEEP, "cannot ask the kernel who holds it", state)
    if in_flight.count:
        reason = (
            f"{in_flight.count} pickled handle(s) in flight, the newest pickled "
            f"{in_flight.newest_age:.0f} s ago"
        )
        return judged(Verdict.KEEP, reason, "live")
    policy = KIND_POLICIES.get(header.kind)
    if policy is not None:
        keep = policy(BlockFacts(name, header, read))
        if keep is not None:
            return judged(Verdict.KEEP, keep, state)
    return judged(Verdict.REAP, f"no process holds it ({creator})", "orphan")


def _judge_unreadable(
    name: str,
    info: os.stat_result,
    error: str,
    in_use: bool | None,
    raw_creator: tuple[int, int] | None,
    now: float,
    locks: BlockLocks,
) -> Judgement:
    def keep(reason: str) -> Judgement:
        return Judgement(
            name,
            Verdict.KEEP,
            reason,
            "unreadable",
            in_use,
            stat=info,
            error=error,
            raw_creator=raw_creator,
        )

    if in_use:
        return keep(f"header unreadable, but a process holds it (being created?): {error}")
    if raw_creator is not None and is_alive(*raw_creator):
        return keep(f"header unreadable but names running pid {raw_creator[0]}: {error}")
    age = now - max(info.st_mtime, info.st_ctime)
    if age < UNREADABLE_QUIET:
        return keep(f"header unreadable, changed {age:.0f} s ago (may be being created)")
    # Where the system cannot tell who has a file open or mapped (no /proc), the locks
    # alone decide: every process of this library holds one on each block it maps.
    in_use_elsewhere = backend.inodes_in_use(locks.descriptors())
    if in_use is None or (in_use_elsewhere is not None and info.st_ino in in_use_elsewhere):
        return keep(f"header unreadable, and a process may have it open or mapped: {error}")
    return Judgement(
        name,
        Verdict.REAP,
        f"header unreadable for over {UNREADABLE_QUIET:.0f} s and unused: {error}",
        "unreadable",
        in_use,
        stat=info,
        error=error,
        raw_creator=raw_creator,
    )


def _open(name: str) -> tuple[int, BlockLocks, os.stat_result, bool] | Judgement:
    """Open ``name`` for judging, or say why it is not ours to judge."""
    try:
        link = backend.lstat_entry(name)
    except FileNotFoundError:
        return Judgement(name, Verdict.GONE, "gone", "unreadable", None)
    except Exception as exc:
        return Judgement(name, Verdict.KEEP, f"cannot stat: {exc}", "unreadable", None)
    not_ours = _not_ours(link)
    if not_ours is not None:
        return Judgement(name, Verdict.KEEP, not_ours, "unreadable", None, stat=link)
    try:
        fd, writable = backend.open_for_judging(name)
    except FileNotFoundError:
        return Judgement(name, Verdict.GONE, "gone", "unreadable", None)
    except Exception as exc:
        reason = f"cannot open: {getattr(exc, 'strerror', None) or exc}"
        return Judgement(name, Verdict.KEEP, reason, "unreadable", None)
    info = backend.fstat(fd)
    if _not_ours(info) is not None:
        backend.close_descriptor(fd)  # replaced between lstat and open
        return Judgement(name, Verdict.KEEP, "replaced while being judged", "unreadable", None)
    try:
        locks = backend.locks(fd, name, writable=writable, created=False)
    except Exception as exc:  # the portable backend's lock file may be gone meanwhile
        backend.close_descriptor(fd)
        return Judgement(name, Verdict.KEEP, f"cannot lock: {exc}", "unreadable", None, stat=info)
    return fd, locks, info, writable


def _not_ours(info: os.stat_result) -> str | None:
    # Any typed entry but a regular file is not a block (macOS's shared-memory objects
    # have no file type in their mode at all).
    if stat.S_IFMT(info.st_mode) and not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    uid = backend.uid()
    if uid >= 0 and info.st_uid != uid:
        return f"owned by uid {info.st_uid}, not by this user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):o}): not ours"
    return None


def judge(name: str, *, now: float | None = None) -> Judgement:
    """Judge block ``name`` without touching it (``list_blocks`` and dry runs)."""
    opened = _open(name)
    if isinstance(opened, Judgement):
        return opened
    fd, locks, info, _ = opened
    try:
        when = time.time() if now is None else now
        return _judge_open(name, fd, locks, info, exclusive=False, now=when)
    finally:
        locks.close()


def reap(name: str, *, now: float | None = None) -> Judgement:
    """Judge block ``name`` and unlink it if nobody holds it; never raises on its content.

    HOLD is taken exclusively for the whole decision, so no process can attach
    between the judgement and the unlink (an attacher waits those microseconds,
    then finds the name gone).

    Raises
    ------
    OSError
        The unlink itself failed (the judgement says it should have happened).
    """
    opened = _open(name)
    if isinstance(opened, Judgement):
        if opened.verdict is Verdict.GONE:
            backend.forget_stale(name)  # a lock file whose block is gone (portable backend)
        return opened
    fd, locks, info, writable = opened
    when = time.time() if now is None else now
    try:
        exclusive = writable and backend.kernel_holds and locks.try_lock(HOLD, exclusive=True)
        judgement = _judge_open(name, fd, locks, info, exclusive=exclusive, now=when)
        if judgement.verdict is not Verdict.REAP:
            if exclusive and judgement.header is not None:
                _clamp_future_stamps(fd, judgement.header)
            return judgement
        followers = _followers(name, fd, judgement.header)
        if not locks.unlink_name():
            return Judgement(name, Verdict.GONE, "gone or replaced meanwhile", "unreadable", None)
    finally:
        locks.close()
    gone = []
    for follower in followers:
        with contextlib.suppress(OSError, ValueError, LayoutError):
            followed = reap(follower)
            if followed.verdict is Verdict.REAP:
                gone.append(followed)
    return dataclasses.replace(judgement, followers=tuple(gone))


def _followers(name: str, fd: int, header: Header | None) -> list[str]:
    """The blocks that go with ``name`` (read before it is unlinked)."""
    follow = None if header is None else KIND_FOLLOWERS.get(header.kind)
    if follow is None or header is None:
        return []

    def read(size: int, offset: int) -> bytes:
        return backend.read_at(fd, size, offset)

    with contextlib.suppress(OSError, ValueError):
        return follow(BlockFacts(name, header, read))
    return []


def _clamp_future_stamps(fd: int, header: Header) -> None:
    """Rewrite stamps from the future (a clock step) as now: no step stretches a grace."""
    offset = header.lifetime_offset
    if offset is None or header.version < 3:
        return
    area = bytearray(backend.read_at(fd, header.area_size, offset))
    if _lifetime.clamp_stamps(area, backend.shared_clock_ns()):
        backend.patch(fd, bytes(area), offset)


def block_names() -> list[str]:
    """System names of this library's blocks, sorted; empty where the platform cannot list."""
    return backend.list_names() if backend.can_list else []


def _reap_quietly(names: Iterable[str]) -> None:
    """Reap each of ``names``; a failure leaves that block to the next scan."""
    for name in names:
        with contextlib.suppress(OSError, ValueError, LayoutError):
            reap(name)


_scan_lock = threading.Lock()
_last_scan = -SCAN_INTERVAL


def maybe_reap_all() -> None:
    """Reap every orphan of this user, at most every :data:`SCAN_INTERVAL` seconds.

    Called by every block-creating call: the first one of a process always scans.
    """
    global _last_scan
    if not (backend.can_list and backend.kernel_holds):
        return
    now = time.monotonic()
    if now - _last_scan < SCAN_INTERVAL or not _scan_lock.acquire(blocking=False):
        return
    try:
        _last_scan = now
        _reap_quietly(block_names())
    finally:
        _scan_lock.release()


def after_last_mapping(name: str) -> None:
    """A mapping of ``name`` went and its block had no owner: unlink it if nobody else holds it."""
    if backend.kernel_holds:
        _reap_quietly([name])


class _ExitHook:
    """At a normal exit: let go of every hold, then reap (this process's blocks and orphans)."""

    def __init__(self) -> None:
        self._hooked_pid = 0
        self._ran_in = 0
        self._lock = threading.Lock()
        self.before_exit: list[Callable[[], None]] = []  # e.g. the codec writer's shutdown
        self._registered = False

    def arm(self) -> None:
        """Make sure this process runs the hook at its exit (also a multiprocessing child)."""
        pid = this_pid()
        if self._hooked_pid == pid:
            return
        with self._lock:
            if not self._registered:
                # Only processes that used a block reap at exit: a bare `import`, or the
                # CLI listing blocks, must not unlink anything as it ends.
                self._registered = True
                atexit.register(self.run)
            if self._hooked_pid != pid:
                self._hooked_pid = pid
                # multiprocessing children end with os._exit, which skips atexit; they run
                # multiprocessing's own exit finalizers (a forked child starts with none).
                multiprocessing.util.Finalize(None, self.run, exitpriority=0)

    def run(self) -> None:
        if self._ran_in == os.getpid():
            return  # atexit and multiprocessing's finalizer may both call it
        self._ran_in = os.getpid()
        for callback in self.before_exit:
            with contextlib.suppress(Exception):
                callback()
        if not (backend.can_list and backend.kernel_holds):
            return
        with contextlib.suppress(Exception):  # exiting: nothing useful to do with an error
            names = _lifetime.let_go_all()
            _reap_quietly(sorted(names))
            _reap_quietly(block_names())


exit_hook = _ExitHook()
_block.hooks.before_create.append(maybe_reap_all)
_block.hooks.on_use.append(exit_hook.arm)
_block.hooks.after_last_mapping.append(after_last_mapping)
