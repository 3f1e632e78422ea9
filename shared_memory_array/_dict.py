"""``SharedDict``: a process-shared mapping in one block (header, table, heap).

Layout of the block
-------------------
* The header (kind ``dict``; see ``_header``). Its ``extra`` holds the geometry,
  six little-endian uint64: control-area offset, table offset, slot count,
  max_items, heap offset, heap size. The header never changes after creation.
* The control area, eight uint64 words: the version (bumped by every
  mutation), the item count, the tombstone count, which of the two tables is
  active, the pid and start time of a process inside a mutation (0 when none),
  the number of crash repairs, and the heap offset of the journal of an
  ``update`` in progress (0 when none).
* Two hash tables of ``slot count`` uint64 slots each; one is active. A slot
  is 0 (empty), 1 (tombstone), or ``tag << 40 | entry offset``, where the tag
  is 24 bits of the key's hash. Open addressing with linear probing.
* The heap (``_heap``), holding one entry per key: three words (key length |
  original-key length << 32; value state: which value area is current << 63 |
  value length; two-areas flag << 63 | area capacity), the canonical key bytes
  (``_keys``), the key's pickle when the canonical form does not give it back
  exactly (``True``, ``1.0``), and one value area, or two for values of up to
  256 bytes, holding the value's pickle (protocol 5).

Atomicity and crash safety
--------------------------
Every mutation runs under :class:`~shared_memory_array._lock.BlockLock`
(``flock`` plus a thread lock); the kernel releases ``flock`` when its holder
dies, so a killed holder never blocks the others. A mutation first records
its pid in the control area and bumps the version, then writes a new entry in
free heap space, then publishes it with ONE aligned 8-byte store into its
slot, then frees the entry it replaced. A small
value replacing one of its size is written to the entry's spare value area and
published by one 8-byte store to the entry's state word. Table rebuilds fill
the inactive table and switch to it with one store. So a table slot always
points at a complete entry, and a process killed at any point
leaves every key with either its old or its new value, never a torn one.
``update`` is all-or-nothing even then: before changing a slot it appends the
slot's old word to a journal in the heap, and until its commit point (one
store clearing the journal's offset) a repair puts the old words back.

What a crash can leave behind is heap bookkeeping in mid-update, a leaked entry
and a wrong item count. The next process to take the lock sees the recorded pid
and repairs before doing anything else: it rebuilds the heap from the entries
the table references (reclaiming leaks) and recounts items and tombstones. This
covers a process dying anywhere inside a SharedDict operation (SIGKILL, a crash,
an exception); it does not cover another process scribbling over the block.

Reads are served from a per-handle cache of small values while the shared
version is unchanged; any mutation anywhere bumps the version, so a read never
returns a value older than the last completed write. A cache miss on x86 reads
the table without the lock, seqlock-style, and keeps the result only if no
mutation was in progress and the version did not move meanwhile (else, and on
other architectures, it reads under the lock); see :meth:`SharedDict._fetch`.
"""

from __future__ import annotations

import math
import os
import pickle
import platform
import re
import struct
import zlib
from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from types import TracebackType
from typing import Any, Final, NoReturn

from typing_extensions import Self

from ._block import PREFIX, SharedBlock
from ._header import BlockKind, align, encode_header, parse_header
from ._heap import Heap, heap_overhead
from ._keys import decode_key, encode_key
from ._lock import BlockLock
from ._process import current_identity
from .errors import AllocationError, BlockNotFoundError, LayoutError

__all__ = ["SharedDict", "ZeroCopyDict"]

_GEOMETRY = struct.Struct("<6Q")
_ENTRY_WORDS = struct.Struct("<3Q")
_CONTROL_WORDS: Final = 8
_VERSION, _COUNT, _TOMBSTONES, _ACTIVE, _HOLDER_PID, _HOLDER_START, _REPAIRS, _JOURNAL = range(8)
_OFFSET_BITS: Final = 40
_OFFSET_MASK: Final = (1 << _OFFSET_BITS) - 1
_TAG_MASK: Final = ~_OFFSET_MASK & 0xFFFFFFFFFFFFFFFF
_TOMBSTONE: Final = 1
_ENTRY_HEADER: Final = 24
_LOW63: Final = (1 << 63) - 1
_HIGH_BIT: Final = 1 << 63
_TWO_AREA_LIMIT: Final = 256  # values up to this size get two areas: updates in place
_MAX_SLOTS: Final = 1 << 31
_MIN_HEAP: Final = 4096
_MAX_BLOCK: Final = 1 << _OFFSET_BITS
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_PICKLE_PROTOCOL: Final = 5
_CACHE_MAX_ITEMS: Final = 1 << 16
_CACHE_MAX_VALUE: Final = 4096
# Keys whose dict equality matches canonical-bytes equality: cacheable by the key itself.
_CACHEABLE_KEYS: Final = frozenset({str, int, bytes, float, bool, type(None)})
_IMMUTABLE_VALUES: Final = frozenset({str, int, bytes, float, bool, complex, type(None)})
_MISSING: Final = object()
_dumps = pickle.dumps
_loads = pickle.loads
# x86 keeps loads in order and stores in order (TSO): the seqlock-style lock-free read
# of _fetch is sound there. Elsewhere every read takes the lock.
_LOCK_FREE_READS: Final = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}
_crc32 = zlib.crc32
_identity = [current_identity()]  # (pid, start time), refreshed in a forked child


