"""The pickle-5 codec: round trips, read-only views, release and reuse, tokens, processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _children_codec import (
    checksum,
    hold_view,
    read_and_release,
    read_checksum,
    write_one_block,
)
from conftest import library_blocks
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared_memory_array import (
    AllocationError,
    BlockNotFoundError,
    LayoutError,
    SharedArrayError,
    _codec,
    read,
    release,
    write,
)
from shared_memory_array._block import SharedBlock
from shared_memory_array._codec import _tokens
from shared_memory_array._header import BlockKind, encode_header, encoded_identity
from shared_memory_array._identity import shm_identity

TIMEOUT = 60
CHILD = Path(__file__).with_name("_children_codec.py")
SHARED = 0  # threshold that sends everything to shared memory
INLINE = 1 << 40  # threshold that keeps everything inline


@pytest.fixture(autouse=True)
def _unlink_written_blocks(no_leaked_blocks: None) -> Iterator[None]:
    """Unlink the blocks this process wrote (live and pooled) before the leak check."""
    yield
    _codec.writer.drop_all()


def _mode(token: str) -> str:
    return token.split(":")[1]


def _block_name(token: str) -> str:
    return token.split(":")[2]


def _run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _assert_same_array(result: Any, expected: np.ndarray) -> None:
    assert isinstance(result, np.ndarray)
    assert result.dtype == expected.dtype
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)


def _assert_same(result: Any, expected: Any) -> None:
    """Equal values of the same types, recursing into containers and comparing arrays."""
    assert type(result) is type(expected)
    if isinstance(expected, np.ndarray):
        _assert_same_array(result, expected)
    elif isinstance(expected, dict):
        assert result.keys() == expected.keys()
        for key in expected:
            _assert_same(result[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(result) == len(expected)
        for got, want in zip(result, expected, strict=True):
            _assert_same(got, want)
    else:
        assert result == expected


# -- round trips -----------------------------------------------------------------------


ROUND_TRIP_OBJECTS = [
    b"",
    b"abc" * 1000,
    bytearray(b"\x00\xff" * 5000),
    "text ü" * 100,
    None,
    [1, 2.5, {"k": (3, "v")}],
    {"a": np.arange(10), "b": [np.ones((2, 3), "f4"), {"c": np.zeros(0)}]},
]


@pytest.mark.parametrize("threshold", [SHARED, INLINE], ids=["shared", "inline"])
@pytest.mark.parametrize("obj", ROUND_TRIP_OBJECTS, ids=lambda obj: type(obj).__name__)
def test_round_trip_preserves_value_and_type(obj: object, threshold: int) -> None:
    """Plain objects, containers and nested arrays come back equal and of the same types."""
    token = write(obj, threshold=threshold)
    assert _mode(token) in (("s",) if threshold == SHARED else ("i", "f"))
    _assert_same(read(token), obj)


def test_threshold_decides_inline_or_shared_from_the_real_size() -> None:
    """Objects below the threshold travel inline; at or above it they go to shared memory."""
    array = np.zeros(1000, "u1")
    small, large = write(array, threshold=10_000), write(array, threshold=1000)
    assert _mode(small) == "f"
    assert _mode(large) == "s"
    assert _mode(write(b"x" * 100)) == "i"


def _layouts(array: np.ndarray) -> list[np.ndarray]:
    variants = [array, np.asfortranarray(array), array.T]
    if array.ndim:
        variants += [array[::-1], array[::2]]
    return variants


@given(
    hnp.arrays(
        dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.sampled_from([SHARED, INLINE]),
)
def test_arrays_of_any_layout_round_trip(array: np.ndarray, threshold: int) -> None:
    """Arrays of every dtype, C/F/reversed/strided layout and 0-size shape come back equal."""
    for variant in _layouts(array):
        result = read(write(variant, threshold=threshold))
        assert isinstance(result, np.ndarray)
        assert (result.dtype, result.shape) == (variant.dtype, variant.shape)
        np.testing.assert_array_equal(result, variant)
        assert not result.flags.writeable


def test_shared_arrays_are_views_on_the_block_even_when_not_contiguous() -> None:
    """Arrays (contiguous or not) come back as read-only views, not copies owning memory."""
    base = np.arange(60, dtype="f8").reshape(6, 10)
    for array in (base, np.asfortranarray(base), base[::2, 1::3]):
        result = read(write(array, threshold=SHARED))
        assert isinstance(result, np.ndarray)
        assert not result.flags.owndata
        assert not result.flags.writeable
        _assert_same_array(result, array)


def test_object_arrays_round_trip_in_band() -> None:
    """Arrays of Python objects cannot be views; they come back equal through plain pickle."""
    array = np.array([{"a": 1}, None, "x"], dtype=object)
    result = read(write(array, threshold=SHARED))
    assert isinstance(result, np.ndarray)
    assert list(result) == list(array)


@pytest.mark.parametrize("threshold", [SHARED, INLINE], ids=["shared", "inline"])
def test_zero_size_buffers_round_trip(threshold: int) -> None:
    """Empty arrays and empty PickleBuffers next to other buffers keep every offset right."""
    obj: list[Any] = [
        np.zeros((0, 3)),
        pickle.PickleBuffer(b""),
        np.arange(4),
        pickle.PickleBuffer(b"xy"),
    ]
    result = read(write(obj, threshold=threshold))
    assert isinstance(result, list)
    _assert_same_array(result[0], np.zeros((0, 3)))
    assert bytes(result[1]) == b""
    _assert_same_array(result[2], np.arange(4))
    assert bytes(result[3]) == b"xy"


def test_pickle_buffer_comes_back_as_a_flat_memoryview() -> None:
    """A PickleBuffer travels out of band and comes back as a read-only memoryview of its bytes."""
    source = np.arange(6, dtype="i2").reshape(2, 3)
    result = read(write(pickle.PickleBuffer(source.data), threshold=SHARED))
    assert isinstance(result, memoryview)
    assert result.readonly
    assert bytes(result) == source.tobytes()


def test_buffers_beyond_the_cap_travel_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_BUFFERS out-of-band buffers, the rest are pickled in band and still round trip."""
    monkeypatch.setattr(_codec._pickling, "MAX_BUFFERS", 2)
    arrays = [np.full(3, i) for i in range(5)]
    pickled = _codec.pickle_out_of_band(arrays)
    assert len(pickled.buffers) == 2
    result = read(write(arrays, threshold=SHARED))
    assert isinstance(result, list)
    for got, expected in zip(result, arrays, strict=True):
        _assert_same_array(got, expected)


