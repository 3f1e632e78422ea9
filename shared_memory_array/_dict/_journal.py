"""Crash safety of a dict's data block: the mutation marker, the update journal, repair.

Every rule below is followed with the dict's lock held (``_lock``); the kernel
drops that lock when its holder dies, so the next process to take it may find
a mutation cut short, by SIGKILL or by an exception, at any instruction.

The words (in the control area, see ``_layout``)
------------------------------------------------
``holder pid``, ``holder start``
    The mutation marker: non-zero while a mutation is in progress.
``version``
    Bumped at the start of every mutation and by every repair; readers that
    do not lock compare it before and after (seqlock-style).
``journal``
    0, or the heap offset of the journal of the ``update`` in progress.
``superseded``
    Set when a growth step moved the dict to a newer data block: a block
    superseded keeps its marker set for ever, so a reader that does not lock
    goes to the locked path, which follows the dict to the new block.
``repairs``
    How many repairs have completed.

Protocol of a mutation (:meth:`Journal.begin` ... :meth:`Journal.end`)
----------------------------------------------------------------------
1. Store ``holder start``, then ``holder pid`` (the marker), then ``version + 1``.
2. Write new entries only in free heap space and publish each with one 8-byte
   store (``_table``); free what it replaced only after publishing.
3. Store ``holder pid = 0``.

A mutation that raises after step 1 has the rest done by a repair before the
exception leaves the dict (:meth:`Journal.repair`, run by the failing call with
the lock still held), and an operation that finds the marker set when it takes
the lock, at any nesting depth, repairs first. No half-applied operation stays
visible and no marker or journal outlives its mutation.

The update journal (all-or-nothing ``update``)
----------------------------------------------
A heap block of ``16 + 16 * capacity`` bytes: word 0 the number of complete
records, word 1 the capacity, then records of two words, ``(slot index, old
slot word)``. ``update`` allocates it, stores its offset in ``journal`` (the
journal is armed), and before each slot store appends the slot's old word: the
record's two words first, then the record count. Its commit point is the one
store ``journal = 0``; only after it are the journal and the replaced entries
freed. The table is rebuilt, if it must be, before the journal is armed, so the
slot indices hold until the commit.

Repair (restartable: a repairer killed at any point leaves the next to finish)
------------------------------------------------------------------------------
1. If a journal is armed (and lies inside the heap), store every record's old
   word back into its slot, last record first. Idempotent: the journal is not
   touched, so a second repair restores the very same words.
2. Scan the active table: a slot whose entry lies outside the heap, or that
   repeats an entry already seen, becomes a tombstone.
3. Rebuild the heap (:meth:`Heap.rebuild`) from the entries still referenced
   AND the journal, so the journal stays intact; a rejected entry's slot
   becomes a tombstone. An entry whose sizes do not fit its block becomes a
   tombstone, then is freed (in that order: a crash in between leaks it, and
   the next rebuild reclaims it). All derived from the table alone, so a rerun
   computes the same.
4. Recount items and tombstones.
5. Disarm the journal (``journal = 0``), then free it. A crash in between
   leaves the block to the next repair's heap rebuild.
6. ``repairs + 1``, ``version + 1``, and last ``holder pid = 0``: until this
   store every later locker repairs again.

What a repair cannot undo is another process scribbling over the block.
"""

from __future__ import annotations

from collections.abc import Callable

from .._process import current_identity
from ._layout import OFFSET_MASK, TOMBSTONE
from ._table import Table

__all__ = ["Journal", "UpdateJournal", "restore_slot"]


def restore_slot(table: memoryview, index: int, word: int) -> None:
    """Repair step 1 for one record: put ``word`` back into slot ``index``.

    A function of its own so that crash tests can kill a repair between records.
    """
    table[index] = word


