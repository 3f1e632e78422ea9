"""A dict's data blocks: making one, opening one, and growing into a bigger one.

The dict is an entry block (the :class:`~._facade.SharedDict` handle's own)
plus one current data block, of generation ``g``, named
``<entry name>~<tag>~<g>`` (:mod:`._layout`); the tag is drawn from the entry
block's random id (:func:`dict_tag`), so a dict that was unlinked while still
in use and a newer dict of the same name never meet in a data block's name.
Memory is reserved as it is needed: a data block is sized
for its heap region at once, but only its control words, tables and the first
part of the heap (the heap's *limit*, :mod:`.._heap`) are reserved; the limit
rises, by doubling, as keys and values arrive (:meth:`DataBlock.reserve_heap`).

Growth (``grow=True``)
----------------------
When the table has no room for another key, or the heap region is used up,
the process that needs room *moves* the dict to a data block of the next
generation, twice as large where it is full (:func:`grow`). Under the dict's
lock:

1. the old block's mutation marker is set (:mod:`._journal`): readers that do
   not lock go to the locked path from now on;
2. the new block is created (a leftover of a mover that died is unlinked first:
   under the lock, nobody else can be making it), the heap region is copied
   into it byte for byte (offsets are relative to the region, so every entry
   and free list stays valid), the tables are rebuilt bigger, the control
   words carried over, and the header written last;
3. **commit**: one store of the new generation into the entry block;
4. the old block records what replaced it and its name is removed (and the
   name of the one before it, if a mover killed between 3 and 4 left it); its
   marker stays set for ever.

Every other holder notices at its next locked step (the entry's generation is
not its own) and follows to the new block, without re-attaching anything it
was given. A process killed before step 3 leaves the dict as it was (the next
locker repairs the old block's marker; the half-made block is nobody's and
goes to the reaper); after step 3, as it is after. Either leftover also goes
when the dict is unlinked (:func:`unlink_data_blocks`).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Final

from typing_extensions import Self

from .. import _reaper
from .._handle import BlockHandle
from .._header import BlockKind, Header, encode_header, header_size_for
from .._heap import Heap, heap_overhead
from .._platform import backend
from ..errors import BlockExistsError, LayoutError
from ._layout import EntryPage, Geometry
from ._table import Table

__all__ = [
    "INITIAL_HEAP_RESERVE",
    "DataBlock",
    "data_name",
    "data_names_through",
    "dict_tag",
    "grow",
    "unlink_data_blocks",
]

INITIAL_HEAP_RESERVE: Final = 64 << 10
"""Bytes of heap reserved when a growing dict is created (the limit doubles from there)."""
_HEAP_LIMIT_WORD: Final = struct.Struct("<Q")  # the heap's meta word 2: its limit
_GENERATED: Final = "~"
_TAG_BYTES: Final = 4
_MAX_GENERATIONS: Final = 128


def dict_tag(entry_block_id: bytes) -> str:
    """The part of a dict's data block names that no other dict of its name has.

    The first bytes of its entry block's random id, in hex. A dict that was
    unlinked and is still used, and a newer dict of the same name, so never
    share the name of a data block: neither can open or remove the other's.
    """
    return entry_block_id[:_TAG_BYTES].hex()


def data_name(entry_name: str, tag: str, generation: int) -> str:
    """The name of a dict's data block of ``generation`` (``~`` is in no dict name)."""
    return f"{entry_name}{_GENERATED}{tag}{_GENERATED}{generation}"


def _parse_data_name(name: str) -> tuple[str, str, int] | None:
    """``(entry name, tag, generation)`` of a data block's name, ``None`` if it is not one."""
    rest, _, generation = name.rpartition(_GENERATED)
    entry_name, _, tag = rest.rpartition(_GENERATED)
    if not entry_name or not generation.isdigit() or len(tag) != 2 * _TAG_BYTES:
        return None
    return entry_name, tag, int(generation)


def data_names_through(entry_name: str, tag: str, generation: int) -> list[str]:
    """Every name a data block of a dict now at ``generation`` may still have.

    The current generation's; the next one's, which a mover killed before its
    commit leaves; and every earlier one's, which a mover killed after its
    commit but before its unlinks leaves (each growth removes the one before
    the block it leaves; two such kills in a row leave an older one). Each
    growth step at least doubles the table or the heap, so a dict has at most
    a few dozen generations: more than :data:`_MAX_GENERATIONS` back is a
    corrupt word, and not looked for.
    """
    first = max(0, generation - _MAX_GENERATIONS)
    return [data_name(entry_name, tag, number) for number in range(first, generation + 2)]