def test_large_pieces_round_trip_through_pwrite_and_reuse() -> None:
    """Pieces of 1 MiB and more (written by pwrite into a new block) round trip, also on reuse."""
    rng = np.random.default_rng(1)
    obj = {"bytes": rng.bytes(3 << 20), "array": rng.random(300_000), "small": np.arange(3)}
    token = write(obj, threshold=SHARED)
    _assert_same(read(token), obj)
    release(token)
    obj2 = {"bytes": rng.bytes(3 << 20), "array": rng.random(300_000), "small": np.arange(3)}
    token2 = write(obj2, threshold=SHARED)
    assert _block_name(token2) == _block_name(token)
    _assert_same(read(token2), obj2)


def test_large_bytes_reach_the_block_without_an_intermediate_stream() -> None:
    """A large bytes payload is handed to the block as its own chunk, not copied into a stream."""
    payload = b"z" * (1 << 20)
    pickled = _codec.pickle_out_of_band({"data": payload})
    assert any(chunk is payload for chunk in pickled.chunks)


# -- read-only enforcement ---------------------------------------------------------------


@pytest.mark.parametrize("threshold", [SHARED, INLINE], ids=["shared", "inline"])
def test_read_only_arrays_cannot_be_made_writable(threshold: int) -> None:
    """With readonly=True, writes fail and setflags(write=True) cannot undo the protection."""
    result = read(write(np.arange(10.0), threshold=threshold))
    assert isinstance(result, np.ndarray)
    with pytest.raises(ValueError, match="read-only"):
        result[0] = 1.0
    with pytest.raises(ValueError, match="WRITEABLE"):
        result.setflags(write=True)


