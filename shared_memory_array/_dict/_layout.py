"""The layout of a dict's blocks: the spec every other module of the dict follows.

A dict is two blocks (see :mod:`._store` for how they are made and grow):

* the **entry block** (kind ``dict``), named as the user named the dict:
  its header, its lifetime area (whose notify word wakes ``wait_for``), and a
  control page that says which generation of data is current and holds the
  dict's lock;
* the **data block** of the current generation (kind ``dict data``), named
  ``<entry name>~<tag>~<generation>`` (the tag: the first 4 bytes of the entry
  block's id, in hex): control words, two hash tables, the heap.

Entry block payload (``data_offset`` + ...)
-------------------------------------------
======  ====  ============  =====================================================
offset  size  field         meaning
======  ====  ============  =====================================================
0       8     generation    the current data block's generation (changes with
                            one store: the commit point of a growth step)
8       8     lock kind     1: a robust process-shared mutex at ``mutex``;
                            2: ``flock`` on the dict's lock file (portable backend)
16      8     options       bit 0: grows (``grow=True``)
24      40    reserved      0
64      64    mutex         the robust mutex (lock kind 1; glibc's is 40 or 48 bytes)
======  ====  ============  =====================================================

Data block
----------
The header's ``extra`` is the geometry, six little-endian uint64: control
offset, table offset, slot count, max_items, heap offset, heap size. Then:

* **Control words** (:class:`Control`), eleven uint64: ``version`` (bumped by
  every mutation), ``count`` (keys), ``tombstones``, ``active`` (which of the
  two tables), ``holder_pid`` and ``holder_start`` (the mutation marker of
  :mod:`._journal`), ``repairs``, ``journal`` (the heap offset of an armed
  update journal, 0 when none), ``superseded`` (the generation that replaced
  this block, 0 while current), and two reserved words.
* **Two hash tables** of ``slot count`` uint64 slots; one is active. A slot is
  0 (empty), 1 (tombstone), or ``tag << 40 | entry offset``, the tag being 24
  bits of the key's hash and the offset relative to the heap region. Open
  addressing, linear probing, a Fibonacci hash of the key's CRC-32.
* **The heap** (:mod:`.._heap`) over a region of its own, addressed relative
  to the region's start, so that growing the dict copies it verbatim into a
  bigger block. Only its first ``limit`` bytes are reserved and in use.

Entries (in the heap, offsets relative to the heap region)
----------------------------------------------------------
======  ====  ============  =====================================================
offset  size  field         meaning
======  ====  ============  =====================================================
0       8     sizes         key length | original-key length << 32
8       8     state         bit 63: which value area is current; bits 60-62: the
                            value's kind (:data:`PICKLED`, :data:`INT64`,
                            :data:`FLOAT64`); bits 0-59: the value's length
16      8     areas         bit 63: two value areas; bits 0-62: one area's bytes
24      ...   key           the canonical key bytes (:mod:`._keys`), then the
                            key's pickle when the canonical form does not give it
                            back exactly, then zeros up to a multiple of 8
...     ...   value areas   one, or two of equal size
======  ====  ============  =====================================================

An entry is born with one value area of exactly its value's size; the first
update of a small value (up to :data:`TWO_AREA_LIMIT` bytes) writes a new
entry with two areas 1.25 times the value's size, after which updates of a
value that fits go in place: into the spare area, published by one store to
``state``. An ``int`` that fits in 64 bits and a ``float`` are stored as their
8 bytes, not pickled (kinds :data:`INT64`, :data:`FLOAT64`): ``increment``
replaces them in place with one aligned 8-byte store.
"""

from __future__ import annotations

import math
import struct
from typing import Final, overload

from ..errors import LayoutError

__all__ = [
    "ENTRY_HEADER",
    "FLOAT64",
    "INT64",
    "LOCK_FILE",
    "LOCK_MUTEX",
    "MAX_BLOCK",
    "MIN_HEAP",
    "OFFSET_BITS",
    "OFFSET_MASK",
    "PICKLED",
    "TOMBSTONE",
    "TWO_AREA_LIMIT",
    "Control",
    "EntryPage",
    "Geometry",
    "fill_limit",
    "slot_count",
]

# -- the entry block's control page ------------------------------------------------------

ENTRY_PAGE_SIZE: Final = 128
MUTEX_OFFSET: Final = 64
MUTEX_SIZE: Final = 64
LOCK_MUTEX: Final = 1
LOCK_FILE: Final = 2
OPTION_GROW: Final = 1
_GENERATION, _LOCK_KIND, _OPTIONS = range(3)


