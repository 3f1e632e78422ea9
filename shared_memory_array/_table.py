"""The hash table of a ``SharedDict`` block: control words, two slot arrays, entries.

Layout of the block
-------------------
* The header (kind ``dict``; see ``_header``). Its ``extra`` holds the geometry,
  six little-endian uint64: control-area offset, table offset, slot count,
  max_items, heap offset, heap size. The header never changes after creation.
* The control area, eight uint64 words: the version (bumped by every
  mutation), the item count, the tombstone count, which of the two tables is
  active, the pid and start time of a process inside a mutation (0 when none),
  the number of crash repairs, and the heap offset of the journal of an
  ``update`` in progress (0 when none). The last four belong to the crash
  protocol of ``_journal``.
* Two hash tables of ``slot count`` uint64 slots each; one is active. A slot
  is 0 (empty), 1 (tombstone), or ``tag << 40 | entry offset``, where the tag
  is 24 bits of the key's hash. Open addressing with linear probing.
* The heap (``_heap``), holding one entry per key: three words (key length |
  original-key length << 32; value state: which value area is current << 63 |
  value length; two-areas flag << 63 | area capacity), the canonical key bytes
  (``_keys``), the key's pickle when the canonical form does not give it back
  exactly (``True``, ``1.0``, a named tuple), and one value area, or two for
  values of up to 256 bytes, holding the value's pickle (protocol 5).

Publishing
----------
Every change becomes visible through ONE aligned 8-byte store: a new entry is
written in free heap space and published by the store of its slot word; a small
value replacing one of its size goes to the entry's spare value area and is
published by the store of the entry's state word; a table rebuild fills the
inactive table and switches to it by the store of the ``active`` word. So a slot
always points at a complete entry. :class:`Table` does not lock: its callers hold
the dict's lock and follow the ``_journal`` protocol around every mutation.
"""

from __future__ import annotations

import math
import pickle
import struct
import zlib
from typing import TYPE_CHECKING, Any, Final

from ._heap import Heap
from ._keys import decode_key
from .errors import AllocationError, LayoutError

if TYPE_CHECKING:
    from ._journal import Journal

__all__ = ["Geometry", "Table", "fill_limit", "slot_count"]

_GEOMETRY = struct.Struct("<6Q")
_ENTRY_WORDS = struct.Struct("<3Q")
CONTROL_WORDS: Final = 8
VERSION, COUNT, TOMBSTONES, ACTIVE, HOLDER_PID, HOLDER_START, REPAIRS, JOURNAL = range(8)
OFFSET_BITS: Final = 40
OFFSET_MASK: Final = (1 << OFFSET_BITS) - 1
_TAG_MASK: Final = ~OFFSET_MASK & 0xFFFFFFFFFFFFFFFF
TOMBSTONE: Final = 1
ENTRY_HEADER: Final = 24
LOW63: Final = (1 << 63) - 1
HIGH_BIT: Final = 1 << 63
_TWO_AREA_LIMIT: Final = 256  # values up to this size get two areas: updates in place
MAX_SLOTS: Final = 1 << 31
MIN_HEAP: Final = 4096
MAX_BLOCK: Final = 1 << OFFSET_BITS
_crc32 = zlib.crc32


def _two_areas(length: int) -> tuple[int, int]:
    """Return (third entry word, bytes of both areas) for a new ``length``-byte value."""
    area = max(16, (length + (length >> 2) + 7) & ~7)  # room to grow a little
    return HIGH_BIT | area, 2 * area


_TWO_AREAS: Final = [_two_areas(length) for length in range(_TWO_AREA_LIMIT + 1)]  # by length


def _fibonacci_shift(slots: int) -> int:
    return 32 - (slots.bit_length() - 1)


def slot_count(max_items: int) -> int:
    """Slots for ``max_items`` keys: a power of two with load at most 0.7."""
    return max(8, 1 << (math.ceil(max_items / 0.7) - 1).bit_length())


def fill_limit(slots: int) -> int:
    """Used + tombstone slots above which the table is rebuilt."""
    return slots * 7 // 8