@pytest.mark.parametrize(
    ("threshold", "seen_later"), [(SHARED, 7.0), (INLINE, 0.0)], ids=["shared", "inline"]
)
def test_writable_read(threshold: int, seen_later: float) -> None:
    """readonly=False gives writable arrays: shared ones write through to the block, inline
    ones are private copies."""
    token = write(np.zeros(8), threshold=threshold)
    view = read(token, readonly=False)
    assert isinstance(view, np.ndarray)
    view[3] = 7.0
    again = read(token)
    assert isinstance(again, np.ndarray)
    assert again[3] == seen_later


# -- release and reuse -------------------------------------------------------------------


def test_read_after_release_raises_and_release_twice_is_harmless() -> None:
    """After release the token raises BlockNotFoundError; a second release does nothing."""
    token = write(np.arange(100), threshold=SHARED)
    release(token)
    with pytest.raises(BlockNotFoundError, match="released"):
        read(token)
    release(token)
    with pytest.raises(BlockNotFoundError):
        read(token)


def test_release_of_an_inline_token_is_a_no_op() -> None:
    """Inline tokens have nothing to free: release does nothing and they stay readable."""
    token = write([1, 2, 3])
    release(token)
    assert read(token) == [1, 2, 3]


def test_reuse_never_changes_a_live_view() -> None:
    """Keep a view, release, write again: the view's data is unchanged; the new token is right."""
    first = np.arange(1000, dtype="f8")
    token = write(first, threshold=SHARED)
    view = read(token)
    release(token)
    second_token = write(first * 2, threshold=SHARED)
    assert _block_name(second_token) != _block_name(token)  # still mapped: not reused
    _assert_same_array(view, first)
    _assert_same_array(read(second_token), first * 2)


def test_released_block_is_reused_once_no_view_is_left() -> None:
    """Steady state: after the last view is gone, the next write rewrites the same block."""
    token = write(np.ones(1000), threshold=SHARED)
    view = read(token)
    del view
    release(token)
    second = write(np.full(1000, 2.0), threshold=SHARED)
    assert _block_name(second) == _block_name(token)
    assert second != token  # a new generation
    _assert_same_array(read(second), np.full(1000, 2.0))
    with pytest.raises(BlockNotFoundError, match="released"):
        read(token)
    release(token)  # a stale token: does not touch the new generation
    _assert_same_array(read(second), np.full(1000, 2.0))


def test_pool_is_capped_and_the_rest_is_unlinked() -> None:
    """Released blocks beyond POOL_MAX_BLOCKS are unlinked, not kept."""
    before = library_blocks()
    tokens = [write(np.full(100, i), threshold=SHARED) for i in range(_codec.POOL_MAX_BLOCKS + 3)]
    for token in tokens:
        release(token)
    assert len(_codec.writer.pooled_names()) == _codec.POOL_MAX_BLOCKS
    assert len(library_blocks() - before) == _codec.POOL_MAX_BLOCKS


# -- token format and malformed tokens ----------------------------------------------------


def test_shared_token_is_short_printable_ascii() -> None:
    """A shared-memory token is printable ASCII under 256 characters with prefix and mode."""
    token = write(np.zeros(10), threshold=SHARED)
    assert token.isascii()
    assert token.isprintable()
    assert len(token) < 256
    assert token.startswith("SMA1:s:")


def test_inline_token_is_ascii() -> None:
    """Inline tokens are ASCII too, whatever bytes the pickle holds."""
    token = write(bytes(range(256)))
    assert token.isascii()
    assert token.isprintable()