class EntryPage:
    """The control page of an entry block, read and written through a shared view."""

    __slots__ = ("words",)

    def __init__(self, view: memoryview) -> None:
        self.words = view[:24].cast("Q")

    @property
    def generation(self) -> int:
        """The current data block's generation."""
        return int(self.words[_GENERATION])

    @generation.setter
    def generation(self, value: int) -> None:
        self.words[_GENERATION] = value  # one aligned store: the commit point of a growth

    @property
    def lock_kind(self) -> int:
        """:data:`LOCK_MUTEX` or :data:`LOCK_FILE`."""
        return int(self.words[_LOCK_KIND])

    @property
    def grows(self) -> bool:
        """Whether the dict grows as keys and values arrive."""
        return bool(self.words[_OPTIONS] & OPTION_GROW)

    def format(self, lock_kind: int, grows: bool) -> None:
        """Write a new entry page (generation 0)."""
        self.words[_GENERATION] = 0
        self.words[_LOCK_KIND] = lock_kind
        self.words[_OPTIONS] = OPTION_GROW if grows else 0

    def release(self) -> None:
        """Drop the view (so the block can be unmapped)."""
        self.words.release()


# -- the data block ------------------------------------------------------------------------

_GEOMETRY: Final = struct.Struct("<6Q")
CONTROL_WORDS: Final = 11
(
    VERSION,
    COUNT,
    TOMBSTONES,
    ACTIVE,
    HOLDER_PID,
    HOLDER_START,
    REPAIRS,
    JOURNAL,
    SUPERSEDED,
    _RESERVED_1,
    _RESERVED_2,
) = range(CONTROL_WORDS)
OFFSET_BITS: Final = 40
OFFSET_MASK: Final = (1 << OFFSET_BITS) - 1
TAG_MASK: Final = ~OFFSET_MASK & 0xFFFFFFFFFFFFFFFF
TOMBSTONE: Final = 1
MAX_SLOTS: Final = 1 << 31
MIN_HEAP: Final = 4096
MAX_BLOCK: Final = 1 << OFFSET_BITS


