"""The SharedDict layers alone, over a plain bytearray: the hash table and the crash journal."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from shared_memory_array._dict import _journal
from shared_memory_array._dict._journal import Journal, UpdateJournal
from shared_memory_array._dict._keys import encode_key
from shared_memory_array._dict._layout import OFFSET_MASK, PICKLED, Geometry
from shared_memory_array._dict._table import Table
from shared_memory_array._heap import Heap
from shared_memory_array.errors import AllocationError


def make_table(max_items: int = 16, heap_size: int = 1 << 14) -> Table:
    """A table over a private bytearray laid out as a dict block (control area at 64)."""
    geometry = Geometry.plan(64, max_items, heap_size)
    buf = memoryview(bytearray(geometry.block_size))
    Heap.format(buf[geometry.heap : geometry.block_size], 0, geometry.heap_size)
    return Table(buf, geometry, "unit")


def put(
    table: Table, key: str, value: bytes, journal: UpdateJournal | None = None
) -> tuple[int, int]:
    encoded = encode_key(key)[0]
    return table.put(encoded, zlib.crc32(encoded), b"", (PICKLED, value), journal)


def contents(table: Table) -> dict[Any, bytes]:
    return {
        table.entry_key(word & OFFSET_MASK): bytes(table.entry_value(word & OFFSET_MASK)[1])
        for word in table.live_words()
    }


def test_table_put_probe_remove_and_rebuild() -> None:
    """Entries put in the table are found, replaced, removed, and survive a table rebuild."""
    table = make_table()
    for i in range(10):
        put(table, f"k{i}", b"v%d" % i)
    index, replaced = put(table, "k3", b"first update")
    assert replaced > 1  # born compact: the first update writes an entry with two areas
    table.heap.free(replaced & OFFSET_MASK)
    index, replaced = put(table, "k3", b"replaced")
    assert replaced == 0  # from then on a small value is updated in place
    encoded = encode_key("k4")[0]
    index, word, _ = table.probe(encoded, zlib.crc32(encoded))
    table.unpublish(index, word)
    table.rebuild()
    expected = {f"k{i}": b"v%d" % i for i in range(10) if i != 4}
    assert contents(table) == {**expected, "k3": b"replaced"}
    table.check()
    for i in range(table.max_items - len(table.live_words())):
        put(table, f"more{i}", b"x")
    with pytest.raises(AllocationError):
        put(table, "one too many", b"x")
    table.check()


def crashed_update(table: Table) -> tuple[Journal, dict[Any, bytes]]:
    """A table left as by an update killed after changing 4 of its 6 slots."""
    for i in range(6):
        put(table, f"k{i}", b"old")
    before = contents(table)
    journal = Journal(table, lambda: None)
    journal.begin()
    recorder = journal.arm(6)
    for i in (0, 1, 7, 8):  # two replaced keys, two new ones
        put(table, f"k{i}", b"new", recorder)
    return journal, before


def test_journal_repair_rolls_back_an_update_cut_short() -> None:
    """Repair after an update cut short restores every old slot, reclaims the heap, disarms."""
    table = make_table()
    journal, before = crashed_update(table)
    assert contents(table) != before
    journal.repair()
    assert contents(table) == before
    assert table.ctl.journal == 0
    assert table.ctl.holder_pid == 0
    table.check()


@pytest.mark.parametrize("step", ["restore", "rebuild", "free", "fits"])
def test_journal_repair_interrupted_at_any_step_is_finished_by_the_next(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repair that dies at any of its steps leaves the marker set; the next one completes it."""
    table = make_table()
    journal, before = crashed_update(table)

    class Killed(BaseException):
        """Stands for the repairing process being killed."""

    def die(*args: object) -> None:
        raise Killed

    calls = [0]
    original_restore = _journal.restore_slot

    def restore_then_die(slots: memoryview, index: int, word: int) -> None:
        original_restore(slots, index, word)
        calls[0] += 1
        if calls[0] == 2:
            raise Killed

    with monkeypatch.context() as patch:
        if step == "restore":
            patch.setattr(_journal, "restore_slot", restore_then_die)
        elif step == "rebuild":
            patch.setattr(Heap, "rebuild", die)
        elif step == "free":
            patch.setattr(Heap, "free", die)  # disarming the journal, step 5
        else:
            patch.setattr(Table, "entry_fits", die)
        with pytest.raises(Killed):
            journal.repair()
    assert table.ctl.holder_pid != 0  # the next locker repairs again
    journal.repair()
    assert contents(table) == before
    assert table.ctl.journal == 0
    table.check()