def _frame(count: int, spans: list[tuple[int, int]], tail: bytes = b"") -> str:
    flat = [value for span in spans for value in span]
    raw = struct.pack(f"<I{len(flat)}Q", count, *flat) + tail
    return _tokens.seal(True, raw)  # a valid checksum: the frame itself is what is wrong


def _token_for(name: str, generation: int = 0, block_id: bytes = bytes(16)) -> str:
    """A well-formed shared-memory token of this host for block ``name``."""
    return _tokens.format_shared(name, generation, block_id, shm_identity())


ZERO_ID = "0" * 32


MALFORMED = {
    "empty": "",
    "no prefix": "hello",
    "prefix only": "SMA1:",
    "unknown mode": "SMA1:x:abcd",
    "bad block name": f"SMA1:s:sma_zz:0:{ZERO_ID}:{'0' * 16}",
    "foreign block name": f"SMA1:s:psm_0123456789abcdef:0:{ZERO_ID}:{'0' * 16}",
    "no generation": f"SMA1:s:sma_0123456789abcdef::{ZERO_ID}:{'0' * 16}",
    "huge generation": f"SMA1:s:sma_0123456789abcdef:{'f' * 17}:{ZERO_ID}:{'0' * 16}",
    "no block id": "SMA1:s:sma_0123456789abcdef:0",
    "short identity": f"SMA1:s:sma_0123456789abcdef:0:{ZERO_ID}:00",
    "odd hex": "SMA1:i:00000000abc",
    "non-hex": "SMA1:i:00000000zz",
    "non-ascii": "SMA1:i:00000000ää",
    "no checksum": "SMA1:i:",
    "bad checksum": "SMA1:i:00000000" + pickle.dumps([1, 2, 3], protocol=5).hex(),
    "garbage pickle": _tokens.seal(False, b"\x80\x05garbage"),
    "truncated pickle": _tokens.seal(False, pickle.dumps([1, 2, 3], protocol=5)[:-3]),
    "empty frame": "SMA1:f:",
    "huge buffer count": _frame(2**32 - 1, []),
    "short table": _frame(3, [(20, 0)]),
    "span outside frame": _frame(0, [(20, 1 << 40)]),
    "span inside table": _frame(0, [(0, 4)]),
}


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_tokens_raise_a_library_error(token: str) -> None:
    """Malformed tokens raise a SharedArrayError subclass, from read and from release alike.

    Inline tokens whose checksum holds release as a no-op (release never unpickles);
    every other malformed token raises from release as it does from read.
    """
    with pytest.raises(SharedArrayError) as read_error:
        read(token)
    assert str(read_error.value)
    intact_inline = token[5:7] in ("i:", "f:")
    if intact_inline:
        try:
            _tokens.unseal(token[7:])
        except LayoutError:
            intact_inline = False
    if intact_inline:
        release(token)
    else:
        with pytest.raises(SharedArrayError):
            release(token)


@pytest.mark.parametrize("token", [None, b"SMA1:i:00", 5])
def test_non_string_tokens_raise_type_error(token: Any) -> None:
    """A token that is not a str is a TypeError for read and release."""
    with pytest.raises(TypeError, match="str"):
        read(token)
    with pytest.raises(TypeError, match="str"):
        release(token)


def test_token_of_a_missing_block_raises_block_not_found_and_releases_quietly() -> None:
    """A well-formed token naming no block raises BlockNotFoundError; release does nothing."""
    token = _token_for("sma_00000000deadbeef")
    with pytest.raises(BlockNotFoundError):
        read(token)
    release(token)


def _codec_block(
    extra: bytes, payload: bytes, *, kind: BlockKind = BlockKind.CODEC
) -> tuple[SharedBlock, str]:
    """A block with the given header extra and payload, held (and owned) by this process."""
    header = encode_header(kind, nbytes=len(payload), extra=extra)
    block = SharedBlock.create(len(header) + len(payload))
    block.buf[: len(header)] = header
    block.buf[len(header) : len(header) + len(payload)] = payload
    return block, _token_for(block.name, 0, encoded_identity(header)[0])


