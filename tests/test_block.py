"""The named-block layer: create, attach, close, unlink, permissions and lifetimes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import block_stat, needs

from shared_memory_array import (
    AllocationError,
    BlockExistsError,
    BlockNotFoundError,
    SharedArrayError,
)
from shared_memory_array._block import PREFIX, SharedBlock, normalize_name, unlink_block
from shared_memory_array._reaper import exit_hook

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


@pytest.fixture
def block() -> Iterator[SharedBlock]:
    """A fresh 4 KiB block, unlinked after the test."""
    created = SharedBlock.create(4096)
    yield created
    created.close()
    created.unlink()


def test_create_makes_owner_only_block_with_library_prefix(block: SharedBlock) -> None:
    """A created block is a 0600 file named with the library prefix, short enough for macOS."""
    info = block_stat(block.name)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert block.name.startswith(PREFIX)
    assert len("/" + block.name) <= 30
    assert info.st_size == 4096


def test_created_block_is_zero_filled_and_writes_are_shared(block: SharedBlock) -> None:
    """A second mapping of the same name sees the creator's zero fill and its writes."""
    other = SharedBlock.attach(block.name)
    try:
        assert bytes(other.buf[:16]) == bytes(16)
        block.buf[:5] = b"hello"
        assert bytes(other.buf[:5]) == b"hello"
        assert other.size == block.size
    finally:
        other.close()


def test_attach_missing_block_raises_block_not_found() -> None:
    """Attaching a name that does not exist raises BlockNotFoundError, also a KeyError."""
    with pytest.raises(BlockNotFoundError, match="does not exist") as info:
        SharedBlock.attach(PREFIX + "0" * 16)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, SharedArrayError)
    assert info.value.name == PREFIX + "0" * 16


@pytest.mark.parametrize("bad", ["", "/", "a/b", "x\x00y", "n" * 300])
def test_malformed_names_are_rejected_clearly(bad: str) -> None:
    """Names that cannot name a block raise BlockNotFoundError naming the problem."""
    with pytest.raises(BlockNotFoundError, match="not a valid"):
        SharedBlock.attach(bad)


def test_non_string_name_is_a_type_error() -> None:
    """A name that is not a str raises TypeError, not a confusing OSError."""
    with pytest.raises(TypeError, match="must be a str"):
        normalize_name(b"sma_x")


def test_leading_slash_is_accepted_and_stripped(block: SharedBlock) -> None:
    """The POSIX spelling with a leading slash attaches to the same block."""
    other = SharedBlock.attach("/" + block.name)
    try:
        assert other.name == block.name
    finally:
        other.close()


def test_explicit_existing_name_is_not_silently_attached(block: SharedBlock) -> None:
    """Creating a block under an existing name raises BlockExistsError, a FileExistsError."""
    with pytest.raises(BlockExistsError):
        SharedBlock.create(64, name=block.name)


def test_views_outlive_close_and_unlink() -> None:
    """A numpy view of a block stays readable and writable after close() and unlink()."""
    created = SharedBlock.create(4096)
    view = np.frombuffer(created.buf, dtype=np.int64)
    created.close()
    created.unlink()
    view[:] = 7
    assert int(view.sum()) == 7 * 512
    assert created.closed


def test_close_and_unlink_are_idempotent() -> None:
    """close() and unlink() may be called any number of times."""
    created = SharedBlock.create(64)
    created.close()
    created.close()
    created.unlink()
    created.unlink()
    assert unlink_block(created.name) is False
    with pytest.raises(ValueError, match="closed"):
        _ = created.buf


def test_unlinked_block_cannot_be_attached_but_mapping_survives(block: SharedBlock) -> None:
    """After unlink no process can attach by name, while existing mappings keep working."""
    other = SharedBlock.attach(block.name)
    block.unlink()
    try:
        with pytest.raises(BlockNotFoundError):
            SharedBlock.attach(block.name)
        other.buf[0] = 9
        assert block.buf[0] == 9
    finally:
        other.close()


def test_readonly_attach_refuses_writes(block: SharedBlock) -> None:
    """A read-only mapping cannot be written through."""
    reader = SharedBlock.attach(block.name, readonly=True)
    try:
        assert reader.buf.readonly
        with pytest.raises(TypeError):
            reader.buf[0] = 1
    finally:
        reader.close()


@needs("free_space")
def test_block_larger_than_dev_shm_raises_allocation_error() -> None:
    """A block that cannot fit in /dev/shm fails at once with AllocationError, leaving nothing."""
    fs = os.statvfs("/dev/shm")
    if fs.f_blocks == 0:
        pytest.skip("/dev/shm has no size limit here")
    too_big = fs.f_blocks * fs.f_frsize + (1 << 30)
    with pytest.raises(AllocationError, match="bytes free") as info:
        SharedBlock.create(too_big)
    assert isinstance(info.value, MemoryError)
    assert info.value.requested == too_big


def test_forked_child_exit_does_not_unlink_parent_blocks(block: SharedBlock) -> None:
    """The exit hook a forked child runs (let go of everything, reap) leaves its parent's blocks."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        exit_hook.run()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    other = SharedBlock.attach(block.name)
    other.close()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_owner_process_exit_unlinks_its_blocks() -> None:
    """Blocks a process created, kept and did not unlink are unlinked when it exits normally."""
    done = _run(
        """
        from shared_memory_array._block import SharedBlock
        from shared_memory_array._header import BlockKind, encode_header
        block = SharedBlock.create(4096)
        header = encode_header(BlockKind.CODEC, nbytes=0)
        block.buf[: len(header)] = header
        print(block.name)
        """
    )
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip()
    assert name.startswith(PREFIX)
    with pytest.raises(BlockNotFoundError):
        SharedBlock.attach(name)


def test_attaching_process_exit_leaves_block_and_prints_nothing(block: SharedBlock) -> None:
    """A process that attaches, writes and exits neither unlinks the block nor warns."""
    done = _run(
        f"""
        from shared_memory_array._block import SharedBlock
        b = SharedBlock.attach({block.name!r})
        b.buf[:4] = b"done"
        """
    )
    assert done.returncode == 0
    assert done.stderr == ""
    assert bytes(block.buf[:4]) == b"done"
    again = SharedBlock.attach(block.name)
    again.close()
