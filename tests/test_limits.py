"""Know before allocating: a request that cannot fit raises AllocationError naming the limit.

Issue 19 item 6, API.md section 5: the free space of the shared-memory
filesystem, and inside a container (a cgroup) the memory left to it, are
compared with each request, instead of a later SIGBUS or OOM kill. The real
limits are made here: a small private tmpfs (``unshare -m``) and a cgroup with
a small memory limit (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``), as
root; each test skips with the reason where that is impossible.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import run_in_private_shm

from shared_memory_array._platform import backend

TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    backend.name != "linux", reason="the portable backend cannot read free space or cgroups"
)

_TRY_ALLOCATE = r"""
import sys
import shared_memory_array as sma
nbytes = int(sys.argv[1])
try:
    sma.SharedArray.allocate(nbytes, "uint8").close()
except sma.AllocationError as exc:
    print("refused:", exc)
    sys.exit(3)
try:
    token = sma.write(bytearray(nbytes), threshold=0)
except sma.AllocationError as exc:
    print("refused write:", exc)
    sys.exit(4)
print("allocated")
"""


def _in_a_small_tmpfs(size: str, nbytes: int) -> subprocess.CompletedProcess[str]:
    return run_in_private_shm(
        [sys.executable, "-c", _TRY_ALLOCATE, str(nbytes)], size=size, timeout=TIMEOUT
    )


def test_a_request_larger_than_the_free_space_is_refused_naming_it() -> None:
    """100 MiB in a 64 MiB /dev/shm: AllocationError naming the filesystem and what is free."""
    done = _in_a_small_tmpfs("64m", 100 << 20)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "/dev/shm has only" in done.stdout
    assert "bytes free" in done.stdout


def test_a_request_that_fits_is_allocated() -> None:
    """10 MiB in a 64 MiB /dev/shm: allocated, and a token written."""
    done = _in_a_small_tmpfs("64m", 10 << 20)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "allocated" in done.stdout


def _memory_cgroup() -> tuple[Path, str, str] | None:
    """A fresh child cgroup with a memory controller: (directory, limit file, procs file)."""
    if os.geteuid() != 0:
        return None
    candidates = []
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, controllers, path = line.strip().split(":", 2)
                if "memory" in controllers.split(","):
                    candidates.append((Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "v1"))
                elif controllers == "":
                    candidates.append((Path("/sys/fs/cgroup") / path.lstrip("/"), "v2"))
    except OSError:
        return None
    for parent, version in candidates:
        limit = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        if not (parent / limit).exists() and not (parent / "cgroup.procs").exists():
            continue
        child = parent / f"sma-test-{uuid.uuid4().hex[:8]}"
        try:
            child.mkdir()
        except OSError:
            continue
        if (child / limit).exists():
            return child, limit, "cgroup.procs"
        child.rmdir()
    return None


_IN_CGROUP = r"""
import os, sys
procs, me = sys.argv[1], str(os.getpid())
with open(procs, "w") as f:
    f.write(me)
import shared_memory_array as sma
try:
    sma.SharedArray.allocate(int(sys.argv[2]), "uint8").close()
except sma.AllocationError as exc:
    print("refused:", exc)
    sys.exit(3)
print("allocated")
"""


def test_a_request_beyond_the_container_memory_limit_is_refused_naming_it() -> None:
    """In a cgroup limited to 96 MiB, 200 MiB is refused naming the cgroup limit (no OOM kill)."""
    made = _memory_cgroup()
    if made is None:
        pytest.skip("no writable memory cgroup here (needs root and a memory controller)")
    directory, limit_file, procs_file = made
    try:
        (directory / limit_file).write_text(str(96 << 20))
        done = subprocess.run(
            [sys.executable, "-c", _IN_CGROUP, str(directory / procs_file), str(200 << 20)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 3, (done.stdout, done.stderr)
        assert "memory limit" in done.stdout
        assert str(directory) in done.stdout or "memory" in done.stdout
    finally:
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)
