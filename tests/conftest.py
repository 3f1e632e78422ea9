"""Shared test configuration: Hypothesis profiles and a leak check for /dev/shm."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from shared_memory_array._block import PREFIX
from shared_memory_array._header import peek_creator
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


def library_blocks() -> set[str]:
    """Names of this library's blocks currently in /dev/shm (empty set elsewhere)."""
    if not os.path.isdir(SHM_DIR):
        return set()
    return {name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)}


def _left_by_us(name: str) -> bool:
    """Whether a block was left by this process or by a dead one (its children included).

    Blocks of other live processes (another test run on the machine) are not ours.
    A block without a readable header counts as ours.
    """
    try:
        # O_NONBLOCK: hostile-input tests put FIFOs named like blocks in /dev/shm.
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False  # gone meanwhile
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        creator = peek_creator(os.pread(fd, 128, 0))
    finally:
        os.close(fd)
    if creator is None:
        return True
    pid, start = creator
    return pid == os.getpid() or not is_alive(pid, start)


@pytest.fixture
def no_leaked_blocks() -> Iterator[None]:
    """Fail the test if it leaves a block of this library behind in /dev/shm."""
    before = library_blocks()
    yield
    leaked = sorted(name for name in library_blocks() - before if _left_by_us(name))
    assert not leaked, f"test leaked shared-memory blocks: {leaked}"
