"""Shared test configuration: Hypothesis profiles and a leak check for /dev/shm."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from shared_memory_array import _lifetime, _reaper
from shared_memory_array._block import PREFIX
from shared_memory_array._process import is_alive

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHM_DIR = "/dev/shm"
LEAK_SETTLE_SECONDS = 5.0
"""How long a leak check waits for blocks that are on their way out (the codec frees
released blocks from a collector thread, within about 2 s)."""


def library_blocks() -> set[str]:
    """Names of this library's blocks currently in /dev/shm (empty set elsewhere)."""
    if not os.path.isdir(SHM_DIR):
        return set()
    return {name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)}


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
    """Fail the test if it leaves a block of this library behind in /dev/shm."""
    before = library_blocks()
    yield
    deadline = time.monotonic() + LEAK_SETTLE_SECONDS
    leaked = _leaked_since(before)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _leaked_since(before)
    assert not leaked, f"test leaked shared-memory blocks: {leaked}"
