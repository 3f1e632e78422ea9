"""Shared test configuration: Hypothesis profiles and a leak check for /dev/shm."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from shared_memory_array._block import PREFIX

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


@pytest.fixture
def no_leaked_blocks() -> Iterator[None]:
    """Fail the test if it leaves a block of this library behind in /dev/shm."""
    before = library_blocks()
    yield
    leaked = library_blocks() - before
    assert not leaked, f"test leaked shared-memory blocks: {sorted(leaked)}"
