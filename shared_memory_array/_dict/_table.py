"""The hash table of a dict's data block: probing, entries, publishing with one store.

The layout is :mod:`._layout`'s. :class:`Table` does not lock: its callers hold
the dict's lock and follow the :mod:`._journal` protocol around every mutation.

Publishing
----------
Every change becomes visible through ONE aligned 8-byte store: a new entry is
written in free heap space and published by the store of its slot word; a small
value replacing one of its size goes to the entry's spare value area and is
published by the store of the entry's state word; a number's 8 bytes are
replaced in place by one store; a table rebuild fills the inactive table and
switches to it by the store of the ``active`` word. So a slot always points at
a complete entry, and a reader that does not lock (seqlock-style, see the
facade) never sees half of a change it then keeps.

Where the accelerator is used (:mod:`.._accel`), :attr:`Table.core` does :meth:`~Table.probe`,
:meth:`~Table.put`, :meth:`~Table.entry_value`, :meth:`~Table.set_number` and
:meth:`~Table.unpublish` in C: the same steps, the same stores in the same order.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from typing import TYPE_CHECKING, Any, Final

from .. import _accel
from .._heap import Heap
from ..errors import LayoutError, TableFullError
from ._keys import decode_key
from ._layout import (
    ACTIVE,
    COUNT,
    ENTRY_HEADER,
    FLOAT64,
    HIGH_BIT,
    INT64,
    KIND_MASK,
    KIND_SHIFT,
    LENGTH_MASK,
    LOW63,
    OFFSET_BITS,
    OFFSET_MASK,
    PICKLED,
    TAG_MASK,
    TOMBSTONE,
    TOMBSTONES,
    TWO_AREA_LIMIT,
    TWO_AREAS,
    Control,
    Geometry,
    fibonacci_shift,
    fill_limit,
    key_room,
)

if TYPE_CHECKING:
    from .._native import Core as NativeCore
    from ._journal import UpdateJournal

__all__ = ["Table", "Value", "decode_value", "encode_value"]

_ENTRY_WORDS: Final = struct.Struct("<3Q")
_INT64: Final = struct.Struct("<q")
_FLOAT64: Final = struct.Struct("<d")
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_crc32 = zlib.crc32
_dumps = pickle.dumps
# The accelerator's answers that stand for an error (its STATUS_* constants; a test checks).
_STATUS_TABLE_FULL: Final = -1
_STATUS_NO_EMPTY_SLOT: Final = -3
_STATUS_CORRUPT: Final = -4

# (kind, bytes): how a value is stored.
Value = tuple[int, bytes]


def encode_value(value: object) -> Value:
    """``(kind, bytes)`` of a value: an exact int of 64 bits or a float raw, else its pickle."""
    kind = type(value)
    if kind is int and _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
        return INT64, _INT64.pack(value)
    if kind is float:
        return FLOAT64, _FLOAT64.pack(value)
    return PICKLED, _dumps(value, 5)


def decode_value(kind: int, data: bytes | memoryview) -> Any:
    """The object behind ``(kind, bytes)``."""
    if kind == INT64:
        return _INT64.unpack(data)[0]
    if kind == FLOAT64:
        return _FLOAT64.unpack(data)[0]
    if kind != PICKLED:
        raise LayoutError(f"unknown value kind {kind}")
    return pickle.loads(data)


class Table:
    """The two slot tables, the control words and the entries of one mapped data block.

    Every method expects the dict's lock held; the mutating ones (:meth:`put`,
    :meth:`put_number`, :meth:`unpublish`, :meth:`rebuild`, :meth:`reset`)
    also expect a mutation recorded by :mod:`._journal` around them.
    """

    __slots__ = (
        "buf",
        "core",
        "ctl",
        "fill_limit",
        "hbuf",
        "heap",
        "hwords",
        "mask",
        "max_items",
        "name",
        "shift",
        "slots",
        "table_offsets",
        "tables",
    )

    def __init__(self, buf: memoryview, geometry: Geometry, name: str) -> None:
        self.name = name
        self.buf = buf
        self.hbuf = buf[geometry.heap : geometry.heap + geometry.heap_size]
        self.hwords = self.hbuf[: len(self.hbuf) & ~7].cast("Q")
        self.heap = Heap.open(self.hbuf, 0, geometry.heap_size)
        self.ctl = Control(buf[geometry.control : geometry.control + 8 * 11].cast("Q"))
        table_bytes = 8 * geometry.slots
        self.tables = (
            buf[geometry.table : geometry.table + table_bytes].cast("Q"),
            buf[geometry.table + table_bytes : geometry.table + 2 * table_bytes].cast("Q"),
        )
        self.table_offsets = (geometry.table, geometry.table + table_bytes)
        self.slots = geometry.slots
        self.max_items = geometry.max_items
        self.mask = geometry.slots - 1
        self.shift = fibonacci_shift(geometry.slots)
        self.fill_limit = fill_limit(geometry.slots)
        self.core = self._native_core(buf) if _accel.lib is not None else None

    def _native_core(self, buf: memoryview) -> NativeCore | None:
        """The accelerator's view of this block (it keeps a view of its own: the mapping stays
        while a call into it runs); ``None`` where the block is not writable."""
        assert _accel.lib is not None
        address = _accel.address_of
        ctl, heap = address(self.ctl.words), address(self.hbuf)
        tables = [address(table) for table in self.tables]
        if not (ctl and all(tables) and heap):
            return None
        return _accel.lib.Core(
            pins=buf[:],
            ctl=ctl,
            table0=tables[0],
            table1=tables[1],
            slots=self.slots,
            hbuf=heap,
            hbuf_len=len(self.hbuf),
            max_items=self.max_items,
            fill_limit=self.fill_limit,
        )

    def release(self) -> None:
        """Release every view of the block (the caller releases ``buf``)."""
        self.core = None  # its own view goes with the last call into it
        self.heap.release()
        self.ctl.release()
        for view in (self.hwords, self.hbuf, *self.tables):
            view.release()

    def active(self) -> memoryview:
        """The active slot table."""
        return self.tables[self.ctl.words[ACTIVE] & 1]

    # -- lookup ---------------------------------------------------------------------------

    def probe(self, encoded: bytes, key_hash: int) -> tuple[int, int, int]:
        """Find ``encoded`` in the active table.

        Returns ``(index, word, insert_at)``: the slot index and word of the key;
        when absent, index -1, the word of the slot where the key would go (0 or
        a tombstone) and that slot's index.
        """
        core = self.core
        if core is not None:  # the accelerator: this probe in C
            found = core.probe(encoded, key_hash)
            if type(found) is tuple:
                return found
            raise self._status_error(found)  # type: ignore[arg-type]
        table = self.tables[self.ctl.words[ACTIVE] & 1]
        index = ((key_hash * 0x9E3779B1) & 0xFFFFFFFF) >> self.shift
        word = table[index]
        if not word:
            return -1, 0, index
        tag = (key_hash & 0xFFFFFF) << OFFSET_BITS
        if word & TAG_MASK == tag:  # the common hit: the key in its home slot
            entry = word & OFFSET_MASK
            length = len(encoded)
            if self.hwords[entry >> 3] & 0xFFFFFFFF == length:
                start = entry + ENTRY_HEADER
                if self.hbuf[start : start + length] == encoded:
                    return index, word, -1
        return self._probe_chain(table, index, tag, encoded)

    def _probe_chain(
        self, table: memoryview, index: int, tag: int, encoded: bytes
    ) -> tuple[int, int, int]:
        """The rest of :meth:`probe`: walk the chain from the occupied slot ``index``."""
        mask = self.mask
        hwords, hbuf = self.hwords, self.hbuf
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
            elif word & TAG_MASK == tag:
                entry = word & OFFSET_MASK
                if hwords[entry >> 3] & 0xFFFFFFFF == length:
                    start = entry + ENTRY_HEADER
                    if hbuf[start : start + length] == encoded:
                        return index, word, insert_at
        if insert_at >= 0:
            return -1, TOMBSTONE, insert_at
        raise LayoutError(f"SharedDict {self.name!r}: hash table has no empty slot (corrupt)")

    def _status_error(self, status: int) -> Exception:
        """The error the pure path raises where the accelerator answers ``status``."""
        if status == _STATUS_NO_EMPTY_SLOT:
            return LayoutError(f"SharedDict {self.name!r}: hash table has no empty slot (corrupt)")
        if status == _STATUS_CORRUPT:
            return IndexError(f"SharedDict {self.name!r}: an entry lies outside the heap (corrupt)")
        return LayoutError(f"SharedDict {self.name!r}: table status {status} (corrupt)")

    def entry_value(self, entry: int) -> tuple[int, memoryview]:
        """``(kind, bytes)`` of the current value of ``entry`` (a view into the block)."""
        core = self.core
        if core is not None:  # the accelerator: this in C
            kind, start, length = core.entry_value(entry)
            return kind, self.hbuf[start : start + length]
        hwords = self.hwords
        at = entry >> 3
        state = hwords[at + 1]
        start = entry + ENTRY_HEADER + key_room(hwords[at])
        if state & HIGH_BIT:  # the second value area is the current one
            start += hwords[at + 2] & LOW63
        return (state & KIND_MASK) >> KIND_SHIFT, self.hbuf[start : start + (state & LENGTH_MASK)]

    def entry_key(self, entry: int) -> object:
        """The key of ``entry``, as first inserted."""
        sizes = self.hwords[entry >> 3]
        key_length, original_length = sizes & 0xFFFFFFFF, sizes >> 32
        start = entry + ENTRY_HEADER
        if original_length:
            start += key_length
            return pickle.loads(self.hbuf[start : start + original_length])
        return decode_key(bytes(self.hbuf[start : start + key_length]))

    def load_value(self, entry: int) -> Any:
        """The value of ``entry`` as an object."""
        kind, data = self.entry_value(entry)
        try:
            return decode_value(kind, data)
        finally:
            data.release()

    def entry_fits(self, entry: int) -> bool:
        """Whether the sizes in ``entry``'s words fit its heap payload (a repair check)."""
        hwords = self.hwords
        at = entry >> 3
        sizes, state, areas_word = hwords[at], hwords[at + 1], hwords[at + 2]
        areas = 2 if areas_word & HIGH_BIT else 1
        capacity = areas_word & LOW63
        kind = (state & KIND_MASK) >> KIND_SHIFT
        needed = ENTRY_HEADER + key_room(sizes) + areas * capacity
        return (
            kind in (PICKLED, INT64, FLOAT64)
            and state & LENGTH_MASK <= capacity
            and needed <= self.heap.payload_size(entry)
        )

    def live_words(self) -> list[int]:
        """The words of every occupied slot of the active table."""
        return [word for word in self.active().tolist() if word > TOMBSTONE]

    # -- mutation (lock held, inside a recorded mutation) ---------------------------------

    def rebuild(self, live: list[int] | None = None) -> None:
        """Copy the live slots (or ``live``) into the inactive table, then switch to it."""
        ctl, hwords, hbuf = self.ctl, self.hwords, self.hbuf
        active = ctl.words[ACTIVE] & 1
        target = self.tables[1 - active]
        words = self.live_words() if live is None else live
        if len(words) >= self.fill_limit:  # cannot happen unless the block was damaged
            raise LayoutError(
                f"SharedDict {self.name!r}: table holds {len(words)} entries (corrupt)"
            )
        offset = self.table_offsets[1 - active]
        self.buf[offset : offset + 8 * self.slots] = bytes(8 * self.slots)
        mask, shift = self.mask, self.shift
        for word in words:
            entry = word & OFFSET_MASK
            start = entry + ENTRY_HEADER
            key_hash = _crc32(hbuf[start : start + (hwords[entry >> 3] & 0xFFFFFFFF)])
            index = ((key_hash * 0x9E3779B1) & 0xFFFFFFFF) >> shift
            while target[index]:
                index = (index + 1) & mask
            target[index] = (key_hash & 0xFFFFFF) << OFFSET_BITS | entry
        ctl.words[ACTIVE] = 1 - active
        ctl.words[TOMBSTONES] = 0

    def put(
        self,
        encoded: bytes,
        key_hash: int,
        original: bytes,
        value: Value,
        journal: UpdateJournal | None = None,
    ) -> tuple[int, int]:
        """Store the value and publish it; return ``(slot index, replaced word)``.

        An existing key whose entry has a spare value area large enough is
        updated in place (``replaced`` is 0 then). Else a new entry is written
        and published with one store to the slot; the replaced entry (word >
        1) is NOT freed: the caller frees it once the whole operation has
        succeeded. On AllocationError nothing changed. With a ``journal`` (an
        update in progress), nothing is done in place and the slot's old word
        is appended to the journal before the slot changes, so a crash can be
        rolled back.
        """
        kind, data = value
        core = self.core
        if core is not None:  # the accelerator: this put in C
            at = journal.offset if journal is not None else 0
            done = core.put(encoded, key_hash, original, kind, data, at)
            if type(done) is tuple and done[0] >= 0:
                return done
            if type(done) is tuple:  # (STATUS_HEAP_FULL, bytes requested)
                raise self.heap._full(done[1])
            if done == _STATUS_TABLE_FULL:
                raise self._table_full()
            live = len(self.live_words())
            if done == _STATUS_CORRUPT and live >= self.fill_limit:  # the rebuild refused
                raise LayoutError(f"SharedDict {self.name!r}: table holds {live} entries (corrupt)")
            raise self._status_error(done)  # type: ignore[arg-type]
        index, old_word, insert_at = self.probe(encoded, key_hash)
        ctl, hwords, hbuf = self.ctl.words, self.hwords, self.hbuf
        length = len(data)
        if index >= 0:
            old_entry = old_word & OFFSET_MASK
            at = old_entry >> 3
            sizes, areas_word = hwords[at], hwords[at + 2]
            if journal is None and areas_word & HIGH_BIT and length <= areas_word & LOW63:
                state = hwords[at + 1]
                start = old_entry + ENTRY_HEADER + key_room(sizes)
                if not state & HIGH_BIT:
                    start += areas_word & LOW63
                hbuf[start : start + length] = data
                hwords[at + 1] = (~state & HIGH_BIT) | kind << KIND_SHIFT | length  # publish
                return index, 0
            if sizes >> 32:  # keep the key as first inserted, as a dict does
                start = old_entry + ENTRY_HEADER + (sizes & 0xFFFFFFFF)
                original = bytes(hbuf[start : start + (sizes >> 32)])
            else:
                original = b""
            # An update: a small value gets two areas, so that its next updates go in place.
            areas_word, room = TWO_AREAS[length] if length <= TWO_AREA_LIMIT else (length, length)
        else:
            if ctl[COUNT] >= self.max_items:
                raise self._table_full()
            if ctl[COUNT] + ctl[TOMBSTONES] >= self.fill_limit and not old_word:
                self.rebuild()
                _, old_word, insert_at = self.probe(encoded, key_hash)
            index = insert_at
            areas_word = room = max(8, length)  # born compact: one area of its own size
        sizes = len(encoded) | len(original) << 32
        key_bytes = key_room(sizes)
        entry = self.heap.alloc(ENTRY_HEADER + key_bytes + room)
        header = _ENTRY_WORDS.pack(sizes, kind << KIND_SHIFT | length, areas_word)
        start = entry + ENTRY_HEADER
        hbuf[entry:start] = header
        hbuf[start : start + len(encoded)] = encoded
        if original:
            hbuf[start + len(encoded) : start + len(encoded) + len(original)] = original
        hbuf[start + key_bytes : start + key_bytes + length] = data
        if journal is not None:
            journal.record(index, old_word)
        table = self.tables[ctl[ACTIVE] & 1]
        table[index] = (key_hash & 0xFFFFFF) << OFFSET_BITS | entry  # publish: one store
        if old_word <= TOMBSTONE:  # a new key
            ctl[COUNT] = ctl[COUNT] + 1
            if old_word:
                ctl[TOMBSTONES] -= 1
        return index, old_word

    def _table_full(self) -> TableFullError:
        count = self.ctl.count
        return TableFullError(
            f"SharedDict {self.name!r} is full: {count} keys of max_items {self.max_items}", 1
        )

    def set_number(self, entry: int, value: Value) -> bool:
        """Replace the raw number of ``entry`` by ``value`` (kind and 8 bytes) with one store.

        Returns ``False`` (and changes nothing) where that cannot be one store:
        the entry holds no raw number, or a one-area entry would change kind.
        """
        kind, raw = value
        core = self.core
        if core is not None:  # the accelerator: this in C
            return core.set_number(entry, kind, raw)
        hwords = self.hwords
        at = entry >> 3
        state, areas_word = hwords[at + 1], hwords[at + 2]
        old_kind = (state & KIND_MASK) >> KIND_SHIFT
        if old_kind not in (INT64, FLOAT64) or len(raw) != 8:
            return False
        start = entry + ENTRY_HEADER + key_room(hwords[at])  # 8-aligned: entries are 16-aligned
        if areas_word & HIGH_BIT:  # two areas: write the spare one, then flip (one store)
            if not state & HIGH_BIT:
                start += areas_word & LOW63
            self.hbuf[start : start + 8] = raw
            hwords[at + 1] = (~state & HIGH_BIT) | kind << KIND_SHIFT | 8
            return True
        if kind != old_kind:
            return False
        hwords[start >> 3] = int.from_bytes(raw, "little")  # one aligned 8-byte store
        return True

    def unpublish(self, index: int, word: int) -> None:
        """Empty slot ``index`` (holding ``word``) and free its entry."""
        core = self.core
        if core is not None:  # the accelerator: this in C
            if core.unpublish(index, word):
                self.heap.free(word & OFFSET_MASK)  # refused: the same checks say why
            return
        ctl = self.ctl.words
        table = self.tables[ctl[ACTIVE] & 1]
        if table[(index + 1) & self.mask]:
            table[index] = TOMBSTONE
            ctl[TOMBSTONES] += 1
        else:
            table[index] = 0  # nothing probes past an empty successor
        ctl[COUNT] -= 1
        self.heap.free(word & OFFSET_MASK)

    def reset(self) -> None:
        """Remove every entry: switch to the emptied inactive table, then empty the heap."""
        ctl = self.ctl.words
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
        count = self.ctl.count
        if len(live) != count:
            raise LayoutError(f"count {count} != {len(live)} live slots")
        if words.count(TOMBSTONE) != self.ctl.tombstones:
            raise LayoutError("tombstone count is wrong")
        if self.heap.gc_stats()["allocated_blocks"] != len(live) + extra_blocks:
            raise LayoutError("allocated heap blocks != live entries (leak)")
        for word in live:
            entry = word & OFFSET_MASK
            if not self.entry_fits(entry):
                raise LayoutError(f"entry at {entry} does not fit its heap block")
            start = entry + ENTRY_HEADER
            encoded = bytes(self.hbuf[start : start + (self.hwords[entry >> 3] & 0xFFFFFFFF)])
            if self.probe(encoded, _crc32(encoded))[1] != word:
                raise LayoutError(f"entry at {entry} is not reachable by probing")
