"""The populate thread: pooled codec blocks mapped in off the hot path, never changed."""

from __future__ import annotations

import gc
import mmap
import resource
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from shared_memory_array import _codec, _lifetime, _populate, read, release, write
from shared_memory_array._block import SharedBlock
from shared_memory_array._platform import backend

TIMEOUT = 60
SHARED = 0  # threshold that sends everything to shared memory
PAGES = 256
ITEMS = 300_000  # float64: 2.4 MB, above _populate.MIN_BYTES
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page tables")


@pytest.fixture(autouse=True)
def _clean(no_leaked_blocks: None) -> Iterator[None]:
    """Unlink what the test wrote and leave no populate thread to the next test."""
    yield
    _codec.writer.drop_all()
    assert _populate.wait_idle(TIMEOUT)


@pytest.fixture
def block() -> Iterator[SharedBlock]:
    """A fresh block of :data:`PAGES` pages and a half, filled with random bytes by ``pwrite``."""
    size = PAGES * mmap.PAGESIZE + mmap.PAGESIZE // 2
    shared = SharedBlock.create(size)
    shared.write_at(0, np.random.default_rng(0).bytes(size))
    yield shared
    shared.unlink()
    shared.close()


def _faults_writing_every_page(view: memoryview) -> int:
    """Minor page faults this thread takes storing one byte into every page (no load first)."""
    rusage = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    pages = np.frombuffer(view, np.uint8)[:: mmap.PAGESIZE]
    before = resource.getrusage(rusage).ru_minflt
    pages[...] = 0x5A  # stores only: a load first would map 16 pages per fault
    return resource.getrusage(rusage).ru_minflt - before


def _populate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == _populate.THREAD_NAME]


def test_prefault_leaves_the_content_unchanged(block: SharedBlock) -> None:
    """Populating a mapping, directly and by the thread, changes none of its bytes."""
    original = bytes(block.buf)
    assert _populate.prefault(block.buf)
    assert bytes(block.buf) == original
    job = _populate.submit(block.buf)
    assert _populate.wait_idle(TIMEOUT)
    assert job.done
    assert job.complete
    assert bytes(block.buf) == original


