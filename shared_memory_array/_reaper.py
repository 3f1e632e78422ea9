"""The reaper: unlink blocks that nobody holds, whoever created them, whenever they let go.

The one decision of API.md section 0, made in one place for every kind of block
(:func:`judge`), and the three moments it runs without being asked:

* when a mapping goes and its block has no owner any more (:func:`after_last_mapping`:
  "whichever process lets go last");
* on the first block-creating call of a process, then at most every
  :data:`SCAN_INTERVAL` seconds (:func:`maybe_reap_all`);
* at a process's normal exit (interpreter exit, and multiprocessing children,
  which skip ``atexit``): it lets go of everything it holds and reaps, so the
  blocks of its dead children (a ``Pool`` SIGTERMs its workers) go too.

:func:`~shared_memory_array.cleanup` is the same decision on request.

The decision, for one name in /dev/shm:

1. Not a regular file, another user's, or writable by others: never touched.
2. Held (a process maps it: its HOLD lock, see :mod:`._lifetime`): kept. The
   reaper takes HOLD exclusively to ask, and keeps it until it has unlinked, so
   no process can attach in between.
3. A handle of it in flight (pickled, not yet unpickled) less than
   :func:`grace_seconds` ago: kept.
4. A v1 block (no lifetime words, no HOLD locks: written by an older version of
   this library): kept while its creator's pid runs (pid and start time).
5. An unreadable header: kept while it may still be being created (changed less
   than 60 s ago, its first bytes name a running creator, or a process has it
   open or mapped).
6. Otherwise unlinked, after checking that the name still names the file judged.

Creator pids and start times never decide a v2 block's fate (they differ across
pid and time namespaces); they only explain, in ``list_blocks``.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import mmap
import multiprocessing.util
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from . import _lifetime
from ._header import Header, parse_header, peek_creator
from ._process import is_alive
from .errors import LayoutError

__all__ = [
    "GRACE_ENV",
    "SCAN_INTERVAL",
    "SHM_DIR",
    "Judgement",
    "after_last_mapping",
    "grace_seconds",
    "maybe_reap_all",
    "reap",
]

SHM_DIR: Final = "/dev/shm"
PREFIX: Final = "sma_"
CAN_SCAN: Final = sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)
UNREADABLE_GRACE: Final = 60.0
"""Seconds an unreadable block is left alone after its last change (it may be mid-creation)."""
DEFAULT_GRACE: Final = 60.0
GRACE_ENV: Final = "SHARED_MEMORY_ARRAY_HANDOFF_GRACE"
SCAN_INTERVAL: Final = 5.0


def grace_seconds() -> float:
    """Seconds a pickled handle is waited for (``$SHARED_MEMORY_ARRAY_HANDOFF_GRACE``, 60)."""
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE)))
    except ValueError:
        return DEFAULT_GRACE


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
        Block name (no leading slash).
    verdict : Verdict
        Reap, keep, or gone meanwhile.
    reason : str
        One line saying why.
    state : str
        ``"live"``, ``"pooled"``, ``"orphan"`` (nobody holds it: it goes) or ``"unreadable"``.
    in_use : bool or None
        Whether a process maps it, asked of the kernel; ``None`` if that cannot be asked.
    header : Header or None
        The parsed header, ``None`` when unreadable.
    stat : os.stat_result or None
        ``fstat`` of the file judged.
    error : str or None
        Why the header could not be read.
    in_flight : int
        Handles pickled and not yet unpickled (v2 blocks).
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


def _my_uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else -1


def _inodes_in_use(judging_fd: int = -1) -> set[int]:
    """Inodes of /dev/shm files that any process we may inspect has mapped or open.

    Only for blocks without HOLD locks (unreadable headers): read from
    ``/proc/PID/maps`` and ``/proc/PID/fd``. ``judging_fd``, the descriptor this
    process opened to judge the block, is not counted.
    """
    own_pid = str(os.getpid())
    inodes: set[int] = set()
    shm_prefix = SHM_DIR + "/"
    try:
        pids = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return inodes
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as maps:
                lines = maps.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue  # exited, or not ours to read
        for line in lines:
            fields = line.split(None, 5)  # address perms offset dev inode path
            if len(fields) == 6 and fields[5].startswith(shm_prefix) and fields[4].isdigit():
                inodes.add(int(fields[4]))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if pid == own_pid and fd == str(judging_fd):
                    continue
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(shm_prefix):
                        inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return inodes


def _read_header(fd: int, size: int, name: str) -> tuple[Header | None, str | None, object]:
    """Map the block read-only and parse its header; ``(header, error, words)``."""
    if size == 0:
        return None, f"block {name!r} is 0 bytes, too short for a header", None
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        view = memoryview(mapping)
        try:
            try:
                header = parse_header(view, name=name)
            except LayoutError as exc:
                return None, str(exc), peek_creator(view)
            words = None
            if header.lifetime_offset is not None:
                words = _lifetime.decode_words(view, header.lifetime_offset)
            return header, None, words
        finally:
            view.release()
    finally:
        mapping.close()


def _judge_open(
    name: str, fd: int, info: os.stat_result, *, exclusive: bool, now: float
) -> Judgement:
    """Judge the block open on ``fd``; with ``exclusive``, HOLD was taken exclusively."""
    if exclusive:
        in_use: bool | None = False
    elif _lifetime.HAVE_OFD_LOCKS:
        in_use = _lifetime.held_by_others(fd, _lifetime.HOLD)
    else:
        in_use = None
    try:
        header, error, extra = _read_header(fd, info.st_size, name)
    except OSError as exc:
        return Judgement(name, Verdict.KEEP, f"cannot map: {exc.strerror}", "unreadable", in_use)
    if header is None:
        raw_creator = extra if isinstance(extra, tuple) else None
        return _judge_unreadable(name, info, error or "", in_use, raw_creator, now, fd)
    assert extra is None or isinstance(extra, tuple)
    in_flight, last_ns, state_word = extra if extra is not None else (0, 0, 0)

    def judged(verdict: Verdict, reason: str, state: str) -> Judgement:
        return Judgement(
            name, verdict, reason, state, in_use, header=header, stat=info, in_flight=in_flight
        )

    alive = is_alive(header.creator_pid, header.creator_start)
    creator = f"creator pid {header.creator_pid} {'is running' if alive else 'has exited'}"
    state = "pooled" if state_word == _lifetime.STATE_POOLED else "live"
    if in_use:  # before the v1 rule: this version's mappings of a v1 block hold HOLD too
        return judged(Verdict.KEEP, f"in use: a process maps it ({creator})", state)
    if header.version < 2:  # no HOLD locks from older versions: the creator's pid decides
        if alive:
            return judged(Verdict.KEEP, creator, "live")
        return judged(Verdict.REAP, f"{creator} (format v1)", "orphan")
    if in_use is None:
        return judged(Verdict.KEEP, "cannot ask the kernel who holds it", state)
    age = now - last_ns / 1e9
    if in_flight and age < grace_seconds():
        reason = f"{in_flight} pickled handle(s) in flight, the last pickled {age:.0f} s ago"
        return judged(Verdict.KEEP, reason, "live")
    return judged(Verdict.REAP, f"no process holds it ({creator})", "orphan")


def _judge_unreadable(
    name: str,
    info: os.stat_result,
    error: str,
    in_use: bool | None,
    raw_creator: tuple[int, int] | None,
    now: float,
    judging_fd: int,
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

    if raw_creator is not None and is_alive(*raw_creator):
        return keep(f"header unreadable but names running pid {raw_creator[0]}: {error}")
    age = now - max(info.st_mtime, info.st_ctime)
    if age < UNREADABLE_GRACE:
        return keep(f"header unreadable, changed {age:.0f} s ago (may be being created)")
    if in_use or info.st_ino in _inodes_in_use(judging_fd):
        return keep(f"header unreadable, but a process has it open or mapped: {error}")
    return Judgement(
        name,
        Verdict.REAP,
        f"header unreadable for over {UNREADABLE_GRACE:.0f} s and unused: {error}",
        "unreadable",
        in_use,
        stat=info,
        error=error,
        raw_creator=raw_creator,
    )


def _open(name: str) -> tuple[int, os.stat_result, bool] | Judgement:
    """Open ``name`` in /dev/shm for judging, or say why it is not ours to judge."""
    path = os.path.join(SHM_DIR, name)
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return Judgement(name, Verdict.GONE, "gone", "unreadable", None)
    except OSError as exc:
        return Judgement(name, Verdict.KEEP, f"cannot stat: {exc.strerror}", "unreadable", None)
    if not stat.S_ISREG(link.st_mode):
        return Judgement(name, Verdict.KEEP, "not a regular file", "unreadable", None, stat=link)
    if link.st_uid != _my_uid():
        reason = f"owned by uid {link.st_uid}, not by this user"
        return Judgement(name, Verdict.KEEP, reason, "unreadable", None, stat=link)
    if link.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        reason = f"writable by group or others (mode {stat.S_IMODE(link.st_mode):o}): not ours"
        return Judgement(name, Verdict.KEEP, reason, "unreadable", None, stat=link)
    writable = True
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags)
    except PermissionError:
        writable = False
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as exc:
            return Judgement(name, Verdict.KEEP, f"cannot open: {exc.strerror}", "unreadable", None)
    except FileNotFoundError:
        return Judgement(name, Verdict.GONE, "gone", "unreadable", None)
    except OSError as exc:
        return Judgement(name, Verdict.KEEP, f"cannot open: {exc.strerror}", "unreadable", None)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != _my_uid():
        os.close(fd)  # replaced between lstat and open
        return Judgement(name, Verdict.KEEP, "replaced while being judged", "unreadable", None)
    return fd, info, writable


def judge(name: str, *, now: float | None = None) -> Judgement:
    """Judge block ``name`` without touching it (``list_blocks`` and dry runs)."""
    opened = _open(name)
    if isinstance(opened, Judgement):
        return opened
    fd, info, _ = opened
    try:
        return _judge_open(name, fd, info, exclusive=False, now=time.time() if now is None else now)
    finally:
        os.close(fd)


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
        return opened
    fd, info, writable = opened
    when = time.time() if now is None else now
    try:
        exclusive = writable and _lifetime.HAVE_OFD_LOCKS
        if exclusive and not _lifetime.try_lock(fd, _lifetime.HOLD, exclusive=True):
            return _judge_open(name, fd, info, exclusive=False, now=when)
        judgement = _judge_open(name, fd, info, exclusive=exclusive, now=when)
        if judgement.verdict is not Verdict.REAP:
            return judgement
        path = os.path.join(SHM_DIR, name)
        try:
            if os.lstat(path).st_ino != info.st_ino:
                return Judgement(name, Verdict.GONE, "replaced meanwhile", "unreadable", None)
            os.unlink(path)
        except FileNotFoundError:
            return Judgement(name, Verdict.GONE, "gone", "unreadable", None)
        return judgement
    finally:
        os.close(fd)


def block_names() -> list[str]:
    """Names in /dev/shm with this library's prefix, sorted; empty where there is no scan."""
    if not CAN_SCAN:
        return []
    try:
        with os.scandir(SHM_DIR) as entries:
            return sorted(entry.name for entry in entries if entry.name.startswith(PREFIX))
    except OSError:
        return []