class Journal:
    """The crash protocol (see the module docstring) over one data block's :class:`Table`."""

    __slots__ = ("_ctl", "_heap", "_table", "_words", "on_repair")

    def __init__(self, table: Table, on_repair: Callable[[], None]) -> None:
        self._table = table
        self._ctl = table.ctl
        self._words = table.hwords
        self._heap = table.heap
        self.on_repair = on_repair  # called after every repair (drops the caller's cache)

    @property
    def pending(self) -> bool:
        """Whether a mutation is recorded as in progress (a repair is due unless it is ours)."""
        return bool(self._ctl.holder_pid)

    @property
    def armed(self) -> int:
        """The heap offset of the armed update journal, 0 when none."""
        return self._ctl.journal

    # -- a mutation -------------------------------------------------------------------------

    def begin(self) -> int:
        """Record a mutation in progress (step 1); return the new version."""
        ctl = self._ctl
        pid, start = current_identity()
        ctl.holder_start = start
        ctl.holder_pid = pid
        version = ctl.version + 1
        ctl.version = version
        return version

    def end(self) -> None:
        """The mutation is complete (step 3)."""
        self._ctl.holder_pid = 0

    def arm(self, capacity: int) -> UpdateJournal:
        """Allocate and arm an update journal for ``capacity`` records; return it.

        Raises
        ------
        AllocationError
            The heap has no room for it; nothing changed.
        """
        journal = self._heap.alloc(16 + 16 * capacity)
        at = journal >> 3
        self._words[at] = 0
        self._words[at + 1] = capacity
        self._ctl.journal = journal  # from here a crash rolls the whole update back
        return UpdateJournal(self._words, journal)

    def commit(self) -> None:
        """The update's commit point: disarm the journal (one store), then free it."""
        journal = self._ctl.journal
        self._ctl.journal = 0
        self._heap.free(journal)

    def abandon(self, done: list[tuple[int, int]], saved: tuple[int, int]) -> None:
        """Undo an update that failed cleanly (AllocationError) in this process, then disarm.

        ``done`` lists the ``(slot index, replaced word)`` of each slot changed;
        ``saved`` the item and tombstone counts before the update.
        """
        table = self._table.active()
        heap = self._heap
        for index, replaced in reversed(done):
            entry = table[index] & OFFSET_MASK
            table[index] = replaced
            heap.free(entry)
        self._ctl.count, self._ctl.tombstones = saved
        if self._ctl.journal:
            self.commit()

    # -- repair ---------------------------------------------------------------------------

    def _valid_journal(self) -> tuple[int, int]:
        """Return ``(offset, records)`` of the armed journal, ``(0, 0)`` if none or not ours."""
        words = self._words
        journal = self._ctl.journal
        limit = self._heap.limit
        if not 0 < journal < limit or journal % 16:
            return 0, 0  # not a journal this code wrote: nothing trustworthy to undo
        at = journal >> 3
        records, capacity = words[at], words[at + 1]
        if records > capacity or journal + 16 + 16 * capacity > limit:
            return 0, 0
        return journal, records

    def repair(self) -> None:
        """Finish or undo the cut-short mutation (steps 1-6 of the module docstring)."""
        ctl, words, table = self._ctl, self._words, self._table
        self._heap.refresh()
        limit = self._heap.limit
        slots = table.active()
        journal, records = self._valid_journal()
        for record in reversed(range(records)):  # step 1
            at = (journal >> 3) + 2 + 2 * record
            index, word = words[at], words[at + 1]
            if index < table.slots:
                restore_slot(slots, index, word)
        live: dict[int, int] = {}  # step 2: entry offset -> slot index
        tombstones = 0
        for index, word in enumerate(slots.tolist()):
            if word == TOMBSTONE:
                tombstones += 1
            elif word:
                entry = word & OFFSET_MASK
                if entry in live or not 0 < entry < limit:
                    slots[index] = TOMBSTONE
                    tombstones += 1
                else:
                    live[entry] = index
        keep = [*live, journal] if journal else list(live)
        journal_kept = bool(journal)
        for entry in self._heap.rebuild(keep):  # step 3
            if entry == journal:
                journal_kept = False
                continue
            slots[live.pop(entry)] = TOMBSTONE
            tombstones += 1
        for entry, index in list(live.items()):
            if not table.entry_fits(entry):
                slots[index] = TOMBSTONE
                tombstones += 1
                del live[entry]
                self._heap.free(entry)
        ctl.count = len(live)  # step 4
        ctl.tombstones = tombstones
        if ctl.journal:  # step 5
            ctl.journal = 0
            if journal_kept:
                self._heap.free(journal)
        ctl.repairs += 1  # step 6
        ctl.version += 1
        ctl.holder_pid = 0
        self.on_repair()


class UpdateJournal:
    """The armed journal of one ``update``: records of slots before they change."""

    __slots__ = ("_at", "_words")

    def __init__(self, words: memoryview, offset: int) -> None:
        self._words, self._at = words, offset >> 3

    @property
    def offset(self) -> int:
        """The journal's heap offset (the accelerator's put records into it itself)."""
        return self._at << 3

    def record(self, index: int, old_word: int) -> None:
        """Append ``(index, old_word)``, before slot ``index`` changes."""
        words, at = self._words, self._at
        records = words[at]
        words[at + 2 + 2 * records] = index
        words[at + 3 + 2 * records] = old_word
        words[at] = records + 1  # the record counts only once complete
