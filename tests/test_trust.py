"""Only your own blocks, and exhaustion as a named error (API.md sections 0, 2 and 6).

Another user's block, a block others may write, a sparse block that would SIGBUS its
reader, symlinks and odd names, exhausted descriptors and inodes, and damaged tokens:
each gets a named exception of the library, and nothing that was there is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import needs, remove_block
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_memory_array import (
    AllocationError,
    BlockNotFoundError,
    LayoutError,
    SharedArray,
    SharedArrayError,
    SharedData,
    SharedDict,
    UntrustedBlockError,
    read,
    release,
    write,
)
from shared_memory_array._block import PREFIX, SharedBlock, new_name
from shared_memory_array._header import BlockKind, encode_header
from shared_memory_array._platform import backend

SHM = "/dev/shm"
TIMEOUT = 60
HERE = Path(__file__).parent
linux_only = pytest.mark.skipif(not os.path.isdir(SHM), reason="needs /dev/shm (Linux)")
root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (to create another user's file)"
)

pytestmark = [linux_only, pytest.mark.usefixtures("no_leaked_blocks")]


def _array_header() -> bytes:
    return encode_header(BlockKind.ARRAY, dtype=np.dtype("f8"), shape=(4,), strides=(8,), nbytes=32)


@pytest.fixture
def planted() -> Iterator[Path]:
    """A path in /dev/shm named like a block, removed after the test whatever it became."""
    path = Path(SHM) / new_name()
    yield path
    if path.is_symlink() or path.is_file():
        path.unlink()
    remove_block(path.name)  # what the platform keeps beside it (lock files)


def _plant(path: Path, content: bytes, *, mode: int = 0o600, size: int | None = None) -> None:
    """Make a block through the platform layer (nobody holds it), then shape its file by hand."""
    fd = backend.open_block(path.name, create=True, writable=True)
    backend.locks(fd, path.name, writable=True, created=True).close()
    fd = os.open(path, os.O_RDWR)
    try:
        os.fchmod(fd, mode)  # the umask must not soften the mode under test
        os.ftruncate(fd, size if size is not None else len(content))
        if size is None:
            os.posix_fallocate(fd, 0, len(content))
        os.pwrite(fd, content, 0)
    finally:
        os.close(fd)


@root_only
def test_another_users_block_is_refused_by_every_reader(planted: Path) -> None:
    """A valid block owned by uid 65534 raises UntrustedBlockError from every entry point."""
    _plant(planted, _array_header() + bytes(32))
    os.chown(planted, 65534, 65534)
    name = planted.name
    with pytest.raises(UntrustedBlockError, match="uid 65534"):
        SharedArray.attach(name)
    with pytest.raises(UntrustedBlockError):
        SharedData.load(name)
    with pytest.raises(UntrustedBlockError):
        SharedDict.attach(name)
    assert planted.exists()  # refused, not removed


def test_a_block_writable_by_others_is_refused(planted: Path) -> None:
    """Mode 0666 means anyone could have written the header or the pickle: refused."""
    _plant(planted, _array_header() + bytes(32), mode=0o666)
    with pytest.raises(UntrustedBlockError, match="writable by group or others"):
        SharedArray.attach(planted.name)
    with pytest.raises(PermissionError):  # UntrustedBlockError is a PermissionError too
        SharedData.load(planted.name)


def test_untrusted_check_is_on_the_descriptor(planted: Path) -> None:
    """The mode is read from the opened file: a trusted name swapped for another file is caught."""
    _plant(planted, _array_header() + bytes(32), mode=0o600)
    trusted = SharedArray.attach(planted.name)  # trusted as it is (and now held)
    os.chmod(planted, 0o620)
    try:
        with pytest.raises(UntrustedBlockError):
            SharedArray.attach(planted.name)
    finally:
        trusted.close()


@needs("reserved_pages")
def test_a_sparse_block_is_refused_before_it_can_sigbus(planted: Path) -> None:
    """A valid header over unreserved pages (a hole bigger than /dev/shm) raises LayoutError."""
    header = encode_header(
        BlockKind.ARRAY, dtype=np.dtype("u1"), shape=(1 << 40,), strides=(1,), nbytes=1 << 40
    )
    _plant(planted, header, size=len(header) + (1 << 40))
    with pytest.raises(LayoutError, match="SIGBUS"):
        SharedArray.attach(planted.name)


def test_a_symlink_named_like_a_block_is_not_a_block(planted: Path, tmp_path: Path) -> None:
    """A symlink gives BlockNotFoundError from attach, read and load, never a raw ELOOP."""
    target = tmp_path / "target"
    target.write_bytes(_array_header() + bytes(32))
    planted.symlink_to(target)
    with pytest.raises(BlockNotFoundError, match="symbolic link"):
        SharedArray.attach(planted.name)
    with pytest.raises(BlockNotFoundError):
        SharedData.load(planted.name)


@pytest.mark.parametrize(
    "name",
    ["sma_\udcff", "sma_" + "é" * 200, "sma_" + "x" * 300, "", "a/b", "sma_\x00"],
    ids=["lone surrogate", "200 non-ascii", "too long", "empty", "slash", "nul"],
)
def test_impossible_names_raise_block_not_found(name: str) -> None:
    """Names no block can have raise BlockNotFoundError, not UnicodeEncodeError or ENAMETOOLONG."""
    with pytest.raises(BlockNotFoundError):
        SharedArray.attach(name)
    with pytest.raises(BlockNotFoundError):
        SharedData.load(name)


def test_create_of_a_name_in_use_raises_block_exists_and_keeps_the_first() -> None:
    """SharedDict.create of an existing name: BlockExistsError (a FileExistsError); data kept."""
    from shared_memory_array import BlockExistsError

    name = "trust_" + new_name("")
    with SharedDict.create(name, max_items=8, heap_size=1 << 16) as first:
        first["k"] = "v"
        with pytest.raises(BlockExistsError):
            SharedDict.create(name, max_items=8, heap_size=1 << 16)
        with pytest.raises(FileExistsError):
            SharedDict.create(name, max_items=8, heap_size=1 << 16)
        assert first["k"] == "v"


def _run(code: str, *, env: dict[str, str] | None = None) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_out_of_descriptors_is_an_allocation_error_and_write_falls_back() -> None:
    """No descriptor left: AllocationError from every creator; write falls back to inline."""
    result = _run(
        """
        import json, resource, warnings
        import numpy as np
        from shared_memory_array import AllocationError, SharedArray, SharedData, SharedDict
        from shared_memory_array import read, write
        out = {}
        keep = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        try:
            while True:
                keep.append(open("/dev/null"))
        except OSError:
            pass
        for label, call in [
            ("allocate", lambda: SharedArray.allocate(None, 10, "f8")),
            ("dict", lambda: SharedDict.create("emfile_probe", max_items=4, heap_size=4096)),
            ("shared_data", lambda: SharedData(np.ones(10)).__enter__()),
        ]:
            try:
                call()
                out[label] = "no error"
            except AllocationError as exc:
                out[label] = "AllocationError: " + str(exc)
            except Exception as exc:
                out[label] = type(exc).__name__
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            token = write(np.arange(1000), threshold=0)
        out["token_mode"] = token[5]
        out["warned"] = [str(w.message) for w in caught]
        out["read_back"] = int(read(token).sum())
        for f in keep:
            f.close()
        print(json.dumps(out))
        """
    )
    for label in ("allocate", "dict"):
        assert str(result[label]).startswith("AllocationError"), result
        assert "file descriptor" in str(result[label])
    assert str(result["shared_data"]).startswith("AllocationError"), result
    assert result["token_mode"] in ("i", "f")  # inline: a pickle, or a frame with buffers
    assert result["warned"]
    assert "inline" in str(result["warned"])
    assert result["read_back"] == sum(range(1000))


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare"
)
def test_out_of_inodes_in_a_private_dev_shm_is_an_allocation_error() -> None:
    """A private /dev/shm (unshare -m, tmpfs with 8 inodes): AllocationError, then inline tokens."""
    code = textwrap.dedent(
        """
        import json, warnings
        import numpy as np
        from shared_memory_array import AllocationError, SharedArray, read, write
        out = {"made": 0}
        keep = []
        try:
            for _ in range(100):
                keep.append(SharedArray.allocate(None, 10, "f8"))
                out["made"] += 1
            out["error"] = "none"
        except AllocationError as exc:
            out["error"] = "AllocationError: " + str(exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            token = write(np.arange(100), threshold=0)
        out["token_mode"] = token[5]
        out["read_back"] = int(read(token).sum())
        print(json.dumps(out))
        """
    )
    script = (
        "mount -t tmpfs -o size=16m,nr_inodes=8,mode=1777 tmpfs /dev/shm && "
        f'exec {sys.executable} -c "$0"'
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=HERE,
    )
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot mount a private /dev/shm here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(result["error"]).startswith("AllocationError"), result
    assert 0 < int(result["made"]) < 100
    assert result["token_mode"] in ("i", "f")
    assert result["read_back"] == sum(range(100))


def test_release_of_a_malformed_inline_token_raises_like_read() -> None:
    """release('SMA1:i:abc') raises LayoutError, as read does."""
    with pytest.raises(LayoutError):
        read("SMA1:i:abc")
    with pytest.raises(LayoutError):
        release("SMA1:i:abc")


_FUZZ_CHILD = """
import sys, json
from shared_memory_array import SharedArrayError, read
results = []
for token in json.loads(sys.stdin.read()):
    try:
        read(token)
        results.append("ok")
    except SharedArrayError as exc:
        results.append(type(exc).__name__)
    except Exception as exc:
        results.append("RAW " + type(exc).__name__ + ": " + str(exc)[:100])
print(json.dumps(results))
"""


def _damage(token: str, data: st.DataObject) -> str:
    kind = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    body_start = 7  # after "SMA1:i:" / "SMA1:f:"
    at = data.draw(st.integers(body_start, len(token) - 1))
    chars = st.characters(codec="ascii")
    if kind == "flip":
        new = data.draw(chars.filter(lambda c: c != token[at]))
        return token[:at] + new + token[at + 1 :]
    if kind == "insert":
        return token[:at] + data.draw(st.text(chars, min_size=1, max_size=3)) + token[at:]
    return token[:at] + token[at + 1 :]


@settings(max_examples=12, deadline=None)
@given(st.data())
def test_damaged_inline_tokens_never_reach_the_unpickler(data: st.DataObject) -> None:
    """Any byte flipped, inserted or deleted in an inline token: a SharedArrayError, no crash."""
    objects = [
        {"a": np.arange(5, dtype=np.float32), "b": "text"},
        [np.dtype([("x", "<i4"), ("y", "<f8")]), (1, 2.5)],
        np.zeros((2, 3), dtype="M8[s]"),
    ]
    tokens = [write(obj) for obj in objects]
    damaged = [_damage(token, data) for token in tokens for _ in range(5)]
    done = subprocess.run(
        [sys.executable, "-c", _FUZZ_CHILD],
        input=json.dumps(damaged),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"reader died ({done.returncode}): {done.stderr[-2000:]}"
    outcomes = json.loads(done.stdout)
    raw = [outcome for outcome in outcomes if outcome.startswith("RAW")]
    assert not raw, raw
    assert any(outcome != "ok" for outcome in outcomes)


def test_block_not_found_is_a_file_not_found_error() -> None:
    """A missing block is a FileNotFoundError too (and a KeyError), with errno ENOENT."""
    with pytest.raises(FileNotFoundError) as info:
        SharedArray.attach(PREFIX + "0" * 16)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, SharedArrayError)
    assert info.value.errno == 2


@pytest.mark.parametrize("bad", [(10, -5), (-1,)])
def test_allocate_unsafe_with_a_negative_dimension_raises_a_clear_error(
    bad: tuple[int, ...],
) -> None:
    """allocate_unsafe skips validation, never safety: no struct.error, a ValueError."""
    with pytest.raises(ValueError, match="negative"):
        SharedArray.allocate_unsafe(None, bad, "f8")


@needs("free_space")
def test_allocation_error_from_full_dev_shm_leaves_no_block() -> None:
    """A block too big for /dev/shm raises AllocationError and leaves nothing behind."""
    fs = os.statvfs(SHM)
    with pytest.raises(AllocationError):
        SharedBlock.create(fs.f_blocks * fs.f_frsize + (1 << 30))


def test_release_of_a_damaged_copy_of_a_token_just_read_still_raises() -> None:
    """The shortcut for the token just read never covers another token: a damaged copy raises."""
    token = write({"a": 1, "b": "x" * 100})
    assert read(token) == {"a": 1, "b": "x" * 100}
    damaged = token[:-1] + ("0" if token[-1] != "0" else "1")
    with pytest.raises(LayoutError, match="damaged"):
        release(damaged)
    release(token)  # the real one releases quietly
