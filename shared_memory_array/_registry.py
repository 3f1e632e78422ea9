"""Housekeeping: find this library's blocks on the system and remove orphans.

Every block of this library is named ``sma_…`` (:data:`~._block.PREFIX`) and
starts with the header of :mod:`._header`, which records the creating
process's pid and start time. That is all this module needs: it lists the
names, reads each header through the one parser
(:func:`~._header.parse_header`), and asks :mod:`._process` whether the creator
still runs. A reused pid (same number, other start time) and a zombie both
count as dead.

Reading a block here maps it read-only (O(1) whatever its size), parses the
header and unmaps it. It never unpickles anything and never trusts a header
field before the parser has checked it, so hostile blocks are safe to list.

Platforms: on Linux the blocks are the files of ``/dev/shm``. macOS and
Windows offer no way to enumerate named shared memory, so there
:func:`list_blocks` returns an empty list and :func:`cleanup` an empty result.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from ._block import PREFIX, SharedBlock, normalize_name, unlink_block
from ._header import BlockKind, Header, parse_header, peek_creator
from ._process import is_alive
from .errors import BlockNotFoundError, LayoutError

__all__ = ["GRACE_PERIOD", "BlockInfo", "CleanupResult", "cleanup", "describe_block", "list_blocks"]

SHM_DIR: Final = "/dev/shm"
GRACE_PERIOD: Final = 60.0
"""Seconds an unreadable block is left alone after its last change (it may be mid-creation)."""

_CAN_SCAN: Final = sys.platform.startswith("linux")
UNKNOWN_KIND: Final = "unknown"


@dataclass(frozen=True)
class BlockInfo:
    """One block of this library, as :func:`list_blocks` found it.

    Attributes
    ----------
    name : str
        Block name as ``attach`` takes it (no leading slash).
    kind : str
        ``"array"``, ``"codec"``, ``"dict"``, or ``"unknown"`` when the header
        cannot be read (then ``error`` says why).
    size : int
        Size of the block in bytes.
    creator_pid : int or None
        Pid of the creating process; ``None`` when the header is unreadable.
    creator_alive : bool or None
        Whether the creator still runs (same pid *and* same start time);
        ``None`` when the header is unreadable.
    modified : float
        Time of the block's last change of size or metadata (for this
        library's blocks, their creation), seconds since the epoch; 0.0 if unknown.
    owner_uid : int
        User id owning the block; -1 if unknown.
    generation : int or None
        Header generation (bumped by in-place rewrites).
    shape : tuple of int or None
        Array shape, for ``"array"`` blocks.
    dtype : str or None
        Array dtype, for ``"array"`` blocks.
    error : str or None
        Why the header could not be read; ``None`` when it could.
    """

    name: str
    kind: str
    size: int
    creator_pid: int | None
    creator_alive: bool | None
    modified: float = 0.0
    owner_uid: int = -1
    generation: int | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class CleanupResult:
    """What :func:`cleanup` did.

    Attributes
    ----------
    cleaned : list of str
        Blocks unlinked (with ``dry_run``: the blocks that would be unlinked).
    failed : list of str
        Blocks that should have been unlinked but could not be (``reasons`` says why).
    skipped : list of str
        Blocks left alone: creator alive, another user's, or unreadable but recent.
    dry_run : bool
        Whether this was a dry run (nothing unlinked).
    reasons : dict of str to str
        For every name above, one line saying why it went where it did.
    """

    cleaned: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dry_run: bool = False
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Probe:
    """Everything read from one block: the public info plus what cleanup needs."""

    info: BlockInfo
    header: Header | None
    regular_file: bool
    inode: int
    raw_creator: tuple[int, int] | None  # unvalidated; only ever used to skip a block


def _block_names() -> list[str]:
    """Names in /dev/shm with this library's prefix, sorted; empty where there is no scan."""
    if not _CAN_SCAN:
        return []
    try:
        with os.scandir(SHM_DIR) as entries:
            return sorted(entry.name for entry in entries if entry.name.startswith(PREFIX))
    except FileNotFoundError:
        return []