def _refresh_identity() -> None:
    _identity[0] = current_identity()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh_identity)
_ABSENT: Final = object()  # cached "no such key"


class _Pickled(bytes):
    """A cached value kept as its pickle: each read gets a fresh object."""


class _Closed:
    """Stands in for every view of a closed dict, so any use raises a clear error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _fail(self, *args: object) -> NoReturn:
        raise ValueError(f"SharedDict {self.name!r} is closed")

    __getitem__ = __setitem__ = acquire = _fail


def _two_areas(length: int) -> tuple[int, int]:
    """Return (third entry word, bytes of both areas) for a new ``length``-byte value."""
    area = max(16, (length + (length >> 2) + 7) & ~7)  # room to grow a little
    return _HIGH_BIT | area, 2 * area


_TWO_AREAS: Final = [_two_areas(length) for length in range(_TWO_AREA_LIMIT + 1)]  # by length


def _fibonacci_shift(slots: int) -> int:
    return 32 - (slots.bit_length() - 1)


def _slot_count(max_items: int) -> int:
    """Slots for ``max_items`` keys: a power of two with load at most 0.7."""
    return max(8, 1 << (math.ceil(max_items / 0.7) - 1).bit_length())


def _fill_limit(slots: int) -> int:
    """Used + tombstone slots above which the table is rebuilt."""
    return slots * 7 // 8


def _block_name(name: object, *, for_attach: bool) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a SharedDict name must be a str, not {type(name).__name__}")
    if not _NAME_PATTERN.fullmatch(name):
        message = (
            f"{name!r} is not a valid SharedDict name: use 1 to 200 letters, digits, '_', '.', '-'"
        )
        if for_attach:
            raise BlockNotFoundError(name, message)
        raise ValueError(message)
    return name if name.startswith(PREFIX) else PREFIX + name


class _Geometry:
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

    def pack(self) -> bytes:
        return _GEOMETRY.pack(
            self.control, self.table, self.slots, self.max_items, self.heap, self.heap_size
        )

    @classmethod
    def unpack(cls, extra: bytes, *, data_offset: int, block_size: int, where: str) -> _Geometry:
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
        if block_size >= _MAX_BLOCK:
            raise LayoutError(f"{where}: block of {block_size} bytes is too large for a dict")
        if control != data_offset:
            raise LayoutError(f"{where}: control offset {control} != data offset {data_offset}")
        if table % 8 or table < control + 8 * _CONTROL_WORDS:
            raise LayoutError(f"{where}: table offset {table} is invalid (control at {control})")
        if not 8 <= slots <= _MAX_SLOTS or slots & (slots - 1):
            raise LayoutError(f"{where}: slot count {slots} is not a power of two in [8, 2**31]")
        if not 1 <= max_items < _fill_limit(slots):
            raise LayoutError(f"{where}: max_items {max_items} does not fit {slots} slots")
        if heap % 64 or heap < table + 16 * slots:
            raise LayoutError(f"{where}: heap offset {heap} overlaps the tables or is unaligned")
        if heap_size < _MIN_HEAP or heap + heap_size > block_size:
            raise LayoutError(
                f"{where}: heap of {heap_size} bytes at {heap} does not fit the "
                f"{block_size}-byte block"
            )
        return geometry


class _DictLock:
    """``d.lock()``: hold the dict's lock for several operations."""

    __slots__ = ("_owner",)

    def __init__(self, owner: SharedDict) -> None:
        self._owner = owner

    def __enter__(self) -> SharedDict:
        self._owner._acquire()
        return self._owner

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner._lock.release()


class _SnapshotItems(ItemsView[Any, Any]):
    def __init__(self, owner: SharedDict) -> None:
        super().__init__(owner)
        self._owner = owner

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._owner._snapshot(values=True))


class _SnapshotValues(ValuesView[Any]):
    def __init__(self, owner: SharedDict) -> None:
        super().__init__(owner)
        self._owner = owner

    def __iter__(self) -> Iterator[Any]:
        return iter([value for _, value in self._owner._snapshot(values=True)])


