"""Shared test configuration: Hypothesis profiles, the backend's capabilities, a leak check.

The suite runs under either POSIX backend (``SHARED_MEMORY_ARRAY_BACKEND=posix``
selects the portable one on Linux, which is how macOS behaviour is tested
here). Tests see blocks through the platform layer (:func:`library_blocks`,
:func:`block_exists`, :func:`make_unheld_block`), never through ``/dev/shm``
directly, unless they check a mechanism only one backend has: those carry
``needs(...)``, the one skip marker, whose reason says what the backend lacks.
"""

from __future__ import annotations

import functools
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Final

import pytest
from hypothesis import HealthCheck, settings

from shared_memory_array import _lifetime, _reaper
from shared_memory_array._block import new_name
from shared_memory_array._header import encoded_identity
from shared_memory_array._platform import backend
from shared_memory_array._process import current_identity, is_alive

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LEAK_SETTLE_SECONDS = 5.0
"""How long a leak check waits for blocks that are on their way out (the codec frees
released blocks from a collector thread, within about 2 s)."""

# -- what this run's backend has ---------------------------------------------------------

# Capability -> (whether this run's backend has it, what a backend without it lacks).
CAPABILITIES: Final[dict[str, tuple[bool, str]]] = {
    "block_files": (
        backend.directory is not None,
        "keeps blocks as shm_open objects, not as files of a directory such as /dev/shm: "
        "no symlink, FIFO, directory or undecodable name can stand in a block's place, "
        "and the listing comes from its lock files",
    ),
    "process_table": (
        backend.process_state(os.getpid()) is not None,
        "has no /proc: a process's start time and state are unknown (a reused pid or a "
        "zombie looks alive), and so is who has a block open without a lock",
    ),
    "reserved_pages": (
        backend.reserves_pages,
        "reserves no pages at creation and cannot find holes (no fallocate, no "
        "SEEK_HOLE): a block the memory cannot hold fails when a page is first touched",
    ),
    "copy_on_write": (
        backend.copy_on_write,
        "cannot map shared memory privately (macOS refuses MAP_PRIVATE on it): a private "
        "view is a copy made when it is mapped, so later writes by others never show in it",
    ),
    "reopen_after_unlink": (
        not backend.lock_files,
        "reopens lock files by path in a forked child: once the block's name is gone it "
        "cannot, and the child gets a clear error instead of a lock of its own",
    ),
    "free_space": (
        backend.limits().free is not None,
        "knows no shared-memory filesystem whose free space it could compare a request with",
    ),
}


def needs(capability: str) -> pytest.MarkDecorator:
    """Skip unless this run's backend has ``capability`` (a key of :data:`CAPABILITIES`)."""
    has, lacks = CAPABILITIES[capability]
    return pytest.mark.skipif(not has, reason=f"the {backend.name} backend {lacks}")


def has(capability: str) -> bool:
    """Whether this run's backend has ``capability`` (for expectations that differ)."""
    return CAPABILITIES[capability][0]


def dead_identity() -> tuple[int, int]:
    """A creator identity ``(pid, start time)`` whose process is gone.

    This pid with another start time (a reused pid) where start times are
    known; elsewhere (no /proc) the pid of a child that has exited.
    """
    if not has("process_table"):
        child = subprocess.Popen([sys.executable, "-c", ""])
        child.wait(timeout=60)
        return child.pid, 0
    pid, start = current_identity()
    return pid, start + 1


# -- a private /dev/shm (destructive tests: a full or small one, another namespace) -----------


@functools.cache
def private_shm_problem() -> str | None:
    """Why a child cannot get a fresh tmpfs on /dev/shm in its own mount namespace, or None."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux and unshare(1)"
    if os.geteuid() != 0:
        return "needs root for unshare -m and mount -t tmpfs"
    probe = subprocess.run(
        private_shm_command(["true"]), capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        return f"unshare -m with a tmpfs on /dev/shm failed: {probe.stderr.strip()}"
    return None


def needs_private_shm() -> None:
    """Skip the calling test, saying why, where :func:`private_shm_command` cannot run."""
    problem = private_shm_problem()
    if problem is not None:
        pytest.skip(f"no private /dev/shm: {problem}")


def private_shm_command(argv: list[str], *, size: str | None = None) -> list[str]:
    """``argv`` run in a private mount namespace with a fresh tmpfs (mode 1777) on /dev/shm.

    As root only (see :func:`needs_private_shm`); nothing outside the child sees it.
    """
    options = "mode=1777" if size is None else f"mode=1777,size={size}"
    return [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs -o {options} tmpfs /dev/shm && exec "$@"',
        "sh",
        *argv,
    ]


def run_in_private_shm(
    argv: list[str],
    *,
    size: str | None = None,
    timeout: float = 60,
    check: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` behind a private /dev/shm (:func:`private_shm_command`), output as text.

    Skips the calling test, saying why, where that is impossible.
    """
    needs_private_shm()
    return subprocess.run(
        private_shm_command(argv, size=size),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        cwd=cwd,
    )


# -- blocks, as the platform layer sees them --------------------------------------------