def test_the_fallback_when_the_kernel_refuses_leaves_the_content_unchanged(
    block: SharedBlock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An advice the kernel refuses (EINVAL) switches to the read fallback, content intact."""
    from shared_memory_array._platform import _linux

    monkeypatch.setattr(_populate, "_madvise_works", backend.can_populate)
    monkeypatch.setattr(_linux, "_MADV_POPULATE_READ", 0x7FFF)  # no such advice: EINVAL
    original = bytes(block.buf)
    assert _populate.prefault(block.buf, mmap.PAGESIZE + 1, 3 * mmap.PAGESIZE)
    assert _populate._madvise_works is False
    assert _populate.prefault(block.buf)
    assert bytes(block.buf) == original


@linux_only
def test_prefault_maps_the_pages_so_writes_take_no_faults(block: SharedBlock) -> None:
    """After populating, storing into every page of the mapping takes (almost) no page fault."""
    fresh = SharedBlock.attach(block.name)  # a new mapping: nothing mapped in yet
    try:
        assert _faults_writing_every_page(fresh.buf) >= PAGES // 2  # the measure can fail
    finally:
        fresh.close()
    gc.collect()
    fresh = SharedBlock.attach(block.name)
    try:
        assert _populate.prefault(fresh.buf)
        assert _faults_writing_every_page(fresh.buf) < PAGES // 8
    finally:
        fresh.close()


def test_a_released_block_is_populated_and_reused_with_the_new_content() -> None:
    """Released, the block is populated in the background; the next write reuses it, correctly."""
    token = write(np.arange(600_000, dtype=np.float64), threshold=SHARED)
    release(token)
    (name,) = _codec.writer.pooled_names()
    assert _populate.wait_idle(TIMEOUT)
    second = write(np.full(500_000, 7.0), threshold=SHARED)
    assert second.split(":")[2] == name
    np.testing.assert_array_equal(read(second), np.full(500_000, 7.0))


class _ParkedThread:
    """Makes the populate thread stop inside its first chunk until :meth:`resume`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inside, self._go = threading.Event(), threading.Event()
        real = _populate.prefault

        def parked(
            view: memoryview, start: int = 0, stop: int | None = None, *, by_reading: bool = False
        ) -> bool:
            if threading.current_thread().name == _populate.THREAD_NAME:
                self.inside.set()
                assert self._go.wait(TIMEOUT)
            return real(view, start, stop, by_reading=by_reading)

        monkeypatch.setattr(_populate, "prefault", parked)
        monkeypatch.setattr(_populate, "CHUNK", mmap.PAGESIZE * 16)  # many chunks

    def resume(self) -> None:
        self._go.set()


def test_a_block_discarded_while_being_populated_is_unmapped_after_the_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Discarding a block mid-populate neither crashes the thread nor leaks the mapping."""
    parked = _ParkedThread(monkeypatch)
    token = write(np.ones(ITEMS), threshold=SHARED)
    release(token)
    (name,) = _codec.writer.pooled_names()
    assert parked.inside.wait(TIMEOUT)
    _codec.writer.empty_pool()  # unlinked and closed while the thread holds a view
    assert name not in _codec.writer.pooled_names()
    parked.resume()
    assert _populate.wait_idle(TIMEOUT)
    gc.collect()
    assert name not in {hold.name for hold in _lifetime.holds_of_this_process()}


def test_a_write_never_waits_for_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that takes a block still being populated proceeds, and stores the right bytes."""
    parked = _ParkedThread(monkeypatch)
    token = write(np.ones(ITEMS), threshold=SHARED)
    release(token)
    assert parked.inside.wait(TIMEOUT)
    tokens: list[str] = []
    writer = threading.Thread(
        target=lambda: tokens.append(write(np.arange(ITEMS * 0.9), threshold=SHARED))
    )
    writer.start()
    writer.join(TIMEOUT)  # would hang if the write waited for the parked thread
    alive = writer.is_alive()
    parked.resume()
    assert not alive
    assert tokens[0].split(":")[2] == token.split(":")[2]  # the block being populated
    np.testing.assert_array_equal(read(tokens[0]), np.arange(ITEMS * 0.9))


def test_no_thread_is_left_once_the_pool_is_empty() -> None:
    """The populate thread exits when the pool empties (and when its jobs are done)."""
    tokens = [write(np.full(ITEMS, float(i)), threshold=SHARED) for i in range(3)]
    for token in tokens:
        release(token)
    assert len(_codec.writer.pooled_names()) == 3
    _codec.writer.empty_pool()
    assert _populate.wait_idle(TIMEOUT)
    assert _populate.idle()
    assert _populate_threads() == []


def test_a_populated_block_is_not_populated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block whose mapping the thread completed is not handed to it again when re-pooled."""
    release(write(np.ones(ITEMS), threshold=SHARED))
    assert _populate.wait_idle(TIMEOUT)
    submitted: list[memoryview] = []
    monkeypatch.setattr(_populate, "submit", lambda view, start=0: submitted.append(view))
    release(write(np.ones(ITEMS), threshold=SHARED))
    assert len(_codec.writer.pooled_names()) == 1
    assert submitted == []


def test_what_the_writer_mapped_itself_is_not_populated_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A block taken before its job ran is mapped by the write, and not queued again."""
    queued: list[int] = []

    def never_run(view: memoryview, start: int = 0) -> _populate.Job:
        queued.append(start)
        return _populate.Job(view, start)  # never handed to the thread

    monkeypatch.setattr(_populate, "submit", never_run)
    release(write(np.ones(ITEMS), threshold=SHARED))
    token = write(np.full(ITEMS, 2.0), threshold=SHARED)  # the writer maps the block itself
    np.testing.assert_array_equal(read(token), np.full(ITEMS, 2.0))
    release(token)
    assert queued == [0]


def test_a_small_block_wakes_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled block smaller than MIN_BYTES is left to the writer: no job, no thread."""
    queued: list[memoryview] = []
    monkeypatch.setattr(_populate, "submit", lambda view, start=0: queued.append(view))
    release(write(np.ones(_populate.MIN_BYTES // 16), threshold=SHARED))
    assert len(_codec.writer.pooled_names()) == 1
    assert queued == []
