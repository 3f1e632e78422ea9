"""A variable-size allocator living entirely inside a region of a shared block.

Every process that maps the block sees the same heap: all bookkeeping is in the
region itself, addressed as little-endian 64-bit words. Any block kind can put a
heap in a region of its block; the dict does.

Layout of the region (offsets relative to its start, which is 8-aligned)
------------------------------------------------------------------------
* Words 0-7, the meta: magic ``b"SMAHEAP1"``, region size, the *limit* (bytes
  of the region in use, see below; 0 means all of it), number of free blocks,
  bytes in free blocks, number of allocated blocks, and two words of bitmap
  (bit ``c`` set when free list ``c`` is not empty).
* Words 8 to 8 + :data:`NUM_CLASSES`: the heads of the segregated free lists
  (offsets in ``buf``; 0 ends a list).
* A prologue tag, the blocks, and an epilogue tag just below the limit. Each block is a multiple of
  16 bytes (at least 32) and carries a boundary tag, ``size | 1`` when
  allocated or ``size`` when free, in its first word (header) and its last word
  (footer); the payload starts after the header, 16-byte aligned. A free block
  keeps the next and previous links of its list in its first two payload words.
  The prologue and epilogue are tags of "allocated, size 0", so every real
  block has tagged neighbours on both sides.

Size classes: exact classes of 16-byte steps for blocks up to 1 KiB (0 to 62),
then one class per power of two. ``alloc`` takes the head of the exact class in
O(1), else the first block of the next non-empty class found through the bitmap
(one bit scan); only the power-of-two classes do a short first-fit scan (at most
:data:`FIRST_FIT_SCAN` blocks) of their own list. ``free`` merges the block with
free neighbours found through the boundary tags, in O(1).

Offsets are those of ``buf``. A kind that hands the heap a view of its region
alone (``offset`` 0) gets offsets relative to the region, which stay valid when
the region's bytes are copied into another block (how a dict grows).

The limit
---------
Only the first ``limit`` bytes of the region are in use: blocks, tags and the
epilogue lie below it, and nothing beyond it is ever read or written. The
owner of the region reserves pages up to the limit before it raises it
(:meth:`Heap.extend`): memory is taken as it is needed, not when the region is
laid out.

The heap is not safe against a process dying inside ``alloc``/``free``: the
caller serialises calls with a lock and, after a crash, calls :meth:`Heap.rebuild`
with the payloads still in use, which rewrites every tag and list from that set.
An allocation failure leaves the heap untouched.

Where the accelerator is used (:mod:`._accel`), ``alloc``, ``free`` and ``extend`` run
the very same steps in C: the same stores to the same words, in the same order.
"""

from __future__ import annotations

from typing import Final

from . import _accel
from .errors import HeapFullError, LayoutError

__all__ = ["MIN_BLOCK", "NUM_CLASSES", "Heap", "heap_overhead"]

MAGIC: Final = int.from_bytes(b"SMAHEAP1", "little")
NUM_CLASSES: Final = 96
MIN_BLOCK: Final = 32
GRANULE: Final = 16
TAG_BYTES: Final = 16  # header + footer
FIRST_FIT_SCAN: Final = 16
_META_WORDS: Final = 8
_HEADS: Final = _META_WORDS  # word index of the first list head, relative to the region
(_MAGIC, _SIZE, _LIMIT, _FREE_BLOCKS, _FREE_BYTES, _ALLOCATED, _BITMAP_LOW, _BITMAP_HIGH) = range(8)
_ALLOCATED_BIT: Final = 1
_SIZE_MASK: Final = ~(GRANULE - 1)
_WORD_MASK: Final = (1 << 64) - 1


if _accel.lib is not None:
    _native_heap_alloc = _accel.lib.heap_alloc
    _native_heap_free = _accel.lib.heap_free
    _native_heap_extend = _accel.lib.heap_extend