HOSTILE_BLOCKS = {
    "wrong kind": (struct.pack("<IQQ", 0, 64, 0), b"live\0\0\0\0" + bytes(56), BlockKind.ARRAY),
    "bad state word": (struct.pack("<IQQ", 0, 64, 0), b"nonsense" + bytes(56), BlockKind.CODEC),
    "payload too short": (b"", b"live", BlockKind.CODEC),
    "empty table": (b"", b"live\0\0\0\0" + bytes(56), BlockKind.CODEC),
    "count too large": (struct.pack("<I", 10**6), b"live\0\0\0\0" + bytes(56), BlockKind.CODEC),
    "table longer than count": (
        struct.pack("<IQQQ", 0, 64, 0, 0),
        b"live\0\0\0\0" + bytes(56),
        BlockKind.CODEC,
    ),
    "span over state": (struct.pack("<IQQ", 0, 0, 8), b"live\0\0\0\0" + bytes(56), BlockKind.CODEC),
    "span past end": (
        struct.pack("<IQQ", 0, 64, 65),
        b"live\0\0\0\0" + bytes(120),
        BlockKind.CODEC,
    ),
    "garbage stream": (
        struct.pack("<IQQ", 0, 64, 8),
        b"live\0\0\0\0" + bytes(56) + b"\x80\x05\xffjunk\x00",
        BlockKind.CODEC,
    ),
}


@pytest.mark.parametrize("case", HOSTILE_BLOCKS.values(), ids=HOSTILE_BLOCKS.keys())
def test_hostile_codec_blocks_raise_layout_error(case: tuple[bytes, bytes, BlockKind]) -> None:
    """A codec block with a bad table, state word, kind or stream raises LayoutError."""
    extra, payload, kind = case
    block, token = _codec_block(extra, payload, kind=kind)
    try:
        with pytest.raises(LayoutError, match=block.name):
            read(token)
    finally:
        block.unlink()
        block.close()


def test_token_of_a_block_of_another_generation_raises() -> None:
    """A token whose generation differs from the block's names a released object: it raises."""
    token = write(np.zeros(10), threshold=SHARED)
    fields = token.split(":")
    fields[3] = "7"
    with pytest.raises(BlockNotFoundError, match="generation 7"):
        read(":".join(fields))


# -- write errors --------------------------------------------------------------------------


def test_unpicklable_object_raises_and_leaves_no_block() -> None:
    """An unpicklable object raises the pickler's error and creates no block."""
    before = library_blocks()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        write({"data": np.zeros(10), "f": lambda: None}, threshold=SHARED)
    assert library_blocks() == before


def test_allocation_failure_falls_back_inline_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When shared memory cannot be allocated, write warns and returns a working inline token."""

    def full(*args: object, **kwargs: object) -> SharedBlock:
        raise AllocationError("no space left on /dev/shm", 1)

    monkeypatch.setattr(SharedBlock, "create", full)
    with pytest.warns(UserWarning, match="inline"):
        token = write(np.arange(5), threshold=SHARED)
    assert _mode(token) == "f"
    _assert_same_array(read(token), np.arange(5))


@pytest.mark.parametrize(("threshold", "error"), [(-1, ValueError), (1.5, TypeError)])
def test_invalid_threshold_is_rejected(threshold: Any, error: type[Exception]) -> None:
    """A negative or non-integer threshold is rejected before anything is written."""
    with pytest.raises(error, match="threshold"):
        write(b"x", threshold=threshold)


# -- across processes ----------------------------------------------------------------------


def test_reader_in_spawned_child_leaves_the_block_alive() -> None:
    """A spawn child reads the token; its exit neither unlinks the block nor breaks the token."""
    data = {"a": np.arange(1000, dtype="f4"), "b": b"\x01" * 10}
    token = write(data, threshold=SHARED)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        assert pool.apply_async(read_checksum, (token,)).get(TIMEOUT) == checksum(data)
    assert checksum(read(token)) == checksum(data)


def test_child_reader_script_has_empty_stderr() -> None:
    """A child process that only reads prints the data and writes nothing to stderr."""
    token = write(np.arange(10, dtype="f8"), threshold=SHARED)
    done = _run_child("read", token)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == ["ndarray", "45.0"]
    assert checksum(read(token)) == 45.0


def test_multiprocessing_child_writer_exit_frees_its_blocks() -> None:
    """A spawn child that writes and exits normally unlinks its blocks (no atexit there)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=write_one_block, args=(results,))
    child.start()
    token = results.get(timeout=TIMEOUT)
    child.join(TIMEOUT)
    assert child.exitcode == 0
    with pytest.raises(BlockNotFoundError):
        read(token)