class _Word:
    """One control word, as an attribute of :class:`Control`."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    @overload
    def __get__(self, obj: None, owner: type[Control] | None = None) -> _Word: ...
    @overload
    def __get__(self, obj: Control, owner: type[Control] | None = None) -> int: ...
    def __get__(self, obj: Control | None, owner: type[Control] | None = None) -> int | _Word:
        return self if obj is None else int(obj.words[self.index])

    def __set__(self, obj: Control, value: int) -> None:
        obj.words[self.index] = value


class Control:
    """The control words of a data block, by name (every layer reads them through this).

    The facade's cache-hit path reads ``version`` through :attr:`words` with
    the :data:`VERSION` index instead: the one hot path where an attribute
    call costs a measurable share.
    """

    __slots__ = ("words",)

    version = _Word(VERSION)
    count = _Word(COUNT)
    tombstones = _Word(TOMBSTONES)
    active = _Word(ACTIVE)
    holder_pid = _Word(HOLDER_PID)
    holder_start = _Word(HOLDER_START)
    repairs = _Word(REPAIRS)
    journal = _Word(JOURNAL)
    superseded = _Word(SUPERSEDED)

    def __init__(self, words: memoryview) -> None:
        self.words = words

    def release(self) -> None:
        """Drop the view."""
        self.words.release()


def slot_count(max_items: int) -> int:
    """Slots for ``max_items`` keys: a power of two with load at most 0.7."""
    return max(8, 1 << (math.ceil(max_items / 0.7) - 1).bit_length())


def fill_limit(slots: int) -> int:
    """Used + tombstone slots above which the table is rebuilt."""
    return slots * 7 // 8


class Geometry:
    """Where the parts of a data block are, validated against the block size."""

    __slots__ = ("control", "heap", "heap_size", "max_items", "slots", "table")

    def __init__(
        self, control: int, table: int, slots: int, max_items: int, heap: int, heap_size: int
    ) -> None:
        self.control = control
        self.table = table
        self.slots = slots
        self.max_items = max_items
        self.heap = heap
        self.heap_size = heap_size

    @classmethod
    def plan(cls, control: int, max_items: int, heap_size: int) -> Geometry:
        """Lay out a new data block whose control words start at ``control``."""
        slots = slot_count(max_items)
        if slots > MAX_SLOTS:
            raise ValueError(f"max_items {max_items} is too large")
        table = control + 8 * CONTROL_WORDS
        heap = (table + 16 * slots + 4095) & ~4095  # the heap's pages start on a page
        return cls(control, table, slots, max_items, heap, heap_size)

    @property
    def block_size(self) -> int:
        """Bytes of the whole block."""
        return self.heap + self.heap_size

    def pack(self) -> bytes:
        """The header's ``extra``."""
        return _GEOMETRY.pack(
            self.control, self.table, self.slots, self.max_items, self.heap, self.heap_size
        )

    @staticmethod
    def packed_size() -> int:
        """Bytes of :meth:`pack`."""
        return _GEOMETRY.size

    @classmethod
    def unpack(cls, extra: bytes, *, data_offset: int, block_size: int, where: str) -> Geometry:
        """Decode and check the geometry of a data block.

        Raises
        ------
        LayoutError
            Any offset or count is out of place; the message quotes it.
        """
        if len(extra) != _GEOMETRY.size:
            raise LayoutError(
                f"{where}: dict geometry is {len(extra)} bytes, expected {_GEOMETRY.size}"
            )
        geometry = cls(*_GEOMETRY.unpack(extra))
        control, table, slots = geometry.control, geometry.table, geometry.slots
        max_items, heap, heap_size = geometry.max_items, geometry.heap, geometry.heap_size
        if block_size >= MAX_BLOCK:
            raise LayoutError(f"{where}: block of {block_size} bytes is too large for a dict")
        if control != data_offset:
            raise LayoutError(f"{where}: control offset {control} != data offset {data_offset}")
        if table % 8 or table < control + 8 * CONTROL_WORDS:
            raise LayoutError(f"{where}: table offset {table} is invalid (control at {control})")
        if not 8 <= slots <= MAX_SLOTS or slots & (slots - 1):
            raise LayoutError(f"{where}: slot count {slots} is not a power of two in [8, 2**31]")
        if not 1 <= max_items < fill_limit(slots):
            raise LayoutError(f"{where}: max_items {max_items} does not fit {slots} slots")
        if heap % 64 or heap < table + 16 * slots:
            raise LayoutError(f"{where}: heap offset {heap} overlaps the tables or is unaligned")
        if heap_size < MIN_HEAP or heap + heap_size > block_size or heap_size > OFFSET_MASK:
            raise LayoutError(
                f"{where}: heap of {heap_size} bytes at {heap} does not fit the "
                f"{block_size}-byte block"
            )
        return geometry


# -- entries ---------------------------------------------------------------------------

ENTRY_HEADER: Final = 24
ENTRY_ALLOWANCE: Final = 72
"""Heap bytes reserved per item beyond its key and value: the entry header (24), the
allocator's tags (16), rounding to 16 (at most 15 twice: the entry and its update area
start aligned) and a small pickle's framing (2). So ``heap_size`` counts keys and values
only, and zero-copy-ipc's ``max_items * (key + value) * 2`` holds for small entries too."""
HIGH_BIT: Final = 1 << 63
LOW63: Final = HIGH_BIT - 1
KIND_SHIFT: Final = 60
KIND_MASK: Final = 7 << KIND_SHIFT
LENGTH_MASK: Final = (1 << KIND_SHIFT) - 1
PICKLED: Final = 0
INT64: Final = 1
FLOAT64: Final = 2
TWO_AREA_LIMIT: Final = 256
"""Values up to this size get two areas on their first update: later updates go in place."""


def key_room(sizes: int) -> int:
    """Bytes from an entry's key to its first value area (key, original key, padding)."""
    return ((sizes & 0xFFFFFFFF) + (sizes >> 32) + 7) & ~7


def two_areas(length: int) -> tuple[int, int]:
    """``(areas word, bytes of both areas)`` for an updated small value of ``length`` bytes."""
    area = max(16, (length + (length >> 2) + 7) & ~7)  # room to grow a little
    return HIGH_BIT | area, 2 * area


TWO_AREAS: Final = [two_areas(length) for length in range(TWO_AREA_LIMIT + 1)]  # by length


def fibonacci_shift(slots: int) -> int:
    """The right shift that takes a 32-bit Fibonacci hash to a slot index."""
    return 32 - (slots.bit_length() - 1)