def size_class(size: int) -> int:
    """Return the free-list class of a block of ``size`` bytes (a multiple of 16)."""
    if size <= 1024:
        return (size >> 4) - 2
    return 52 + size.bit_length()


def heap_overhead() -> int:
    """Bytes of a region that bookkeeping takes (meta, list heads, tags, alignment)."""
    return 8 * (_META_WORDS + NUM_CLASSES) + 2 * GRANULE


def block_size_for(nbytes: int) -> int:
    """Return the size of the block that holds a payload of ``nbytes``."""
    need = (nbytes + TAG_BYTES + GRANULE - 1) & _SIZE_MASK
    return need if need >= MIN_BLOCK else MIN_BLOCK


class Heap:
    """The allocator over ``buf[offset : offset + size]``.

    Offsets taken and returned are absolute in ``buf``. Use :meth:`format` to
    lay out a new heap, :meth:`open` for an existing one.

    Parameters
    ----------
    buf
        The whole block (a writable byte memoryview).
    offset
        Start of the region, a multiple of 8.
    size
        Bytes of the region.
    """

    __slots__ = (
        "_address",
        "_base",
        "_end_block",
        "_first_block",
        "_heads",
        "_words",
        "offset",
        "size",
    )

    def __init__(self, buf: memoryview, offset: int, size: int, limit: int = 0) -> None:
        if offset % 8 or offset < 0 or size < heap_overhead() + MIN_BLOCK:
            raise LayoutError(f"invalid heap region: offset {offset}, size {size}")
        if offset + size > len(buf):
            raise LayoutError(
                f"heap region [{offset}, {offset + size}) exceeds the {len(buf)}-byte block"
            )
        self.offset = offset
        self.size = size
        self._words = buf[: len(buf) & ~7].cast("Q")
        # The words' address for the accelerator (0: the pure-Python path); _words keeps it.
        self._address = _accel.address_of(self._words) if _accel.lib is not None else 0
        self._base = offset >> 3
        self._heads = self._base + _HEADS
        # Blocks start 8 bytes before a 16-byte boundary, so payloads are 16-aligned.
        meta_end = offset + 8 * (_META_WORDS + NUM_CLASSES)
        first = meta_end + 8  # past the prologue tag
        self._first_block = first + (8 - first) % GRANULE
        self._end_block = self._end_for(limit or size)
        if self._end_block - self._first_block < MIN_BLOCK:
            raise LayoutError(f"heap region of {size} bytes (limit {limit}) is too small")

    def _end_for(self, limit: int) -> int:
        """Where the epilogue goes for a limit (blocks end there)."""
        end = self.offset + min(limit, self.size) - 8  # room for the epilogue tag
        return end - (end - 8) % GRANULE

    @classmethod
    def format(cls, buf: memoryview, offset: int, size: int, limit: int = 0) -> Heap:
        """Lay out an empty heap in the region (one free block up to ``limit``) and return it."""
        heap = cls(buf, offset, size, limit)
        words, base = heap._words, heap._base
        for index in range(base, heap._heads + NUM_CLASSES):
            words[index] = 0
        words[base + _MAGIC] = MAGIC
        words[base + _SIZE] = size
        words[base + _LIMIT] = limit if limit and limit < size else 0
        heap._reset_blocks()
        return heap

    @classmethod
    def open(cls, buf: memoryview, offset: int, size: int) -> Heap:
        """Return the heap already laid out in the region.

        Raises
        ------
        LayoutError
            The region does not start with a heap of this size.
        """
        words = buf[: len(buf) & ~7].cast("Q") if offset + 24 <= len(buf) else None
        if words is None:
            raise LayoutError(f"no heap at offset {offset} of a {len(buf)}-byte block")
        at = offset >> 3
        magic, recorded, limit = words[at + _MAGIC], words[at + _SIZE], words[at + _LIMIT]
        words.release()
        if magic != MAGIC or recorded != size:
            raise LayoutError(
                f"no heap of {size} bytes at offset {offset} "
                f"(magic {magic:#018x}, recorded size {recorded})"
            )
        if limit > size:
            raise LayoutError(f"heap at offset {offset}: limit {limit} beyond its {size} bytes")
        return cls(buf, offset, size, int(limit))

    # -- internals --------------------------------------------------------------------

    def _reset_blocks(self) -> None:
        """Empty every list and turn the whole region into one free block."""
        self._reset_lists()
        self._insert(self._first_block, self._end_block - self._first_block)

    def _reset_lists(self) -> None:
        """Empty every list, zero the counters, rewrite prologue and epilogue."""
        words, base = self._words, self._base
        for index in range(self._heads, self._heads + NUM_CLASSES):
            words[index] = 0
        for field in (_FREE_BLOCKS, _FREE_BYTES, _ALLOCATED, _BITMAP_LOW, _BITMAP_HIGH):
            words[base + field] = 0
        words[(self._first_block - 8) >> 3] = _ALLOCATED_BIT  # prologue
        words[self._end_block >> 3] = _ALLOCATED_BIT  # epilogue

    def _insert(self, block: int, size: int) -> None:
        """Tag ``block`` free and push it on its list."""
        words = self._words
        at = block >> 3
        words[at] = size
        words[at + (size >> 3) - 1] = size
        klass = (size >> 4) - 2 if size <= 1024 else 52 + size.bit_length()
        head_index = self._heads + klass
        head = words[head_index]
        words[at + 1] = head
        words[at + 2] = 0
        base = self._base
        if head:
            words[(head >> 3) + 2] = block
        elif klass < 64:
            words[base + _BITMAP_LOW] |= 1 << klass
        else:
            words[base + _BITMAP_HIGH] |= 1 << (klass - 64)
        words[head_index] = block
        words[base + _FREE_BLOCKS] += 1
        words[base + _FREE_BYTES] += size

    def _unlink(self, block: int, size: int) -> None:
        """Take the free ``block`` off its list."""
        words = self._words
        at = block >> 3
        following = words[at + 1]
        previous = words[at + 2]
        base = self._base
        if previous:
            words[(previous >> 3) + 1] = following
        else:
            klass = (size >> 4) - 2 if size <= 1024 else 52 + size.bit_length()
            words[self._heads + klass] = following
            if not following:
                if klass < 64:
                    words[base + _BITMAP_LOW] &= ~(1 << klass) & _WORD_MASK
                else:
                    words[base + _BITMAP_HIGH] &= ~(1 << (klass - 64)) & _WORD_MASK
        if following:
            words[(following >> 3) + 2] = previous
        words[base + _FREE_BLOCKS] -= 1
        words[base + _FREE_BYTES] -= size

    def _first_fit(self, need: int, klass: int) -> int:
        """Return a block of at least ``need`` bytes from power-of-two class ``klass``, or 0."""
        if klass >= NUM_CLASSES:
            return 0
        words = self._words
        block = words[self._heads + klass]
        for _ in range(FIRST_FIT_SCAN):
            if not block or words[block >> 3] >= need:
                return block
            block = words[(block >> 3) + 1]
        return 0

    # -- public surface -----------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Reserve ``nbytes`` and return the payload's offset (16-byte aligned).

        Raises
        ------
        AllocationError
            No free block is large enough; the heap is unchanged.
        """
        if self._address:  # the accelerator: these very steps in C
            payload: int = _native_heap_alloc(self._address, self.offset, self.size, nbytes)
            if not payload:
                raise self._full(nbytes)
            return payload
        need = (nbytes + TAG_BYTES + GRANULE - 1) & _SIZE_MASK
        words, base = self._words, self._base
        if need <= 1024:
            if need < MIN_BLOCK:
                need = MIN_BLOCK
            klass = (need >> 4) - 2
            block = words[self._heads + klass]  # any block of an exact class fits
        else:
            klass = 52 + need.bit_length()
            block = self._first_fit(need, klass)
        if not block:
            # The first block of the next non-empty class (all larger than ``need``), found
            # in one bitmap word at a time (cheaper than shifting a 128-bit int).
            first = klass + 1
            low = words[base + _BITMAP_LOW] >> first if first < 64 else 0
            if low:
                klass = first + (low & -low).bit_length() - 1
            else:
                if first < 64:
                    first = 64
                high = words[base + _BITMAP_HIGH] >> (first - 64)
                if not high:
                    raise self._full(nbytes)
                klass = first + (high & -high).bit_length() - 1
            block = words[self._heads + klass]
        size = words[block >> 3]
        rest = size - need
        if rest < MIN_BLOCK:
            self._unlink(block, size)
        else:
            # Carve from the tail: the free part keeps its place (and usually its list).
            if rest > 1024 and rest.bit_length() == size.bit_length():  # same class
                at = block >> 3
                words[at] = rest
                words[at + (rest >> 3) - 1] = rest
                words[base + _FREE_BYTES] -= need
            else:
                self._unlink(block, size)
                self._insert(block, rest)
            block += rest
            size = need
        at = block >> 3
        tag = size | _ALLOCATED_BIT
        words[at] = tag
        words[at + (size >> 3) - 1] = tag
        words[base + _ALLOCATED] += 1
        return block + 8

    def _full(self, nbytes: int) -> HeapFullError:
        """The error of an allocation of ``nbytes`` that no free block can take."""
        words, base = self._words, self._base
        return HeapFullError(
            f"heap full: no free block for {nbytes} bytes "
            f"({words[base + _FREE_BYTES]} bytes free in "
            f"{words[base + _FREE_BLOCKS]} blocks of a {self.size}-byte heap)",
            nbytes,
        )

    def free(self, payload: int) -> None:
        """Return the block whose payload starts at ``payload`` to the heap.

        Raises
        ------
        ValueError
            ``payload`` is not an allocated block of this heap (e.g. freed twice,
            detected on a best-effort basis: once reused, a block is allocated again).
        """
        if self._address and not _native_heap_free(
            self._address, self.offset, self.size, self._end_block, payload
        ):
            return  # the accelerator freed it; on a refusal the checks below say why
        block = payload - 8
        words = self._words
        if not self._first_block <= block < self._end_block or block & 15 != 8:
            raise ValueError(f"offset {payload} is not a payload of this heap")
        tag = words[block >> 3]
        size = tag & _SIZE_MASK
        if not tag & _ALLOCATED_BIT or size < MIN_BLOCK or block + size > self._end_block:
            raise ValueError(f"offset {payload} is not an allocated block (tag {tag:#x})")
        base = self._base
        words[base + _ALLOCATED] -= 1
        following = block + size
        following_tag = words[following >> 3]
        if not following_tag & _ALLOCATED_BIT:
            self._unlink(following, following_tag)
            size += following_tag
        previous_tag = words[(block >> 3) - 1]
        if not previous_tag & _ALLOCATED_BIT:
            start = block - previous_tag
            merged = previous_tag + size
            if size_class(merged) == size_class(previous_tag):
                # Grow the free predecessor in place: it stays on its list.
                words[start >> 3] = merged
                words[(start + merged - 8) >> 3] = merged
                words[block >> 3] = 0  # a stale "allocated" tag would let a double free pass
                words[base + _FREE_BYTES] += size
                return
            self._unlink(start, previous_tag)
            block, size = start, merged
        self._insert(block, size)

    def refresh(self) -> None:
        """Follow a limit another process raised (call with the owner's lock held)."""
        recorded = self._words[self._base + _LIMIT]
        end = self._end_for(recorded or self.size)
        if end != self._end_block:
            self._end_block = end

    @property
    def limit(self) -> int:
        """Bytes of the region in use (pages up to here must be reserved)."""
        return (
            self.size
            if not self._words[self._base + _LIMIT]
            else int(self._words[self._base + _LIMIT])
        )

    def extend(self, limit: int) -> None:
        """Raise the limit to ``limit``: the new bytes become free space.

        The caller has reserved the pages up to ``offset + limit`` already. A
        crash in the middle leaves tags that :meth:`rebuild` rewrites from the
        recorded limit (the caller calls it inside a journalled mutation).
        """
        if self._address:  # the accelerator: these very steps in C
            self._end_block = _native_heap_extend(
                self._address, self.offset, self.size, self._end_block, limit
            )
            return
        limit = min(limit, self.size)
        old_end, new_end = self._end_block, self._end_for(limit)
        if new_end - old_end < MIN_BLOCK:
            return
        words, base = self._words, self._base
        words[new_end >> 3] = _ALLOCATED_BIT  # the new epilogue first
        words[base + _LIMIT] = limit if limit < self.size else 0
        self._end_block = new_end
        block, size = old_end, new_end - old_end
        previous_tag = words[(block >> 3) - 1]
        if block > self._first_block and not previous_tag & _ALLOCATED_BIT:
            start = block - previous_tag  # merge with the free block below the old epilogue
            self._unlink(start, previous_tag)
            block, size = start, size + previous_tag
        self._insert(block, size)

    def payload_size(self, payload: int) -> int:
        """Return the usable bytes of the allocated block at ``payload``."""
        return int(self._words[(payload - 8) >> 3] & _SIZE_MASK) - TAG_BYTES

    def rebuild(self, live: list[int]) -> list[int]:
        """Rewrite the heap so that exactly the payloads in ``live`` are allocated.

        Used to recover after a process died inside an operation: every tag and
        list is rewritten from ``live``, and the space between live blocks
        becomes free (leaked blocks are reclaimed). A payload whose tags are not
        intact, or that overlaps another, is not kept.

        Returns
        -------
        list[int]
            The payloads of ``live`` that were rejected (now free space).
        """
        words = self._words
        kept: list[tuple[int, int]] = []
        rejected: list[int] = []
        cursor = self._first_block
        for payload in sorted(set(live)):
            block = payload - 8
            tag = int(words[block >> 3]) if 0 <= block < len(words) * 8 else 0
            size = tag & _SIZE_MASK
            intact = (
                block & 15 == 8
                and cursor <= block
                and tag & _ALLOCATED_BIT
                and size >= MIN_BLOCK
                and block + size <= self._end_block
                and words[(block + size - 8) >> 3] == tag
                and block - cursor != GRANULE  # a 16-byte gap cannot be a free block
            )
            if intact:
                kept.append((block, size))
                cursor = block + size
            else:
                rejected.append(payload)
        while kept and self._end_block - cursor == GRANULE:
            block, size = kept.pop()
            rejected.append(block + 8)
            cursor = kept[-1][0] + kept[-1][1] if kept else self._first_block
        self._reset_lists()  # writes only meta and the two end tags: no payload bytes
        base = self._base
        cursor = self._first_block
        for block, size in kept:
            if block > cursor:
                self._insert(cursor, block - cursor)
            tag = size | _ALLOCATED_BIT
            words[block >> 3] = tag
            words[(block + size - 8) >> 3] = tag
            words[base + _ALLOCATED] += 1
            cursor = block + size
        if self._end_block > cursor:
            self._insert(cursor, self._end_block - cursor)
        return rejected

    def check(self) -> None:
        """Walk the whole heap and verify every invariant.

        Checks that the blocks tile the region, every header equals its footer,
        no two free blocks are adjacent, every free block is on the list of its
        class exactly once with consistent links, the bitmap matches the lists,
        and the counters match the walk.

        Raises
        ------
        LayoutError
            An invariant does not hold; the message says which and where.
        """
        words, base = self._words, self._base

        def fail(message: str) -> None:
            raise LayoutError(f"heap at offset {self.offset}: {message}")

        if words[(self._first_block - 8) >> 3] != _ALLOCATED_BIT:
            fail("prologue tag damaged")
        if words[self._end_block >> 3] != _ALLOCATED_BIT:
            fail("epilogue tag damaged")
        free_blocks: set[int] = set()
        used = allocated = free_bytes = 0
        block = self._first_block
        previous_free = False
        while block < self._end_block:
            tag = int(words[block >> 3])
            size = tag & _SIZE_MASK
            if size < MIN_BLOCK or block + size > self._end_block:
                fail(f"block at {block} has bad size {size}")
            if words[(block + size - 8) >> 3] != tag:
                fail(f"block at {block}: header {tag:#x} != footer")
            if tag & _ALLOCATED_BIT:
                used += size
                allocated += 1
                previous_free = False
            else:
                if previous_free:
                    fail(f"free block at {block} follows another free block")
                free_blocks.add(block)
                free_bytes += size
                previous_free = True
            block += size
        if block != self._end_block:
            fail(f"blocks end at {block}, not at {self._end_block}")
        listed: set[int] = set()
        bitmap = 0
        for klass in range(NUM_CLASSES):
            block = int(words[self._heads + klass])
            if block:
                bitmap |= 1 << klass
            previous = 0
            while block:
                if block not in free_blocks or block in listed:
                    fail(f"list {klass} holds {block}, not a free block or listed twice")
                size = int(words[block >> 3])
                if size_class(size) != klass:
                    fail(f"block at {block} of size {size} is on list {klass}")
                if words[(block >> 3) + 2] != previous:
                    fail(f"block at {block} has a wrong previous link")
                listed.add(block)
                previous = block
                block = int(words[(block >> 3) + 1])
        if listed != free_blocks:
            fail(f"free blocks not on any list: {sorted(free_blocks - listed)[:10]}")
        stored_bitmap = words[base + _BITMAP_LOW] | (words[base + _BITMAP_HIGH] << 64)
        if stored_bitmap != bitmap:
            fail(f"bitmap {stored_bitmap:#x} does not match the lists ({bitmap:#x})")
        fields = (_ALLOCATED, _FREE_BLOCKS, _FREE_BYTES)
        counters = tuple(int(words[base + field]) for field in fields)
        if used + free_bytes != self.capacity:
            fail(f"blocks cover {used + free_bytes} bytes, not the capacity {self.capacity}")
        if counters != (allocated, len(free_blocks), free_bytes):
            fail(
                f"counters (allocated, free blocks, free bytes) = {counters}, "
                f"walk found {(allocated, len(free_blocks), free_bytes)}"
            )

    def release(self) -> None:
        """Drop this object's view of the block (so the block can be unmapped)."""
        self._address = 0
        self._words.release()

    @property
    def capacity(self) -> int:
        """Bytes that blocks can occupy (the region less bookkeeping)."""
        return self._end_block - self._first_block

    @property
    def used(self) -> int:
        """Bytes in allocated blocks, tags included."""
        return self.capacity - int(self._words[self._base + _FREE_BYTES])

    def gc_stats(self) -> dict[str, int | float]:
        """Return free-space statistics.

        Returns
        -------
        dict
            ``total_free_blocks``, ``total_free_space`` (bytes),
            ``largest_free_block`` (bytes), ``allocated_blocks``, and
            ``fragmentation``: 1 - largest free block / free space (0 when all
            free space is one block).
        """
        words, base = self._words, self._base
        free_space = int(words[base + _FREE_BYTES])
        largest = 0
        bitmap = words[base + _BITMAP_LOW] | (words[base + _BITMAP_HIGH] << 64)
        if bitmap:
            block = int(words[self._heads + bitmap.bit_length() - 1])
            for _ in range(self.capacity // MIN_BLOCK):  # bounded, even for a damaged list
                if not block:
                    break
                largest = max(largest, int(words[block >> 3]))
                block = int(words[(block >> 3) + 1])
        return {
            "total_free_blocks": int(words[base + _FREE_BLOCKS]),
            "total_free_space": free_space,
            "largest_free_block": largest,
            "allocated_blocks": int(words[base + _ALLOCATED]),
            "fragmentation": 1.0 - largest / free_space if free_space else 0.0,
        }