class SharedDict(MutableMapping[Any, Any]):
    """A mapping shared by every process that attaches to it by name.

    Use :meth:`create` or :meth:`attach`. Keys are any hashable, picklable
    values (``1``, ``1.0`` and ``True`` are one key, as in a dict); values are
    any picklable objects and are copied in and out. Every operation is atomic
    across threads and processes; ``with d.lock():`` makes several one.

    Attributes
    ----------
    name : str
        The name given to :meth:`create` / :meth:`attach`.
    block_name : str
        The shared-memory block's name (``sma_`` + name).
    max_items : int
        How many distinct keys always fit.
    """

    name: str
    block_name: str
    max_items: int
    _block: SharedBlock | None = None
    _lock: BlockLock
    _heap: Heap
    _buf: memoryview
    _words: memoryview
    _ctl: memoryview
    _tables: tuple[memoryview, memoryview]
    _table_offsets: tuple[int, int]
    _slots: int
    _mask: int
    _shift: int
    _fill_limit: int
    _heap_start: int
    _heap_end: int
    _cache: dict[object, object]
    _cache_version: int

    def __init__(self) -> None:
        raise TypeError("use SharedDict.create() or SharedDict.attach()")

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, max_items: int = 10_000, heap_size: int = 100 * 2**20) -> Self:
        """Create a new shared dict.

        Parameters
        ----------
        name
            1 to 200 letters, digits, ``_``, ``.`` or ``-``; the block is named
            ``sma_`` + name (unless name already starts with ``sma_``).
        max_items
            Distinct keys that always fit.
        heap_size
            Bytes for keys and values (each entry takes 16 + its key and value
            pickles, rounded up to 16, plus 16 bytes of allocator tags).

        Raises
        ------
        FileExistsError
            A block of that name exists.
        AllocationError
            The system cannot provide the shared memory.
        ValueError, TypeError
            A bad name or size.
        """
        block_name = _block_name(name, for_attach=False)
        for label, value, low in (("max_items", max_items, 1), ("heap_size", heap_size, _MIN_HEAP)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be an int, not {type(value).__name__}")
            if value < low:
                raise ValueError(f"{label} must be at least {low}, got {value}")
        slots = _slot_count(max_items)
        if slots > _MAX_SLOTS:
            raise ValueError(f"max_items {max_items} is too large")
        heap_size = align(heap_size + heap_overhead(), 64)
        probe = encode_header(BlockKind.DICT, extra=bytes(_GEOMETRY.size))
        control = len(probe)
        table = control + 8 * _CONTROL_WORDS
        heap = align(table + 16 * slots, 64)
        total = heap + heap_size
        if total >= _MAX_BLOCK:
            raise ValueError(f"a dict block of {total} bytes is too large")
        geometry = _Geometry(control, table, slots, max_items, heap, heap_size)
        header = encode_header(BlockKind.DICT, nbytes=total - control, extra=geometry.pack())
        block = SharedBlock.create(total, name=block_name)
        try:
            Heap.format(block.buf, heap, heap_size)
            block.buf[: len(header)] = header  # last: attach refuses the block until now
            return cls._open(block, name, geometry)
        except BaseException:
            block.close()
            block.unlink()
            raise

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to the dict that :meth:`create` made under ``name``.

        Raises
        ------
        BlockNotFoundError
            No such dict.
        LayoutError
            The block is not a dict, or its header or geometry is corrupt.
        """
        block_name = _block_name(name, for_attach=True)
        block = SharedBlock.attach(block_name)
        try:
            where = f"block {block_name!r}"
            header = parse_header(block.buf, expected_kind=BlockKind.DICT, name=block_name)
            geometry = _Geometry.unpack(
                header.extra, data_offset=header.data_offset, block_size=block.size, where=where
            )
            return cls._open(block, name, geometry)
        except BaseException:
            block.close()
            raise

    @classmethod
    def _open(cls, block: SharedBlock, name: str, geometry: _Geometry) -> Self:
        self = object.__new__(cls)
        self.name = name
        self.block_name = block.name
        self.max_items = geometry.max_items
        buf = block.buf
        self._heap = Heap.open(buf, geometry.heap, geometry.heap_size)
        self._block = block
        self._buf = buf
        self._words = buf[: len(buf) & ~7].cast("Q")
        self._ctl = buf[geometry.control : geometry.control + 8 * _CONTROL_WORDS].cast("Q")
        table_bytes = 8 * geometry.slots
        self._tables = (
            buf[geometry.table : geometry.table + table_bytes].cast("Q"),
            buf[geometry.table + table_bytes : geometry.table + 2 * table_bytes].cast("Q"),
        )
        self._table_offsets = (geometry.table, geometry.table + table_bytes)
        self._slots = geometry.slots
        self._mask = geometry.slots - 1
        self._shift = _fibonacci_shift(geometry.slots)
        self._fill_limit = _fill_limit(geometry.slots)
        self._heap_start = geometry.heap
        self._heap_end = geometry.heap + geometry.heap_size
        self._cache = {}
        self._cache_version = -1
        self._lock = BlockLock.for_block(block)
        return self

    # -- locking and crash repair ------------------------------------------------------

    def _acquire(self) -> None:
        """Take the lock; the first taker after a crashed mutation repairs the dict."""
        if self._lock.acquire() and self._ctl[_HOLDER_PID]:
            self._repair_holding()

    def _repair_holding(self) -> None:
        """Repair with the lock just taken; release it if the repair fails."""
        try:
            self._repair()
        except BaseException:
            self._lock.release()
            raise

    def _begin(self) -> None:
        """Record a mutation in progress (lock held) and bump the version.

        This handle's cache stays valid across its own mutations (the caller
        updates or clears the entries it changes); another process's mutation
        since the cache was filled empties it.
        """
        ctl = self._ctl
        version = ctl[_VERSION]
        if version != self._cache_version:
            self._cache.clear()
        pid, start = _identity[0]
        ctl[_HOLDER_START] = start
        ctl[_HOLDER_PID] = pid
        ctl[_VERSION] = version + 1
        self._cache_version = version + 1

    def _end(self) -> None:
        """The mutation is complete: clear the in-progress record."""
        self._ctl[_HOLDER_PID] = 0

    def _roll_back_journal(self) -> None:
        """Undo the slot changes of an update that died before its commit point."""
        ctl, words = self._ctl, self._words
        journal = ctl[_JOURNAL]
        ctl[_JOURNAL] = 0
        if not self._heap_start < journal < self._heap_end or journal % 16:
            return  # not a journal this code wrote: nothing trustworthy to undo
        table = self._tables[ctl[_ACTIVE] & 1]
        records = min(words[journal >> 3], (self._heap.payload_size(journal) - 8) // 16)
        for record in reversed(range(records)):
            at = (journal >> 3) + 1 + 2 * record
            index, word = words[at], words[at + 1]
            if index < self._slots:
                table[index] = word

    def _repair(self) -> None:
        """Rebuild heap, counts and version after a process died mid-mutation."""
        if self._ctl[_JOURNAL]:
            self._roll_back_journal()
        table = self._tables[self._ctl[_ACTIVE] & 1]
        words = self._words
        live: dict[int, int] = {}  # entry offset -> slot index
        tombstones = 0
        for index, word in enumerate(table.tolist()):
            if word == _TOMBSTONE:
                tombstones += 1
            elif word:
                entry = word & _OFFSET_MASK
                if entry in live or not self._heap_start < entry < self._heap_end:
                    table[index] = _TOMBSTONE
                    tombstones += 1
                else:
                    live[entry] = index
        for entry in self._heap.rebuild(list(live)):
            table[live.pop(entry)] = _TOMBSTONE
            tombstones += 1
        for entry, index in list(live.items()):
            at = entry >> 3
            sizes, length, capacity = words[at], words[at + 1] & _LOW63, words[at + 2]
            areas = 2 if capacity & _HIGH_BIT else 1
            capacity &= _LOW63
            needed = _ENTRY_HEADER + (sizes & 0xFFFFFFFF) + (sizes >> 32) + areas * capacity
            if length > capacity or needed > self._heap.payload_size(entry):
                self._heap.free(entry)
                table[index] = _TOMBSTONE
                tombstones += 1
                del live[entry]
        ctl = self._ctl
        ctl[_COUNT] = len(live)
        ctl[_TOMBSTONES] = tombstones
        ctl[_REPAIRS] += 1
        ctl[_VERSION] += 1
        ctl[_HOLDER_PID] = 0
        self._cache.clear()

    def lock(self) -> _DictLock:
        """Return a context manager holding the dict's lock: one atomic step.

        Re-entrant within a thread (also across handles of the same dict in
        this process); excludes other threads and other processes.
        """
        return _DictLock(self)

    # -- table primitives (call with the lock held) ----------------------------------

    def _probe(self, encoded: bytes, key_hash: int) -> tuple[int, int, int]:
        """Find ``encoded`` in the active table.

        Returns ``(index, word, insert_at)``: the slot index and word of the key;
        when absent, index -1, the word of the slot where the key would go (0 or
        a tombstone) and that slot's index.
        """
        table = self._tables[self._ctl[_ACTIVE] & 1]
        index = ((key_hash * 0x9E3779B1) & 0xFFFFFFFF) >> self._shift
        word = table[index]
        if not word:
            return -1, 0, index
        tag = (key_hash & 0xFFFFFF) << _OFFSET_BITS
        if word & _TAG_MASK == tag:  # the common hit: the key in its home slot
            entry = word & _OFFSET_MASK
            length = len(encoded)
            if self._words[entry >> 3] & 0xFFFFFFFF == length:
                start = entry + _ENTRY_HEADER
                if self._buf[start : start + length] == encoded:
                    return index, word, -1
        return self._probe_chain(table, index, tag, encoded)

    def _probe_chain(
        self, table: memoryview, index: int, tag: int, encoded: bytes
    ) -> tuple[int, int, int]:
        """The rest of :meth:`_probe`: walk the chain from the occupied slot ``index``."""
        mask = self._mask
        words, buf = self._words, self._buf
        length = len(encoded)
        insert_at = index if table[index] == _TOMBSTONE else -1
        for _ in range(self._slots):
            index = (index + 1) & mask
            word = table[index]
            if not word:
                return (-1, 0, index) if insert_at < 0 else (-1, _TOMBSTONE, insert_at)
            if word == _TOMBSTONE:
                if insert_at < 0:
                    insert_at = index
            elif word & _TAG_MASK == tag:
                entry = word & _OFFSET_MASK
                if words[entry >> 3] & 0xFFFFFFFF == length:
                    start = entry + _ENTRY_HEADER
                    if buf[start : start + length] == encoded:
                        return index, word, insert_at
        if insert_at >= 0:
            return -1, _TOMBSTONE, insert_at
        raise LayoutError(f"SharedDict {self.name!r}: hash table has no empty slot (corrupt)")

    def _entry_value(self, entry: int) -> memoryview:
        words = self._words
        at = entry >> 3
        sizes, state = words[at], words[at + 1]
        start = entry + _ENTRY_HEADER + (sizes & 0xFFFFFFFF) + (sizes >> 32)
        if state & _HIGH_BIT:  # the second value area is the current one
            start += words[at + 2] & _LOW63
        return self._buf[start : start + (state & _LOW63)]

    def _entry_key(self, entry: int) -> object:
        sizes = self._words[entry >> 3]
        key_length, original_length = sizes & 0xFFFFFFFF, sizes >> 32
        start = entry + _ENTRY_HEADER
        if original_length:
            start += key_length
            return pickle.loads(self._buf[start : start + original_length])
        return decode_key(bytes(self._buf[start : start + key_length]))

    def _rebuild_table(self) -> None:
        """Copy live slots into the inactive table, then switch to it (one store)."""
        ctl, words, buf = self._ctl, self._words, self._buf
        active = ctl[_ACTIVE] & 1
        source, target = self._tables[active], self._tables[1 - active]
        live = [word for word in source.tolist() if word > _TOMBSTONE]
        if len(live) >= self._fill_limit:  # cannot happen unless the block was damaged
            raise LayoutError(
                f"SharedDict {self.name!r}: table holds {len(live)} entries (corrupt)"
            )
        offset = self._table_offsets[1 - active]
        buf[offset : offset + 8 * self._slots] = bytes(8 * self._slots)
        mask, shift = self._mask, self._shift
        for word in live:
            entry = word & _OFFSET_MASK
            start = entry + _ENTRY_HEADER
            key_hash = _crc32(buf[start : start + (words[entry >> 3] & 0xFFFFFFFF)])
            index = ((key_hash * 0x9E3779B1) & 0xFFFFFFFF) >> shift
            while target[index]:
                index = (index + 1) & mask
            target[index] = word
        ctl[_ACTIVE] = 1 - active
        ctl[_TOMBSTONES] = 0

    def _put(
        self, encoded: bytes, key_hash: int, original: bytes, data: bytes, journal: int = 0
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
        index, old_word, insert_at = self._probe(encoded, key_hash)
        ctl, words, buf = self._ctl, self._words, self._buf
        if index >= 0:
            old_entry = old_word & _OFFSET_MASK
            at = old_entry >> 3
            sizes = words[at]
            capacity = words[at + 2]
            if not journal and capacity & _HIGH_BIT and len(data) <= capacity & _LOW63:
                state = words[at + 1]
                start = old_entry + _ENTRY_HEADER + (sizes & 0xFFFFFFFF) + (sizes >> 32)
                if not state & _HIGH_BIT:
                    start += capacity & _LOW63
                buf[start : start + len(data)] = data
                words[at + 1] = (~state & _HIGH_BIT) | len(data)  # publish: one store
                return index, 0
            if sizes >> 32:  # keep the key as first inserted, as a dict does
                start = old_entry + _ENTRY_HEADER + (sizes & 0xFFFFFFFF)
                original = bytes(buf[start : start + (sizes >> 32)])
            else:
                original = b""
        else:
            count = ctl[_COUNT]
            if count >= self.max_items:
                raise AllocationError(
                    f"SharedDict {self.name!r} is full: {count} keys of max_items {self.max_items}",
                    1,
                )
            if count + ctl[_TOMBSTONES] >= self._fill_limit and not old_word:
                self._rebuild_table()
                _, old_word, insert_at = self._probe(encoded, key_hash)
            index = insert_at
        key_length, original_length, length = len(encoded), len(original), len(data)
        if length <= _TWO_AREA_LIMIT:
            areas, capacity = _TWO_AREAS[length]
        else:
            areas = capacity = length
        entry = self._heap.alloc(_ENTRY_HEADER + key_length + original_length + capacity)
        written = (
            _ENTRY_WORDS.pack(key_length | original_length << 32, length, areas)
            + encoded
            + original
            + data
        )
        buf[entry : entry + len(written)] = written
        if journal:
            records = words[journal >> 3]
            at = (journal >> 3) + 1 + 2 * records
            words[at] = index
            words[at + 1] = old_word
            words[journal >> 3] = records + 1  # the record counts only once complete
        table = self._tables[ctl[_ACTIVE] & 1]
        table[index] = (key_hash & 0xFFFFFF) << _OFFSET_BITS | entry  # publish: one store
        if old_word <= _TOMBSTONE:  # a new key: ``count`` was read above
            ctl[_COUNT] = count + 1
            if old_word:
                ctl[_TOMBSTONES] -= 1
        return index, old_word

    def _remove(self, index: int, word: int) -> None:
        """Unpublish slot ``index`` and free its entry, as one mutation (lock held)."""
        self._begin()
        table = self._tables[self._ctl[_ACTIVE] & 1]
        if table[(index + 1) & self._mask]:
            table[index] = _TOMBSTONE
            self._ctl[_TOMBSTONES] += 1
        else:
            table[index] = 0  # nothing probes past an empty successor
        self._ctl[_COUNT] -= 1
        self._heap.free(word & _OFFSET_MASK)
        self._end()

    def _load_value(self, entry: int) -> Any:
        """Unpickle the value of ``entry`` (lock held)."""
        data = self._entry_value(entry)
        try:
            return pickle.loads(data)
        finally:
            data.release()

    def _remember(self, key: object, value: object, data: bytes | memoryview) -> None:
        """Cache ``key -> value`` (lock held, cache valid for the current version)."""
        cache = self._cache
        if len(cache) >= _CACHE_MAX_ITEMS:
            cache.clear()
        if type(value) in _IMMUTABLE_VALUES or value is _ABSENT:
            cache[key] = value
        elif len(data) <= _CACHE_MAX_VALUE:
            cache[key] = _Pickled(data)
        else:
            cache.pop(key, None)

    # -- the mapping -------------------------------------------------------------------

    def _fetch(self, encoded: bytes, key_hash: int) -> tuple[int, bytes | None]:
        """Return ``(version, value pickle or None if absent)``, one consistent snapshot.

        On x86 (whose loads and stores are not reordered with each other) the
        table is first read without the lock, seqlock-style: the read counts
        if no mutation was in progress at its start and the version did not
        move by its end. Otherwise, or if the read raced a writer, it is
        repeated under the lock. The value is copied out before it is checked
        and unpickled only after, so a torn read is never unpickled.
        """
        if _LOCK_FREE_READS:
            ctl = self._ctl
            version = ctl[_VERSION]
            if not ctl[_HOLDER_PID]:
                try:
                    index, word, _ = self._probe(encoded, key_hash)
                    data = bytes(self._entry_value(word & _OFFSET_MASK)) if index >= 0 else None
                except (IndexError, LayoutError):  # read a structure being changed
                    pass
                else:
                    if ctl[_VERSION] == version:
                        return version, data
        self._acquire()
        try:
            index, word, _ = self._probe(encoded, key_hash)
            data = bytes(self._entry_value(word & _OFFSET_MASK)) if index >= 0 else None
            return self._ctl[_VERSION], data
        finally:
            self._lock.release()

    def _remember_at(self, version: int, key: object, value: object, data: bytes) -> None:
        """Cache what was read at ``version`` if the dict is still at that version."""
        with self._lock.thread_lock:  # excludes this process's writers, who update the cache
            if self._ctl[_VERSION] != version:
                return
            if self._cache_version != version:
                self._cache.clear()
                self._cache_version = version
            self._remember(key, value, data)

    def __getitem__(self, key: object) -> Any:
        cacheable = type(key) in _CACHEABLE_KEYS
        if cacheable and self._ctl[_VERSION] == self._cache_version:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                if hit is _ABSENT:
                    raise KeyError(key)
                if type(hit) is _Pickled:
                    return _loads(hit)
                return hit
        encoded, _ = encode_key(key)
        version, data = self._fetch(encoded, _crc32(encoded))
        if data is None:
            if cacheable:
                self._remember_at(version, key, _ABSENT, b"")
            raise KeyError(key)
        value = _loads(data)
        if cacheable:
            self._remember_at(version, key, value, data)
        return value

    def __contains__(self, key: object) -> bool:
        cacheable = type(key) in _CACHEABLE_KEYS
        if cacheable and self._ctl[_VERSION] == self._cache_version:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit is not _ABSENT
        try:
            encoded, _ = encode_key(key)
        except TypeError:
            return False  # unhashable: in no dict
        version, data = self._fetch(encoded, _crc32(encoded))
        if data is None and cacheable:
            self._remember_at(version, key, _ABSENT, b"")
        return data is not None

    def __setitem__(self, key: object, value: object) -> None:
        encoded, exact = encode_key(key)
        data = _dumps(value, _PICKLE_PROTOCOL)
        original = b"" if exact else _dumps(key, _PICKLE_PROTOCOL)
        key_hash = _crc32(encoded)
        if self._lock.acquire() and self._ctl[_HOLDER_PID]:
            self._repair_holding()
        try:
            self._begin()
            try:
                replaced = self._put(encoded, key_hash, original, data)[1]
            except AllocationError:
                self._end()
                raise
            if replaced > _TOMBSTONE:
                self._heap.free(replaced & _OFFSET_MASK)
            self._end()
            if type(key) in _CACHEABLE_KEYS:
                self._remember(key, value, data)
            else:
                self._cache.clear()  # e.g. a str subclass may alias a cached str key
        finally:
            self._lock.release()

    def __delitem__(self, key: object) -> None:
        self._pop(key, _MISSING, want_value=False)

    def _pop(self, key: object, default: object, *, want_value: bool = True) -> Any:
        encoded, _ = encode_key(key)
        key_hash = zlib.crc32(encoded)
        self._acquire()
        try:
            index, word, _ = self._probe(encoded, key_hash)
            if index < 0:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            value = self._load_value(word & _OFFSET_MASK) if want_value else None
            self._remove(index, word)
            if type(key) in _CACHEABLE_KEYS:
                self._cache[key] = _ABSENT
            else:
                self._cache.clear()
            return value
        finally:
            self._lock.release()

    def pop(self, key: object, default: object = _MISSING) -> Any:
        """Remove ``key`` and return its value (``default`` if absent, else KeyError)."""
        return self._pop(key, default)

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return some ``(key, value)`` pair; KeyError when empty."""
        self._acquire()
        try:
            table = self._tables[self._ctl[_ACTIVE] & 1]
            for index, word in enumerate(table.tolist()):
                if word > _TOMBSTONE:
                    entry = word & _OFFSET_MASK
                    key, value = self._entry_key(entry), self._load_value(entry)
                    self._remove(index, word)
                    self._cache.clear()
                    return key, value
            raise KeyError("popitem(): SharedDict is empty")
        finally:
            self._lock.release()

    def setdefault(self, key: object, default: object = None) -> Any:
        """Return ``self[key]``, first storing ``default`` if ``key`` is absent (atomic)."""
        with self.lock():
            try:
                return self[key]
            except KeyError:
                self[key] = default
                return default

    def update(self, other: Any = (), /, **kwargs: object) -> None:
        """Store every pair of ``other`` and ``kwargs``: all of them, or none.

        Raises
        ------
        AllocationError
            The table or the heap cannot take them all; the dict is unchanged.
            The entries being replaced are freed only at the end, so the heap
            must hold the old and new values of replaced keys at once.
        """
        if isinstance(other, Mapping):
            pairs: Iterable[tuple[object, object]] = [(k, other[k]) for k in other]
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]  # noqa: SIM118 - duck-typed mapping
        else:
            pairs = list(other)
        items = []
        for key, value in [*pairs, *kwargs.items()]:
            encoded, exact = encode_key(key)
            original = b"" if exact else pickle.dumps(key, protocol=_PICKLE_PROTOCOL)
            data = pickle.dumps(value, protocol=_PICKLE_PROTOCOL)
            items.append((encoded, zlib.crc32(encoded), original, data))
        if not items:
            return
        self._acquire()
        try:
            ctl = self._ctl
            new_keys = {e for e, h, _, _ in items if self._probe(e, h)[0] < 0}
            count = ctl[_COUNT]
            if count + len(new_keys) > self.max_items:
                raise AllocationError(
                    f"SharedDict {self.name!r} cannot take {len(new_keys)} new keys: "
                    f"{count} of max_items {self.max_items} used",
                    len(new_keys),
                )
            self._begin()
            if count + ctl[_TOMBSTONES] + len(new_keys) > self._fill_limit:
                self._rebuild_table()  # now no _put below rebuilds: journal indices hold
            saved = (ctl[_COUNT], ctl[_TOMBSTONES])
            done: list[tuple[int, int]] = []
            try:
                journal = self._heap.alloc(8 + 16 * len(items))
                self._words[journal >> 3] = 0
                ctl[_JOURNAL] = journal  # from here a crash rolls the whole update back
                for encoded, key_hash, original, data in items:
                    done.append(self._put(encoded, key_hash, original, data, journal))
            except AllocationError:
                self._roll_back(done, saved)
                if ctl[_JOURNAL]:
                    ctl[_JOURNAL] = 0
                    self._heap.free(journal)
                self._end()
                raise
            ctl[_JOURNAL] = 0  # commit point
            self._heap.free(journal)
            for _, replaced in done:
                if replaced > _TOMBSTONE:
                    self._heap.free(replaced & _OFFSET_MASK)
            self._end()
            self._cache.clear()
        finally:
            self._lock.release()

    def _roll_back(self, done: list[tuple[int, int]], saved: tuple[int, int]) -> None:
        table = self._tables[self._ctl[_ACTIVE] & 1]
        for index, replaced in reversed(done):
            entry = table[index] & _OFFSET_MASK
            table[index] = replaced
            self._heap.free(entry)
        self._ctl[_COUNT], self._ctl[_TOMBSTONES] = saved

    def clear(self) -> None:
        """Remove every key (switches to the empty inactive table, then resets the heap)."""
        self._acquire()
        try:
            ctl = self._ctl
            self._begin()
            inactive = 1 - (ctl[_ACTIVE] & 1)
            offset = self._table_offsets[inactive]
            self._buf[offset : offset + 8 * self._slots] = bytes(8 * self._slots)
            ctl[_ACTIVE] = inactive
            ctl[_COUNT] = 0
            ctl[_TOMBSTONES] = 0
            self._heap.rebuild([])
            self._end()
            self._cache.clear()
        finally:
            self._lock.release()

    def __len__(self) -> int:
        return int(self._ctl[_COUNT])

    def _snapshot(self, *, values: bool) -> list[tuple[Any, Any]]:
        """``(key, value or None)`` for every entry, taken in one atomic step."""
        result = []
        self._acquire()
        try:
            table = self._tables[self._ctl[_ACTIVE] & 1]
            for word in table.tolist():
                if word > _TOMBSTONE:
                    entry = word & _OFFSET_MASK
                    value = self._load_value(entry) if values else None
                    result.append((self._entry_key(entry), value))
        finally:
            self._lock.release()
        return result

    def __iter__(self) -> Iterator[Any]:
        return iter([key for key, _ in self._snapshot(values=False)])

    def keys(self) -> KeysView[Any]:
        """A view of the keys; each iteration walks a consistent snapshot."""
        return KeysView(self)

    def items(self) -> ItemsView[Any, Any]:
        """A view of ``(key, value)`` pairs; each iteration is a consistent snapshot."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[Any]:
        """A view of the values; each iteration is a consistent snapshot."""
        return _SnapshotValues(self)

    # -- inspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """Return table and heap figures.

        Returns
        -------
        dict
            ``used_slots`` (keys stored), ``max_items``, ``load_factor``
            (used_slots / max_items), ``slot_count``, ``tombstones``,
            ``heap_size`` (bytes blocks can occupy), ``heap_used`` (bytes in
            allocated blocks, tags included), ``heap_free``, ``version`` (number
            of mutations so far), ``repairs`` (crash repairs so far).
        """
        self._acquire()
        try:
            ctl = self._ctl
            count = int(ctl[_COUNT])
            return {
                "used_slots": count,
                "max_items": self.max_items,
                "load_factor": count / self.max_items,
                "slot_count": self._slots,
                "tombstones": int(ctl[_TOMBSTONES]),
                "heap_size": self._heap.capacity,
                "heap_used": self._heap.used,
                "heap_free": self._heap.capacity - self._heap.used,
                "version": int(ctl[_VERSION]),
                "repairs": int(ctl[_REPAIRS]),
            }
        finally:
            self._lock.release()

    def gc_stats(self) -> dict[str, int | float]:
        """Return the heap's free-space figures.

        Returns
        -------
        dict
            ``total_free_blocks``, ``total_free_space`` (bytes),
            ``largest_free_block``, ``allocated_blocks``, ``fragmentation``
            (1 - largest free block / free space).
        """
        self._acquire()
        try:
            return self._heap.gc_stats()
        finally:
            self._lock.release()

    def _check(self) -> None:
        """Verify heap and table invariants (for tests); raise LayoutError on violation."""
        self._acquire()
        try:
            self._heap.check()
            table = self._tables[self._ctl[_ACTIVE] & 1]
            words = table.tolist()
            live = [w for w in words if w > _TOMBSTONE]
            if len(live) != self._ctl[_COUNT]:
                raise LayoutError(f"count {self._ctl[_COUNT]} != {len(live)} live slots")
            if words.count(_TOMBSTONE) != self._ctl[_TOMBSTONES]:
                raise LayoutError("tombstone count is wrong")
            if self._heap.gc_stats()["allocated_blocks"] != len(live):
                raise LayoutError("allocated heap blocks != live entries (leak)")
            for word in live:
                entry = word & _OFFSET_MASK
                start = entry + _ENTRY_HEADER
                encoded = bytes(self._buf[start : start + (self._words[entry >> 3] & 0xFFFFFFFF)])
                if self._probe(encoded, zlib.crc32(encoded))[1] != word:
                    raise LayoutError(f"entry at {entry} is not reachable by probing")
        finally:
            self._lock.release()

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Release this handle; idempotent. The creating process also unlinks the block.

        Other processes keep their mappings; no new process can attach after
        the creator closed.
        """
        block, self._block = self._block, None
        if block is None:
            return
        # Lock-free paths read _ctl, every other path takes _lock first: both raise now.
        closed = _Closed(self.name)
        control, self._ctl = self._ctl, closed  # type: ignore[assignment]
        lock, self._lock = self._lock, closed  # type: ignore[assignment]
        self._cache = {}
        self._cache_version = -1
        self._heap.release()
        for view in (self._words, control, *self._tables):
            view.release()
        self._buf.release()
        lock.release_ref()
        created_here = block.created_here
        block.close()
        if created_here:
            block.unlink()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this handle."""
        return self._block is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickling (e.g. to a spawned process) sends the name: the receiver attaches.
        return (type(self).attach, (self.name,))

    def __repr__(self) -> str:
        if self._block is None:
            return f"<SharedDict {self.name!r} closed>"
        return f"<SharedDict {self.name!r} {len(self)} of {self.max_items} keys>"


ZeroCopyDict = SharedDict