class Geometry:
    """Where the parts of a dict block are, validated against the block size."""

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
        """Lay out a new block whose control area starts at ``control``."""
        slots = slot_count(max_items)
        if slots > MAX_SLOTS:
            raise ValueError(f"max_items {max_items} is too large")
        table = control + 8 * CONTROL_WORDS
        heap = (table + 16 * slots + 63) & ~63
        return cls(control, table, slots, max_items, heap, heap_size)

    @property
    def block_size(self) -> int:
        """Bytes of the whole block."""
        return self.heap + self.heap_size

    def pack(self) -> bytes:
        return _GEOMETRY.pack(
            self.control, self.table, self.slots, self.max_items, self.heap, self.heap_size
        )

    @staticmethod
    def packed_size() -> int:
        return _GEOMETRY.size

    @classmethod
    def unpack(cls, extra: bytes, *, data_offset: int, block_size: int, where: str) -> Geometry:
        """Decode and check the geometry of a dict block.

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
        if heap_size < MIN_HEAP or heap + heap_size > block_size:
            raise LayoutError(
                f"{where}: heap of {heap_size} bytes at {heap} does not fit the "
                f"{block_size}-byte block"
            )
        return geometry


class Table:
    """The two slot tables, the control words and the entries of one mapped dict block.

    Every method expects the dict's lock held; the mutating ones (:meth:`put`,
    :meth:`unpublish`, :meth:`rebuild`, :meth:`reset`) also expect a mutation
    recorded by ``_journal`` around them.
    """

    __slots__ = (
        "buf",
        "ctl",
        "fill_limit",
        "heap",
        "heap_end",
        "heap_start",
        "mask",
        "max_items",
        "name",
        "shift",
        "slots",
        "table_offsets",
        "tables",
        "words",
    )

    def __init__(self, buf: memoryview, geometry: Geometry, name: str) -> None:
        self.name = name
        self.heap = Heap.open(buf, geometry.heap, geometry.heap_size)
        self.buf = buf
        self.words = buf[: len(buf) & ~7].cast("Q")
        self.ctl = buf[geometry.control : geometry.control + 8 * CONTROL_WORDS].cast("Q")
        table_bytes = 8 * geometry.slots
        self.tables = (
            buf[geometry.table : geometry.table + table_bytes].cast("Q"),
            buf[geometry.table + table_bytes : geometry.table + 2 * table_bytes].cast("Q"),
        )
        self.table_offsets = (geometry.table, geometry.table + table_bytes)
        self.slots = geometry.slots
        self.max_items = geometry.max_items
        self.mask = geometry.slots - 1
        self.shift = _fibonacci_shift(geometry.slots)
        self.fill_limit = fill_limit(geometry.slots)
        self.heap_start = geometry.heap
        self.heap_end = geometry.heap + geometry.heap_size

    def release(self) -> None:
        """Release every view of the block (the caller releases ``buf``)."""
        self.heap.release()
        for view in (self.words, self.ctl, *self.tables):
            view.release()

    def active(self) -> memoryview:
        """The active slot table."""
        return self.tables[self.ctl[ACTIVE] & 1]

    # -- lookup ---------------------------------------------------------------------------

    def probe(self, encoded: bytes, key_hash: int) -> tuple[int, int, int]:
        """Find ``encoded`` in the active table.

        Returns ``(index, word, insert_at)``: the slot index and word of the key;
        when absent, index -1, the word of the slot where the key would go (0 or
        a tombstone) and that slot's index.
        """
        table = self.tables[self.ctl[ACTIVE] & 1]
        index = ((key_hash * 0x9E3779B1) & 0xFFFFFFFF) >> self.shift
        word = table[index]
        if not word:
            return -1, 0, index
        tag = (key_hash & 0xFFFFFF) << OFFSET_BITS
        if word & _TAG_MASK == tag:  # the common hit: the key in its home slot
            entry = word & OFFSET_MASK
            length = len(encoded)
            if self.words[entry >> 3] & 0xFFFFFFFF == length:
                start = entry + ENTRY_HEADER
                if self.buf[start : start + length] == encoded:
                    return index, word, -1
        return self._probe_chain(table, index, tag, encoded)

    def _probe_chain(
        self, table: memoryview, index: int, tag: int, encoded: bytes
    ) -> tuple[int, int, int]:
        """The rest of :meth:`probe`: walk the chain from the occupied slot ``index``."""
        mask = self.mask
        words, buf = self.words, self.buf
        length = len(encoded)
        insert_at = index if table[index] == TOMBSTONE else -1
        for _ in range(self.slots):
            index = (index + 1) & mask
            word = table[index]
            if not word:
                return (-1, 0, index) if insert_at < 0 else (-1, TOMBSTONE, insert_at)
            if word == TOMBSTONE:
                if insert_at < 0:
                    insert_at = index
            elif word & _TAG_MASK == tag:
                entry = word & OFFSET_MASK
                if words[entry >> 3] & 0xFFFFFFFF == length:
                    start = entry + ENTRY_HEADER
                    if buf[start : start + length] == encoded:
                        return index, word, insert_at
        if insert_at >= 0:
            return -1, TOMBSTONE, insert_at
        raise LayoutError(f"SharedDict {self.name!r}: hash table has no empty slot (corrupt)")

    def entry_value(self, entry: int) -> memoryview:
        """The current value pickle of ``entry`` (a view into the block)."""
        words = self.words
        at = entry >> 3
        sizes, state = words[at], words[at + 1]
        start = entry + ENTRY_HEADER + (sizes & 0xFFFFFFFF) + (sizes >> 32)
        if state & HIGH_BIT:  # the second value area is the current one
            start += words[at + 2] & LOW63
        return self.buf[start : start + (state & LOW63)]

    def entry_key(self, entry: int) -> object:
        """The key of ``entry``, as first inserted."""
        sizes = self.words[entry >> 3]
        key_length, original_length = sizes & 0xFFFFFFFF, sizes >> 32
        start = entry + ENTRY_HEADER
        if original_length:
            start += key_length
            return pickle.loads(self.buf[start : start + original_length])
        return decode_key(bytes(self.buf[start : start + key_length]))

    def load_value(self, entry: int) -> Any:
        """Unpickle the value of ``entry``."""
        data = self.entry_value(entry)
        try:
            return pickle.loads(data)
        finally:
            data.release()

    def entry_fits(self, entry: int) -> bool:
        """Whether the sizes in ``entry``'s words fit its heap payload (a repair check)."""
        words = self.words
        at = entry >> 3
        sizes, length, capacity = words[at], words[at + 1] & LOW63, words[at + 2]
        areas = 2 if capacity & HIGH_BIT else 1
        capacity &= LOW63
        needed = ENTRY_HEADER + (sizes & 0xFFFFFFFF) + (sizes >> 32) + areas * capacity
        return length <= capacity and needed <= self.heap.payload_size(entry)

    def live_words(self) -> list[int]:
        """The words of every occupied slot of the active table."""
        return [word for word in self.active().tolist() if word > TOMBSTONE]

    # -- mutation (lock held, inside a recorded mutation) ---------------------------------

    def rebuild(self) -> None:
        """Copy live slots into the inactive table, then switch to it (one store)."""
        ctl, words, buf = self.ctl, self.words, self.buf
        active = ctl[ACTIVE] & 1
        target = self.tables[1 - active]
        live = self.live_words()
        if len(live) >= self.fill_limit:  # cannot happen unless the block was damaged
            raise LayoutError(
                f"SharedDict {self.name!r}: table holds {len(live)} entries (corrupt)"
            )
        offset = self.table_offsets[1 - active]
        buf[offset : offset + 8 * self.slots] = bytes(8 * self.slots)
        mask, shift = self.mask, self.shift
        for word in live:
            entry = word & OFFSET_MASK
            start = entry + ENTRY_HEADER
            key_hash = _crc32(buf[start : start + (words[entry >> 3] & 0xFFFFFFFF)])
            index = ((key_hash * 0x9E3779B1) & 0xFFFFFFFF) >> shift
            while target[index]:
                index = (index + 1) & mask
            target[index] = word
        ctl[ACTIVE] = 1 - active
        ctl[TOMBSTONES] = 0

    def put(
        self,
        encoded: bytes,
        key_hash: int,
        original: bytes,
        data: bytes,
        journal: Journal | None = None,
    ) -> tuple[int, int]:
        """Store the value and publish it; return ``(slot index, replaced word)``.

        An existing key whose entry has a spare value area large enough is
        updated in place: the value goes to the spare area, then one store to
        the entry's state word switches areas (``replaced`` is 0 then). Else a
        new entry is written and published with one store to the slot; the
        replaced entry (word > 1) is NOT freed: the caller frees it once the
        whole operation has succeeded. On AllocationError nothing changed.
        With a ``journal`` (an update in progress), nothing is done in place
        and the slot's old word is appended to the journal before the slot
        changes, so a crash can be rolled back.
        """
        index, old_word, insert_at = self.probe(encoded, key_hash)
        ctl, words, buf = self.ctl, self.words, self.buf
        if index >= 0:
            old_entry = old_word & OFFSET_MASK
            at = old_entry >> 3
            sizes = words[at]
            capacity = words[at + 2]
            if journal is None and capacity & HIGH_BIT and len(data) <= capacity & LOW63:
                state = words[at + 1]
                start = old_entry + ENTRY_HEADER + (sizes & 0xFFFFFFFF) + (sizes >> 32)
                if not state & HIGH_BIT:
                    start += capacity & LOW63
                buf[start : start + len(data)] = data
                words[at + 1] = (~state & HIGH_BIT) | len(data)  # publish: one store
                return index, 0
            if sizes >> 32:  # keep the key as first inserted, as a dict does
                start = old_entry + ENTRY_HEADER + (sizes & 0xFFFFFFFF)
                original = bytes(buf[start : start + (sizes >> 32)])
            else:
                original = b""
        else:
            count = ctl[COUNT]
            if count >= self.max_items:
                raise AllocationError(
                    f"SharedDict {self.name!r} is full: {count} keys of max_items {self.max_items}",
                    1,
                )
            if count + ctl[TOMBSTONES] >= self.fill_limit and not old_word:
                self.rebuild()
                _, old_word, insert_at = self.probe(encoded, key_hash)
            index = insert_at
        key_length, original_length, length = len(encoded), len(original), len(data)
        if length <= _TWO_AREA_LIMIT:
            areas, capacity = _TWO_AREAS[length]
        else:
            areas = capacity = length
        entry = self.heap.alloc(ENTRY_HEADER + key_length + original_length + capacity)
        written = (
            _ENTRY_WORDS.pack(key_length | original_length << 32, length, areas)
            + encoded
            + original
            + data
        )
        buf[entry : entry + len(written)] = written
        if journal is not None:
            journal.record(index, old_word)
        table = self.tables[ctl[ACTIVE] & 1]
        table[index] = (key_hash & 0xFFFFFF) << OFFSET_BITS | entry  # publish: one store
        if old_word <= TOMBSTONE:  # a new key: ``count`` was read above
            ctl[COUNT] = count + 1
            if old_word:
                ctl[TOMBSTONES] -= 1
        return index, old_word

    def unpublish(self, index: int, word: int) -> None:
        """Empty slot ``index`` (holding ``word``) and free its entry."""
        table = self.tables[self.ctl[ACTIVE] & 1]
        if table[(index + 1) & self.mask]:
            table[index] = TOMBSTONE
            self.ctl[TOMBSTONES] += 1
        else:
            table[index] = 0  # nothing probes past an empty successor
        self.ctl[COUNT] -= 1
        self.heap.free(word & OFFSET_MASK)

    def reset(self) -> None:
        """Remove every entry: switch to the emptied inactive table, then empty the heap."""
        ctl = self.ctl
        inactive = 1 - (ctl[ACTIVE] & 1)
        offset = self.table_offsets[inactive]
        self.buf[offset : offset + 8 * self.slots] = bytes(8 * self.slots)
        ctl[ACTIVE] = inactive
        ctl[COUNT] = 0
        ctl[TOMBSTONES] = 0
        self.heap.rebuild([])

    # -- verification ---------------------------------------------------------------------

    def check(self, extra_blocks: int = 0) -> None:
        """Verify heap and table invariants; raise LayoutError on a violation.

        ``extra_blocks`` heap blocks besides the entries are expected (a journal).
        """
        self.heap.check()
        words = self.active().tolist()
        live = [w for w in words if w > TOMBSTONE]
        if len(live) != self.ctl[COUNT]:
            raise LayoutError(f"count {self.ctl[COUNT]} != {len(live)} live slots")
        if words.count(TOMBSTONE) != self.ctl[TOMBSTONES]:
            raise LayoutError("tombstone count is wrong")
        if self.heap.gc_stats()["allocated_blocks"] != len(live) + extra_blocks:
            raise LayoutError("allocated heap blocks != live entries (leak)")
        for word in live:
            entry = word & OFFSET_MASK
            start = entry + ENTRY_HEADER
            encoded = bytes(self.buf[start : start + (self.words[entry >> 3] & 0xFFFFFFFF)])
            if self.probe(encoded, _crc32(encoded))[1] != word:
                raise LayoutError(f"entry at {entry} is not reachable by probing")
