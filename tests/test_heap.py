"""Tests of the shared heap allocator (``shared_memory_array._heap``)."""

from __future__ import annotations

import itertools
import mmap

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from shared_memory_array import AllocationError, LayoutError
from shared_memory_array._heap import (
    FIRST_FIT_SCAN,
    MIN_BLOCK,
    Heap,
    block_size_for,
    heap_overhead,
    size_class,
)

REGION_OFFSET = 64


def make_heap(size: int = 1 << 16) -> tuple[Heap, memoryview]:
    mapping = mmap.mmap(-1, REGION_OFFSET + size)
    buf = memoryview(mapping)
    return Heap.format(buf, REGION_OFFSET, size), buf


def test_fresh_heap_is_one_free_block() -> None:
    """A formatted heap is a single free block covering its capacity."""
    heap, _ = make_heap()
    heap.check()
    stats = heap.gc_stats()
    assert stats["total_free_blocks"] == 1
    assert stats["total_free_space"] == heap.capacity
    assert stats["fragmentation"] == 0.0
    assert heap.used == 0


def test_payloads_are_aligned_and_disjoint() -> None:
    """Payloads are 16-byte aligned, at least as large as asked, and do not overlap."""
    heap, buf = make_heap()
    spans = []
    for nbytes in (0, 1, 15, 16, 17, 100, 1000, 5000):
        payload = heap.alloc(nbytes)
        assert payload % 16 == 0
        assert heap.payload_size(payload) >= nbytes
        spans.append((payload, payload + heap.payload_size(payload)))
        buf[payload : payload + nbytes] = b"\xff" * nbytes  # must not damage any tag
    heap.check()
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_free_coalesces_neighbours() -> None:
    """Freeing every block, in any order, gives back one free block of full capacity."""
    heap, _ = make_heap()
    payloads = [heap.alloc(n) for n in (10, 200, 30, 4000, 50, 600)]
    for payload in (payloads[1], payloads[3], payloads[2], payloads[5], payloads[0], payloads[4]):
        heap.free(payload)
        heap.check()
    assert heap.gc_stats()["total_free_blocks"] == 1
    assert heap.gc_stats()["total_free_space"] == heap.capacity


def test_freed_block_is_reused_for_same_size() -> None:
    """A freed block of a size class is handed out again for the same size (O(1) reuse)."""
    heap, _ = make_heap()
    first = heap.alloc(40)
    heap.alloc(40)  # keeps ``first`` from merging with the free remainder
    heap.free(first)
    assert heap.alloc(40) == first


def test_alloc_failure_leaves_heap_unchanged() -> None:
    """An allocation that cannot fit raises AllocationError and changes nothing."""
    heap, buf = make_heap(4096 + heap_overhead())
    heap.alloc(1000)
    before = bytes(buf)
    with pytest.raises(AllocationError) as info:
        heap.alloc(10_000)
    assert isinstance(info.value, MemoryError)
    assert bytes(buf) == before
    heap.check()


def test_double_free_is_rejected() -> None:
    """Freeing a block twice, or an offset that is no payload, raises ValueError."""
    heap, _ = make_heap()
    payload = heap.alloc(100)
    heap.free(payload)
    with pytest.raises(ValueError, match="not an allocated block"):
        heap.free(payload)
    with pytest.raises(ValueError, match="not a payload"):
        heap.free(payload + 8)
    heap.check()


def test_check_detects_damaged_tag() -> None:
    """check() raises LayoutError when a boundary tag was overwritten."""
    heap, buf = make_heap()
    payload = heap.alloc(100)
    buf[payload - 8 : payload] = (12345).to_bytes(8, "little")
    with pytest.raises(LayoutError, match="heap at offset"):
        heap.check()


def test_open_rejects_region_without_heap() -> None:
    """Opening a region that holds no heap of that size raises LayoutError."""
    heap, buf = make_heap()
    with pytest.raises(LayoutError, match="no heap"):
        Heap.open(buf, REGION_OFFSET, heap.size - 64)
    assert Heap.open(buf, REGION_OFFSET, heap.size).capacity == heap.capacity