def _reap_quietly(names: Iterable[str]) -> None:
    """Reap each of ``names``; a failure leaves that block to the next scan."""
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            reap(name)


def _reap_all_quietly() -> None:
    _reap_quietly(block_names())


_scan_lock = threading.Lock()
_last_scan = -SCAN_INTERVAL


def maybe_reap_all() -> None:
    """Reap every orphan of this user, at most every :data:`SCAN_INTERVAL` seconds.

    Called by every block-creating call: the first one of a process always scans.
    """
    global _last_scan
    if not (CAN_SCAN and _lifetime.HAVE_OFD_LOCKS):
        return
    now = time.monotonic()
    if now - _last_scan < SCAN_INTERVAL or not _scan_lock.acquire(blocking=False):
        return
    try:
        _last_scan = now
        _reap_all_quietly()
    finally:
        _scan_lock.release()


def after_last_mapping(name: str) -> None:
    """A mapping of ``name`` went and its block had no owner: unlink it if nobody else holds it."""
    if CAN_SCAN and _lifetime.HAVE_OFD_LOCKS:
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
        pid = _lifetime.this_pid()
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
        if not (CAN_SCAN and _lifetime.HAVE_OFD_LOCKS):
            return
        for callback in self.before_exit:
            with contextlib.suppress(Exception):
                callback()
        with contextlib.suppress(Exception):  # exiting: nothing useful to do with an error
            names = _lifetime.let_go_all()
            _reap_quietly(sorted(names))
            _reap_all_quietly()


exit_hook = _ExitHook()