def library_blocks() -> set[str]:
    """System names of this library's blocks, as the backend lists them."""
    return set(backend.list_names())


def block_exists(name: str) -> bool:
    """Whether the block a user calls ``name`` exists."""
    return backend.exists(backend.system_name(name))


def make_unheld_block(
    content: bytes,
    *,
    name: str | None = None,
    size: int = 4096,
    mode: int | None = None,
    uid: int | None = None,
) -> str:
    """Make a block by hand, as a crash leaves one: ``content`` at its start, nobody holds it.

    Made through the platform layer (with the portable backend's lock files),
    never owned by a live handle. Returns its name; remove it with
    :func:`remove_block`.
    """
    name = name if name is not None else new_name()
    system = backend.system_name(name)
    fd = backend.open_block(system, create=True, writable=True)
    try:
        total = max(size, len(content), 1)
        backend.resize(fd, total)
        mapping = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mapping[: len(content)] = content
        finally:
            mapping.close()
        if uid is not None:
            os.fchown(fd, uid, -1)
        if mode is not None:
            os.fchmod(fd, mode)
    except BaseException:
        backend.close_descriptor(fd)
        backend.unlink(system)
        raise
    # The locks take over the descriptor (the portable backend's new OWNER lock too):
    # closing them leaves a block that nobody holds.
    backend.locks(fd, system, writable=True, created=True).close()
    return name


def shield(data: bytearray) -> None:
    """Record a pickled handle in flight since now in the lifetime area of ``data``'s v3 header.

    Other processes' reapers then leave the block alone for their grace
    (60 s); a test that sets the grace to 0 sees a plain orphan.
    """
    _, area = encoded_identity(bytes(data))
    struct.pack_into("<QQ", data, area + _lifetime._TICKETS_AT, 1, backend.shared_clock_ns())


def block_stat(name: str) -> os.stat_result:
    """``fstat`` of the block a user calls ``name`` (its mode, owner and size)."""
    system = backend.system_name(name)
    fd = backend.open_block(system, create=False, writable=False)
    try:
        return backend.fstat(fd)
    finally:
        backend.close_descriptor(fd)


def unlink_from_outside(name: str) -> None:
    """Remove a block's name as a program that does not use this library would.

    ``unlink`` of its file where blocks are files; else ``shm_unlink``, which
    leaves the portable backend's lock files where they are.
    """
    system = backend.system_name(name)
    if backend.directory is not None:
        os.unlink(os.path.join(backend.directory, system))
    else:
        import _posixshmem

        _posixshmem.shm_unlink("/" + system)


def refuse_unlink(patch: pytest.MonkeyPatch, system_name: str) -> None:
    """Make removing block ``system_name`` fail with EPERM, whichever call removes it.

    By system name (``backend.unlink``: the portable backend) or by the path a
    block was opened at (``os.unlink``: the Linux backend's locks).
    """
    by_name, by_path = backend.unlink, os.unlink

    def refuse_by_name(name: str) -> bool:
        if name == system_name:
            raise PermissionError(1, "Operation not permitted")
        return by_name(name)

    def refuse_by_path(path: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(os.fsdecode(path)) == system_name:
            raise PermissionError(1, "Operation not permitted")
        by_path(path)

    patch.setattr(backend, "unlink", refuse_by_name)
    patch.setattr(os, "unlink", refuse_by_path)


def remove_block(name: str) -> None:
    """Unlink the block a user calls ``name`` if it is still there."""
    backend.unlink(backend.system_name(name))


# -- the leak check ----------------------------------------------------------------------


def _held_here(name: str) -> bool:
    """Whether this process still maps ``name`` (a test left a handle or a view open)."""
    return any(hold.name == name and not hold.closed for hold in _lifetime.holds_of_this_process())


def _left_by_us(name: str) -> bool:
    """Whether a block was left behind by this test run (and not by another live process).

    The rule of API.md section 0, asked of the kernel through the reaper: a block
    this process still maps is ours; a block another process maps is not (another
    test run on the machine, or a process that still uses it); a block nobody
    maps is a leak, unless its header names a creator that is another running
    process (someone else's block, for instance one written by hand by a test of
    another run). Non-files named like blocks, and unreadable headers, count as
    ours unless they name another running creator.
    """
    if _held_here(name):
        return True
    judgement = _reaper.judge(name)
    if judgement.verdict is _reaper.Verdict.GONE:
        return False
    if judgement.in_use:
        return False  # another process maps it
    header = judgement.header
    creator = (
        (header.creator_pid, header.creator_start) if header is not None else judgement.raw_creator
    )
    if creator is None:
        return True
    pid, start = creator
    return pid == os.getpid() or not is_alive(pid, start)


def _leaked_since(before: set[str]) -> list[str]:
    return sorted(name for name in library_blocks() - before if _left_by_us(name))


@pytest.fixture
def no_leaked_blocks() -> Iterator[None]:
    """Fail the test if it leaves a block of this library behind."""
    before = library_blocks()
    yield
    deadline = time.monotonic() + LEAK_SETTLE_SECONDS
    leaked = _leaked_since(before)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _leaked_since(before)
    assert not leaked, f"test leaked shared-memory blocks: {leaked}"