def test_rebuild_keeps_live_and_reclaims_leaks() -> None:
    """rebuild(live) keeps exactly the live payloads and frees everything else."""
    heap, buf = make_heap()
    payloads = [heap.alloc(n) for n in (100, 200, 300, 400)]
    buf[payloads[2] : payloads[2] + 3] = b"abc"
    rejected = heap.rebuild([payloads[0], payloads[2]])
    assert rejected == []
    heap.check()
    assert heap.gc_stats()["allocated_blocks"] == 2
    assert bytes(buf[payloads[2] : payloads[2] + 3]) == b"abc"
    heap.free(payloads[0])
    heap.free(payloads[2])
    assert heap.gc_stats()["total_free_blocks"] == 1


def test_rebuild_rejects_damaged_payload() -> None:
    """rebuild() refuses a payload whose tags are not intact and frees its space."""
    heap, buf = make_heap()
    good, bad = heap.alloc(100), heap.alloc(100)
    buf[bad - 8 : bad] = (7).to_bytes(8, "little")
    assert heap.rebuild([good, bad, 999_999]) == [bad, 999_999]
    heap.check()
    assert heap.gc_stats()["allocated_blocks"] == 1


def test_size_classes_are_monotonic() -> None:
    """Larger blocks never fall in a smaller size class; small sizes have exact classes."""
    sizes = range(MIN_BLOCK, 1 << 16, 16)
    classes = [size_class(size) for size in sizes]
    assert classes == sorted(classes)
    assert len({size_class(size) for size in range(MIN_BLOCK, 1025, 16)}) == 63
    assert block_size_for(0) == MIN_BLOCK


class HeapMachine(RuleBasedStateMachine):
    """Random alloc/free/rebuild against a model of live blocks; check() after each step."""

    payloads = Bundle("payloads")

    def __init__(self) -> None:
        super().__init__()
        self.heap, self.buf = make_heap(8192 + heap_overhead())
        self.live: dict[int, bytes] = {}

    @rule(target=payloads, nbytes=st.integers(0, 3000), fill=st.binary(min_size=1, max_size=1))
    def alloc(self, nbytes: int, fill: bytes) -> int:
        free_before = self.heap.gc_stats()["total_free_space"]
        try:
            payload = self.heap.alloc(nbytes)
        except AllocationError:
            assert self.heap.gc_stats()["total_free_space"] == free_before
            return -1
        assert payload not in self.live
        data = fill * nbytes
        self.buf[payload : payload + nbytes] = data
        self.live[payload] = data
        return payload

    @rule(payload=consumes(payloads))
    def free(self, payload: int) -> None:
        if payload in self.live:
            del self.live[payload]
            self.heap.free(payload)

    @rule()
    def rebuild(self) -> None:
        assert self.heap.rebuild(list(self.live)) == []

    @invariant()
    def consistent(self) -> None:
        self.heap.check()
        assert self.heap.gc_stats()["allocated_blocks"] == len(self.live)
        for payload, data in self.live.items():
            assert bytes(self.buf[payload : payload + len(data)]) == data


TestHeapMachine = HeapMachine.TestCase


def test_first_fit_scan_never_returns_a_block_too_small() -> None:
    """More too-small free blocks in one class than the first-fit scan reads never yield a
    payload smaller than asked (regression: the unchecked block after the scan was returned)."""
    heap, buf = make_heap(1 << 20)
    assert size_class(block_size_for(1100)) == size_class(block_size_for(1500))
    victims, spacers = [], []
    for _ in range(FIRST_FIT_SCAN + 4):
        victims.append(heap.alloc(1100))
        spacers.append(heap.alloc(16))  # keeps the freed victims from coalescing
    for payload in spacers:
        buf[payload : payload + 16] = b"S" * 16
    for payload in victims:
        heap.free(payload)
    big = heap.alloc(1500)
    assert heap.payload_size(big) >= 1500
    buf[big : big + 1500] = b"\xab" * 1500
    heap.check()
    assert all(bytes(buf[p : p + 16]) == b"S" * 16 for p in spacers)