def _unreadable(
    name: str,
    stat_result: os.stat_result | None,
    error: str,
    *,
    regular_file: bool = True,
    raw_creator: tuple[int, int] | None = None,
) -> _Probe:
    info = BlockInfo(
        name=name,
        kind=UNKNOWN_KIND,
        size=stat_result.st_size if stat_result else 0,
        creator_pid=None,
        creator_alive=None,
        modified=_modified(stat_result),
        owner_uid=stat_result.st_uid if stat_result else -1,
        error=error,
    )
    inode = stat_result.st_ino if stat_result else 0
    return _Probe(info, None, regular_file, inode, raw_creator)


def _modified(stat_result: os.stat_result | None) -> float:
    # ftruncate at creation sets both; the newer one errs towards "recent".
    return max(stat_result.st_mtime, stat_result.st_ctime) if stat_result else 0.0


def _path_stat(name: str) -> os.stat_result:
    """``lstat`` of the block's file in /dev/shm; BlockNotFoundError if it is gone."""
    try:
        return os.lstat(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        raise BlockNotFoundError(name) from None


def _probe(name: str) -> _Probe:
    """Read what can be read about block ``name`` without ever raising on its content.

    Raises
    ------
    BlockNotFoundError
        The block does not exist (any more).
    """
    if _CAN_SCAN:
        # Opening a FIFO or a device named sma_* could block or have side effects.
        path_stat = _path_stat(name)
        if not stat.S_ISREG(path_stat.st_mode):
            return _unreadable(name, path_stat, "not a regular file", regular_file=False)
    try:
        block = SharedBlock.attach(name, readonly=True, keep_fd=True)
    except OSError as exc:  # permission denied (another user's block), ...
        stat_result = _path_stat(name) if _CAN_SCAN else None
        return _unreadable(name, stat_result, f"cannot open: {exc.strerror or exc}")
    try:
        stat_result = _fd_stat(block)
        buf = block.buf
        raw_creator = peek_creator(buf)
        try:
            header = parse_header(buf, name=name)
        except LayoutError as exc:
            return _unreadable(name, stat_result, str(exc), raw_creator=raw_creator)
    finally:
        block.close()
    is_array = header.kind == BlockKind.ARRAY and header.dtype is not None
    info = BlockInfo(
        name=name,
        kind=header.kind.name.lower(),
        size=block.size,
        creator_pid=header.creator_pid,
        creator_alive=is_alive(header.creator_pid, header.creator_start),
        modified=_modified(stat_result),
        owner_uid=stat_result.st_uid if stat_result else -1,
        generation=header.generation,
        shape=header.shape if is_array else None,
        dtype=str(header.dtype) if is_array else None,
    )
    return _Probe(info, header, True, stat_result.st_ino if stat_result else 0, raw_creator)


def _fd_stat(block: SharedBlock) -> os.stat_result | None:
    """``fstat`` of the open block (same file as the mapping); ``None`` where unavailable."""
    try:
        return os.fstat(block.fileno())
    except (ValueError, OSError):  # Windows: no descriptor
        return None


def describe_block(name: str) -> tuple[BlockInfo, Header | None]:
    """Return the :class:`BlockInfo` of block ``name`` and its header (``None`` if unreadable).

    ``name`` may omit the ``sma_`` prefix, as the names given to ``SharedDict.create`` do.

    Raises
    ------
    TypeError
        ``name`` is not a string.
    BlockNotFoundError
        No block of that name exists.
    """
    bare = normalize_name(name)
    try:
        probe = _probe(bare)
    except BlockNotFoundError:
        if bare.startswith(PREFIX):
            raise
        try:  # a short name, as SharedDict.create takes it
            probe = _probe(PREFIX + bare)
        except BlockNotFoundError:
            raise BlockNotFoundError(bare) from None
    return probe.info, probe.header


def list_blocks() -> list[BlockInfo]:
    """Return every block of this library on the system, sorted by name.

    Blocks are found by their name prefix in ``/dev/shm`` (Linux; elsewhere the
    list is empty: the platform offers no way to enumerate them). A block whose
    header cannot be read is listed with ``kind="unknown"`` and the reason in
    ``error``; a block removed while the listing runs is left out.

    Returns
    -------
    list of BlockInfo
    """
    return [probe.info for probe in _probes()]


def _probes() -> Iterator[_Probe]:
    """Probe every block of this library, leaving out those unlinked since the scan."""
    for name in _block_names():
        try:
            yield _probe(name)
        except BlockNotFoundError:
            continue


def _inodes_in_use() -> set[int]:
    """Inodes of /dev/shm files that any process we may inspect has mapped or open.

    Read from ``/proc/PID/maps`` and ``/proc/PID/fd``; processes we may not
    inspect (other users') are passed over, they cannot open our 0600 blocks.
    An inode of another filesystem may slip in: it can only protect a block.
    """
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
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(shm_prefix):
                        inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return inodes


def _removal_reason(
    probe: _Probe, now: float, inodes_in_use: Callable[[], set[int]]
) -> tuple[bool, str]:
    """Decide whether cleanup may unlink the block, and say why (see :func:`cleanup`)."""
    info = probe.info
    my_uid = os.geteuid() if hasattr(os, "geteuid") else info.owner_uid
    if info.owner_uid != my_uid:
        return False, f"owned by uid {info.owner_uid}, not by this user"
    if probe.header is not None:
        if info.creator_alive:
            return False, f"creator pid {info.creator_pid} is running"
        return True, f"creator pid {info.creator_pid} has exited"
    if not probe.regular_file:
        return False, "not a regular file"
    if probe.raw_creator is not None and is_alive(*probe.raw_creator):
        return False, (
            f"header unreadable but names running pid {probe.raw_creator[0]} "
            f"(being rewritten?): {info.error}"
        )
    age = now - info.modified
    if age < GRACE_PERIOD:
        return False, f"header unreadable, changed {age:.0f} s ago (may be being created)"
    if probe.inode in inodes_in_use():
        return False, f"header unreadable, but a process has it open or mapped: {info.error}"
    return True, f"header unreadable for over {GRACE_PERIOD:.0f} s and unused: {info.error}"


def _unlink_if_unchanged(name: str, inode: int) -> bool:
    """Unlink block ``name`` if it is still the file that was read; ``False`` if it was not."""
    try:
        if os.lstat(os.path.join(SHM_DIR, name)).st_ino != inode:
            return False  # replaced by a new block of the same name: not the one judged
    except FileNotFoundError:
        return False
    return unlink_block(name)


def cleanup(dry_run: bool = False) -> CleanupResult:
    """Unlink the blocks of this library whose creating process is dead.

    The rule, block by block:

    * another user's block: skipped;
    * a readable header: unlinked if its creator has exited (a reused pid, one
      with another start time, and a zombie count as exited), else skipped.
      The calling process's own blocks are alive, so they are skipped too;
    * an unreadable header (corrupt, truncated, empty): skipped while its
      first bytes name a running creator (a header being rewritten), while it
      changed less than :data:`GRACE_PERIOD` (60 s) ago (a block being
      created), and while any process has it open or mapped (Linux
      ``/proc``); otherwise unlinked. Entries that are not regular files are
      never touched.

    Parameters
    ----------
    dry_run
        Unlink nothing; ``cleaned`` then lists what would have been unlinked.

    Returns
    -------
    CleanupResult
        Names cleaned, failed (unlink raised; the reason is in ``reasons``)
        and skipped. Blocks that vanish meanwhile appear in none of them.
        Empty on platforms without a block scan (see :func:`list_blocks`).
    """
    result = CleanupResult(dry_run=dry_run)
    now = time.time()
    inodes_in_use = functools.cache(_inodes_in_use)  # scanned once, and only if needed
    for probe in _probes():
        name = probe.info.name
        remove, reason = _removal_reason(probe, now, inodes_in_use)
        if not remove:
            result.skipped.append(name)
        elif dry_run:
            result.cleaned.append(name)
        else:
            try:
                removed = _unlink_if_unchanged(name, probe.inode)
            except OSError as exc:
                result.failed.append(name)
                result.reasons[name] = f"cannot unlink: {exc.strerror or exc}"
                continue
            if not removed:
                continue  # someone else removed or replaced it meanwhile
            result.cleaned.append(name)
        result.reasons[name] = reason
    return result
