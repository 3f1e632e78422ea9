"""Housekeeping: find this library's blocks on the system and remove orphans.

Every block of this library is named ``sma_…`` (:data:`~._block.PREFIX`) and
starts with the header of :mod:`._header`. What to do with a block is the
reaper's one decision (:func:`._reaper.judge`): a block that no process holds
(asked of the kernel: every mapping holds a lock on it) and of which no pickled
handle is in flight is an orphan; this module lists what the reaper sees and,
in :func:`cleanup`, lets it reap on request. The creator's pid and start time
are shown, to explain who made a block, never to decide.

Reading a block here reads its header through the descriptor (``pread``),
never through a mapping: a block that is all holes (cut short by a kill during
its reservation) would SIGBUS a reader of its mapping once the filesystem is
full. It never unpickles anything and never trusts a header field before the
parser has checked it, so hostile blocks are safe to list.

Odd entries (API.md section 5, v2): anything in /dev/shm named like a block is
listed and judged without ever crashing on it. Symlinks, FIFOs, directories,
sockets and devices are listed as ``kind="unknown"`` with what they are in
``error``, never opened or followed, and never removed. Names that are not
valid UTF-8 arrive as the standard library decodes file names (undecodable
bytes as lone surrogates, :func:`os.fsdecode`): they are judged like any other
block, and :func:`describe_block` takes them back in that form.

Platforms: the platform layer lists the blocks (:mod:`._platform`): on Linux
the files of ``/dev/shm`` (or of the configured directory); on the portable
backend its lock files, one per block. Windows offers no way to enumerate
named mappings: there :func:`list_blocks` returns an empty list and
:func:`cleanup` an empty result (the kernel frees a mapping with its last
handle, so nothing can leak).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Final

from . import _reaper
from ._block import PREFIX, normalize_name
from ._header import BlockKind, Header
from ._platform import backend
from ._process import is_alive
from ._reaper import Judgement, Verdict
from .errors import BlockNotFoundError

__all__ = [
    "UNREADABLE_QUIET",
    "BlockInfo",
    "CleanupResult",
    "cleanup",
    "describe_block",
    "list_blocks",
]

UNREADABLE_QUIET: Final = _reaper.UNREADABLE_QUIET
"""Seconds an unreadable block is left alone after its last change (it may be mid-creation)."""

_NAME_MAX: Final = 255  # bytes of a file name in a tmpfs
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
        Whether the creator still runs (same pid *and* same start time, as
        seen from this pid namespace); ``None`` when the header is unreadable.
        It explains; it never decides what ``cleanup`` removes.
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
    state : str
        ``"live"`` (held, or a handle of it in flight), ``"pooled"`` (memory a
        codec writer keeps for its next writes), ``"orphan"`` (nobody holds it:
        ``cleanup`` removes it) or ``"unreadable"``.
    in_use : bool or None
        Whether any process maps the block, asked of the kernel; ``None`` where
        that cannot be asked (another user's block, a platform without OFD locks).
    mapped_by : tuple of int or None
        Pids of the processes that map the block (of those this process may
        look at), sorted; ``None`` where the system does not tell.
    resident : int or None
        Bytes of the block in memory (or swapped out: pages that exist);
        ``None`` where unknown.
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
    state: str = "unreadable"
    in_use: bool | None = None
    mapped_by: tuple[int, ...] | None = None
    resident: int | None = None


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
        Blocks left alone: held by a process, a handle in flight, another user's,
        or unreadable but recent.
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


def _block_names() -> list[str]:
    """System names of this library's blocks, sorted; empty where the platform cannot list."""
    return _reaper.block_names()


_ENTRY_TYPES: Final = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _reason(judgement: Judgement) -> str:
    """The judgement's reason, naming what an entry is when it is not a regular file."""
    info = judgement.stat
    if info is not None and not stat.S_ISREG(info.st_mode):
        what = _ENTRY_TYPES.get(stat.S_IFMT(info.st_mode), "not a regular file")
        return f"{what}, not a block: never opened nor removed"
    return judgement.reason


def _shown_name(judgement: Judgement) -> str:
    """The block's name as ``attach`` takes it: the user's, where the system's stands for it.

    A platform that maps long names to short system names (the portable
    backend) keeps the user's in the header; it is shown only if it maps to
    this very system name, so a header cannot pass a block off as another.
    """
    header = judgement.header
    if header is None or not header.name or header.name == judgement.name:
        return judgement.name
    return header.name if backend.system_name(header.name) == judgement.name else judgement.name