class DataBlock(BlockHandle):
    """One data block of a dict (internal: a ``SharedDict`` handle holds it)."""

    KIND: ClassVar[BlockKind] = BlockKind.DICT_DATA
    KIND_NAME: ClassVar[str] = "dict data block"

    geometry: Geometry
    generation: int = 0
    entry_name: str = ""
    tag: str = ""

    @classmethod
    def create(
        cls,
        entry_name: str,
        tag: str,
        generation: int,
        max_items: int,
        heap_bytes: int,
        *,
        heap_reserve: int | None = None,
    ) -> Self:
        """A new, empty data block with a heap region of ``heap_bytes`` (a multiple of 64).

        The heap is reserved up to ``heap_reserve`` bytes (default: all of it).

        Raises
        ------
        BlockExistsError
            A block of that name exists.
        AllocationError
            The system cannot provide the memory to reserve.
        """
        name = data_name(entry_name, tag, generation)
        control = header_size_for(extra_len=Geometry.packed_size(), name=name)
        geometry = Geometry.plan(control, max_items, heap_bytes)
        limit = heap_bytes if heap_reserve is None else min(heap_bytes, heap_reserve)
        limit = -(-max(limit, heap_overhead() + 4096) // mmap.PAGESIZE) * mmap.PAGESIZE
        limit = min(limit, heap_bytes)
        header = encode_header(
            BlockKind.DICT_DATA,
            nbytes=geometry.block_size - control,
            extra=geometry.pack(),
            name=name,
        )
        reserved = geometry.heap + limit
        self = cls._create(geometry.block_size, name=name, reserve=reserved)
        with self._creating():
            block = self._live_block()
            block.make_present(0, reserved)
            Heap.format(block.buf[geometry.heap : geometry.block_size], 0, heap_bytes, limit)
            self.geometry, self.generation = geometry, generation
            self.entry_name, self.tag = entry_name, tag
            self._publish(header)  # last: attach waits for the block until now
            block.hold.drop_owner()  # the dict (its entry block) is owned, not its data
        return self

    @classmethod
    def open(cls, entry_name: str, tag: str, generation: int) -> Self:
        """Open the data block of ``generation`` of the dict ``entry_name`` tagged ``tag``.

        Raises
        ------
        BlockNotFoundError
            It is gone (the dict moved on, or ended).
        LayoutError
            It is not a dict data block, or its geometry is corrupt.
        """
        name = data_name(entry_name, tag, generation)
        self = cls._open(name)
        try:
            header, block = self._header, self._live_block()
            assert header is not None
            self.geometry = Geometry.unpack(
                header.extra,
                data_offset=header.data_offset,
                block_size=block.size,
                where=f"block {name!r}",
            )
            self.generation = generation
            self.entry_name, self.tag = entry_name, tag
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def _payload_end(cls, header: Header, read: Callable[[int, int], bytes]) -> int:
        """Pages up to the heap's limit must be there; the rest is not reserved yet."""
        try:
            geometry = Geometry.unpack(
                header.extra,
                data_offset=header.data_offset,
                block_size=header.data_offset + header.nbytes,
                where="dict data block",
            )
        except LayoutError:
            return header.data_offset + header.nbytes  # the opener reports it next
        (limit,) = _HEAP_LIMIT_WORD.unpack(read(8, geometry.heap + 16))
        return geometry.heap + (limit or geometry.heap_size)

    def table(self, dict_name: str) -> Table:
        """The table over this block (views of its mapping)."""
        return Table(self._live_block().buf, self.geometry, dict_name)

    def reserve_heap(self, table: Table, needed: int) -> bool:
        """Raise the heap's limit so that ``needed`` more bytes may fit; ``False`` if it cannot.

        Doubles the limit (at least by ``needed``), reserving and mapping in the
        pages first, up to the heap region's end. Inside a journalled mutation.

        Raises
        ------
        AllocationError
            The system cannot provide the pages.
        """
        heap = table.heap
        limit, size = heap.limit, heap.size
        if limit >= size:
            return False
        new_limit = min(size, max(2 * limit, limit + 2 * needed + 4096))
        new_limit = min(size, -(-new_limit // mmap.PAGESIZE) * mmap.PAGESIZE)
        block = self._live_block()
        start = self.geometry.heap + limit
        block.reserve(start, new_limit - limit)
        block.make_present(start, self.geometry.heap + new_limit)
        heap.extend(new_limit)
        return True

    def _pickle_state(self) -> tuple[Any, ...]:
        raise TypeError("a dict's data block is not pickled: pickle the SharedDict")


def _keep_while_current(facts: _reaper.BlockFacts) -> str | None:
    """The reaper's policy for data blocks: kept while their dict is kept and uses them.

    A data block nobody maps goes with its dict (when the dict's entry block
    is itself an orphan, or gone, or is another dict's of the same name) or
    once its dict has moved to a newer generation.
    """
    parsed = _parse_data_name(facts.header.name or facts.name)
    if parsed is None:
        return None
    entry_name, tag, generation = parsed
    system_name = backend.system_name(entry_name)
    entry = _reaper.judge(system_name)
    if entry.verdict is not _reaper.Verdict.KEEP or entry.header is None:
        return None  # the dict ended, or goes in this same scan
    if dict_tag(entry.header.block_id) != tag:
        return None  # the name now names another dict
    try:
        fd, _ = backend.open_for_judging(system_name)
    except OSError:
        return None
    try:
        word = backend.read_at(fd, 8, entry.header.data_offset)
    except OSError:
        return None
    finally:
        backend.close_descriptor(fd)
    if len(word) == 8 and int.from_bytes(word, "little") == generation:
        return f"the current data of dict {entry_name!r}"
    return None


def _data_of(facts: _reaper.BlockFacts) -> list[str]:
    """The data blocks that go with a dict's entry block.

    Its current generation's, and those a mover killed in a growth may have
    left (:func:`data_names_through`).
    """
    word = facts.read(8, facts.header.data_offset)
    if len(word) != 8:
        return []
    generation = int.from_bytes(word, "little")
    entry_name = facts.header.name or facts.name
    names = data_names_through(entry_name, dict_tag(facts.header.block_id), generation)
    return [
        backend.system_name(name) for name in names if backend.exists(backend.system_name(name))
    ]


_reaper.KIND_POLICIES[BlockKind.DICT_DATA] = _keep_while_current
_reaper.KIND_FOLLOWERS[BlockKind.DICT] = _data_of


def grow(
    old: DataBlock,
    old_table: Table,
    entry: EntryPage,
    dict_name: str,
    *,
    more_items: bool,
    more_heap: int,
) -> DataBlock:
    """Move the dict to a data block of the next generation (see the module docstring).

    ``more_items``: the table is full (the new one takes twice as many keys);
    ``more_heap``: bytes that must fit in the heap beyond what it holds now.
    The caller holds the dict's lock and has set the old block's mutation marker.

    Raises
    ------
    AllocationError
        The system cannot provide the memory; the dict is unchanged.
    """
    geometry = old.geometry
    max_items = geometry.max_items * 2 if more_items else geometry.max_items
    heap = old_table.heap
    heap_bytes = geometry.heap_size
    if more_heap:
        heap_bytes = -(-max(2 * heap_bytes, heap_bytes + 2 * more_heap) // 64) * 64
    target_limit = heap.limit + 2 * more_heap
    generation = old.generation + 1
    entry_name, tag = old.entry_name, old.tag
    try:
        new = DataBlock.create(
            entry_name, tag, generation, max_items, heap_bytes, heap_reserve=target_limit
        )
    except BlockExistsError:
        # Left by a mover of this dict that died before its commit (the name is this dict's
        # alone, dict_tag; we hold its lock: nobody else makes it).
        backend.unlink(backend.system_name(data_name(entry_name, tag, generation)))
        new = DataBlock.create(
            entry_name, tag, generation, max_items, heap_bytes, heap_reserve=target_limit
        )
    try:
        block = new._live_block()
        new_geometry = new.geometry
        used = min(heap.limit, new_geometry.heap_size)
        # The heap region, byte for byte: entries, tags and free lists keep their offsets.
        start = new_geometry.heap
        block.buf[start : start + used] = old_table.hbuf[:used]
        hwords = block.buf[start : start + 24].cast("Q")
        hwords[1] = new_geometry.heap_size  # the region's size is the new one's
        hwords[2] = used if used < new_geometry.heap_size else 0
        hwords.release()
        new_table = new.table(dict_name)
        if new_table.heap.limit < min(target_limit, new_table.heap.size):
            new.reserve_heap(new_table, target_limit - new_table.heap.limit)
        old_ctl, new_ctl = old_table.ctl, new_table.ctl
        new_table.rebuild(old_table.live_words())
        new_ctl.count = old_ctl.count
        new_ctl.repairs = old_ctl.repairs
        new_ctl.version = old_ctl.version + 1
        new_table.release()
    except BaseException:
        new.unlink()
        new.close()
        raise
    entry.generation = generation  # the commit point: one store
    old_table.ctl.superseded = generation
    old.unlink()
    if old.generation:  # a mover killed after its commit, before this unlink, left it
        backend.unlink(backend.system_name(data_name(entry_name, tag, old.generation - 1)))
    return new


def unlink_data_blocks(entry_name: str, tag: str, generation: int) -> None:
    """Remove the names of a dict's data blocks, the dict at ``generation`` being unlinked.

    Its current block's, and those a mover killed in a growth may have left
    (:func:`data_names_through`).
    """
    for name in data_names_through(entry_name, tag, generation):
        backend.unlink(backend.system_name(name))