def test_writer_exit_frees_its_unreleased_blocks() -> None:
    """When the writing process exits, its blocks are unlinked and its tokens raise."""
    done = _run_child("write", "1000")
    assert (done.returncode, done.stderr) == (0, "")
    token = done.stdout.strip()
    with pytest.raises(BlockNotFoundError):
        read(token)
    assert _block_name(token) not in library_blocks()


def test_release_from_another_process_lets_the_writer_reuse_the_block() -> None:
    """A child reads and releases; the writer then reuses that block for its next write."""
    token = write(np.ones(500), threshold=SHARED)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply_async(read_and_release, (token,)).get(TIMEOUT) == 500.0
    with pytest.raises(BlockNotFoundError):
        read(token)
    again = write(np.zeros(500), threshold=SHARED)
    assert _block_name(again) == _block_name(token)


@contextlib.contextmanager
def _child_holding_view(token: str) -> Iterator[tuple[BaseProcess, Any, Any]]:
    """A spawn child that reads ``token`` and holds the view until the event is set."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    done = context.Event()
    child = context.Process(target=hold_view, args=(token, results, done))
    child.start()
    try:
        yield child, results, done
    finally:
        if child.is_alive():  # Event.set waits for every waiter, a killed one never answers
            done.set()
        child.join(TIMEOUT)
        if child.is_alive():
            child.kill()


def test_view_held_in_another_process_blocks_reuse() -> None:
    """While a child holds a view, a released block is not reused and the child's data stays."""
    data = np.arange(2000, dtype="f8")
    token = write(data, threshold=SHARED)
    with _child_holding_view(token) as (child, results, done):
        assert results.get(timeout=TIMEOUT) == float(data.sum())
        release(token)
        other = write(np.full(2000, -1.0), threshold=SHARED)
        assert _block_name(other) != _block_name(token)
        done.set()
        assert results.get(timeout=TIMEOUT) == float(data.sum())
    assert child.exitcode == 0
    reused = write(np.zeros(2000), threshold=SHARED)  # the child's mapping is gone now
    assert _block_name(reused) == _block_name(token)


def test_sigkilled_reader_does_not_pin_the_block() -> None:
    """A reader killed while holding a view loses its lock with it: the block is reused after."""
    token = write(np.arange(3000, dtype="f8"), threshold=SHARED)
    with _child_holding_view(token) as (child, results, _):
        assert results.get(timeout=TIMEOUT) == float(np.arange(3000).sum())
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    release(token)
    assert _block_name(write(np.zeros(3000), threshold=SHARED)) == _block_name(token)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_does_not_reuse_the_parents_blocks() -> None:
    """A forked child has no pool: it never rewrites the parent's blocks, and unlinks its own."""
    token = write(np.ones(100), threshold=SHARED)
    release(token)
    results: multiprocessing.Queue[str] = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=write_one_block, args=(results,))
    child.start()
    child_token = results.get(timeout=TIMEOUT)
    child.join(TIMEOUT)
    assert child.exitcode == 0
    assert _block_name(child_token) != _block_name(token)
    assert _codec.writer.pooled_names() == [_block_name(token)]
    with pytest.raises(BlockNotFoundError):  # the child's exit unlinked its own block
        read(child_token)