def _info(judgement: Judgement, mappers: dict[int, list[int]] | None) -> BlockInfo:
    """The public record of one judged block (``mappers``: :meth:`Backend.mappers`)."""
    header, info = judgement.header, judgement.stat
    common = {
        "name": _shown_name(judgement),
        "size": info.st_size if info is not None else 0,
        "modified": max(info.st_mtime, info.st_ctime) if info is not None else 0.0,
        "owner_uid": info.st_uid if info is not None else -1,
        "state": judgement.state,
        "in_use": judgement.in_use,
        "mapped_by": (
            tuple(mappers.get(info.st_ino, ())) if mappers is not None and info else None
        ),
        "resident": backend.resident_bytes(info) if info is not None else None,
    }
    if header is None:
        return BlockInfo(
            kind=UNKNOWN_KIND,
            creator_pid=None,
            creator_alive=None,
            error=judgement.error or _reason(judgement),
            **common,  # type: ignore[arg-type]
        )
    is_array = header.kind == BlockKind.ARRAY and header.dtype is not None
    return BlockInfo(
        kind=header.kind.name.lower(),
        creator_pid=header.creator_pid,
        creator_alive=is_alive(header.creator_pid, header.creator_start),
        generation=header.generation,
        shape=header.shape if is_array else None,
        dtype=str(header.dtype) if is_array else None,
        **common,  # type: ignore[arg-type]
    )


def describe_block(name: str) -> tuple[BlockInfo, Header | None]:
    """Return the :class:`BlockInfo` of block ``name`` and its header (``None`` if unreadable).

    ``name`` may omit the ``sma_`` prefix, as the names given to ``SharedDict.create`` do,
    and may hold undecodable bytes as :func:`os.fsdecode` gives them (as
    :func:`list_blocks` shows such a name).

    Raises
    ------
    TypeError
        ``name`` is not a string.
    BlockNotFoundError
        No block of that name exists, or ``name`` cannot name one (too long,
        with ``/`` or NUL inside, a lone surrogate that no file name decodes to).
    """
    info, header, _ = _describe(name)
    return info, header


def _describe(name: str) -> tuple[BlockInfo, Header | None, Judgement]:
    """:func:`describe_block`, with the reaper's judgement (for ``inspect``)."""
    bare = _bare_name(name)
    candidates = [bare] if bare.startswith(PREFIX) else [bare, PREFIX + bare]
    for candidate in candidates:
        judgement = _reaper.judge(backend.system_name(candidate))
        if judgement.verdict is Verdict.GONE:
            continue
        if judgement.name != candidate and _shown_name(judgement) != candidate:
            continue  # another long name's block under the same short system name
        return _info(judgement, backend.mappers()), judgement.header, judgement
    raise BlockNotFoundError(bare)


def _bare_name(name: str) -> str:
    """``name`` checked as :func:`normalize_name` does, also accepting undecodable file names."""
    try:
        return normalize_name(name)
    except BlockNotFoundError as invalid:
        bare = name[1:] if name.startswith("/") else name
        try:
            encoded = os.fsencode(bare)  # undecodable bytes come back as they were
        except UnicodeEncodeError:
            raise invalid from None  # a lone surrogate that no file name decodes to
        if not encoded or len(encoded) > _NAME_MAX or b"/" in encoded or b"\0" in encoded:
            raise
        return bare


def list_blocks() -> list[BlockInfo]:
    """Return every block of this library on the system, sorted by name.

    Blocks are found through the platform layer: by their name prefix in
    ``/dev/shm`` (Linux), by their lock files (the portable backend); where the
    platform offers no way to enumerate them (Windows) the list is empty. A block whose
    header cannot be read is listed with ``kind="unknown"`` and the reason in
    ``error``; a block removed while the listing runs is left out.

    Returns
    -------
    list of BlockInfo
    """
    judgements = [_reaper.judge(name) for name in _block_names()]
    mappers = backend.mappers()  # one look at every process's mappings, for all blocks
    return [_info(j, mappers) for j in judgements if j.verdict is not Verdict.GONE]


def cleanup(dry_run: bool = False) -> CleanupResult:
    """Unlink the blocks of this library that no process holds.

    The rule, block by block (the reaper's, see :mod:`._reaper`):

    * another user's block, or an entry that is not a regular file: skipped;
    * a block any process maps (asked of the kernel), or of which a pickled
      handle is in flight (for at most the handoff grace, 60 s by default):
      skipped, whatever its creator's pid says;
    * a block of header format v1 (an older version of this library): unlinked
      when its creator has exited;
    * an unreadable header (corrupt, truncated, empty): skipped while its
      first bytes name a running creator, while it changed less than
      :data:`UNREADABLE_QUIET` (60 s) ago (a block being created), and while any
      process has it open or mapped; otherwise unlinked;
    * anything else: unlinked, after checking the name still names that file.

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
    for name in _block_names():
        try:
            judgement = _reaper.judge(name) if dry_run else _reaper.reap(name)
        except OSError as exc:
            result.failed.append(name)
            result.reasons[name] = f"cannot unlink: {exc.strerror or exc}"
            continue
        if judgement.verdict is Verdict.GONE:
            continue
        shown = _shown_name(judgement)
        if judgement.verdict is Verdict.REAP:
            result.cleaned.append(shown)
            for follower in judgement.followers:  # went with it (a dict's data block)
                follower_shown = _shown_name(follower)
                result.cleaned.append(follower_shown)
                result.reasons[follower_shown] = f"went with {shown!r}"
        else:
            result.skipped.append(shown)
        result.reasons[shown] = _reason(judgement)
    return result
