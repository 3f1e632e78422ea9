"""``SharedDict``: the mapping facade over a dict's blocks.

The layers below, each readable and testable alone: :mod:`._layout` (the
format), :mod:`._keys` (canonical keys), :mod:`._table` (probing, entries,
one-store publishing), :mod:`._journal` (the crash protocol and its repair),
:mod:`._lock` (the lock), :mod:`._cache` (the read cache), :mod:`._store` (the
data blocks and growth). This module is the mapping: each operation is one
step of the protocol, taken under the lock (:meth:`SharedDict._locked`) and
recorded as a mutation (:meth:`SharedDict._mutation`).

Atomicity
---------
Every mutation runs under the dict's lock; a holder that dies is noticed by the
next taker, who repairs (:mod:`._journal`). A mutation that raises
(``MemoryError``, ``KeyboardInterrupt``) is repaired before the exception
leaves it, so a caller who catches it inside ``with d.lock():`` sees the dict
as it was.

Reads are served from a per-handle cache of small values while the shared
version is unchanged. A cache miss on x86 reads the table without the lock,
seqlock-style, and keeps the result only if no mutation was in progress and the
version did not move meanwhile (else, and on other architectures, it reads
under the lock); see :meth:`SharedDict._fetch`. ``len()`` reads the count the
same way.

Where the accelerator is used (:mod:`.._accel`), four steps run whole in C, one call each:
a read (:meth:`SharedDict._fetch`), a store of one item (``__setitem__``), a removal
(``__delitem__``) and ``increment`` of a raw number. Each takes the lock, checks what
:meth:`SharedDict._acquire` checks and follows the protocol of :mod:`._journal`; anything
unusual (a repair or a growth due, a full table or heap, a holder that died) changes
nothing and hands the step to the Python path below, which then does it as it always did.
"""

from __future__ import annotations

import numbers
import operator
import os
import pickle
import platform
import re
import threading
import time
import weakref
import zlib
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from ctypes import addressof, c_char
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, NoReturn, SupportsIndex, overload

from typing_extensions import Self, TypeVar

from .. import _accel
from .._block import PREFIX
from .._handle import BlockHandle
from .._header import BLOCK_ID_SIZE, BlockKind, align, encode_header
from .._heap import heap_overhead
from .._platform import backend
from .._process import current_identity
from .._waiting import Signal, deadline_of
from ..errors import (
    AllocationError,
    BlockExistsError,
    BlockNotFoundError,
    ClosedError,
    HeapFullError,
    TableFullError,
)
from . import _cache
from ._cache import ABSENT, CACHEABLE_KEYS, Pickled
from ._journal import Journal
from ._keys import encode_key
from ._layout import (
    ENTRY_ALLOWANCE,
    ENTRY_PAGE_SIZE,
    HOLDER_PID,
    LOCK_FILE,
    LOCK_MUTEX,
    MAX_BLOCK,
    MIN_HEAP,
    MUTEX_OFFSET,
    MUTEX_SIZE,
    OFFSET_MASK,
    PICKLED,
    TOMBSTONE,
    VERSION,
    EntryPage,
)
from ._lock import DictLock, FileLock, MutexLock, ProcessLock
from ._store import INITIAL_HEAP_RESERVE, DataBlock, dict_tag, grow, unlink_data_blocks
from ._table import Table, decode_value, encode_value

if TYPE_CHECKING:
    from .._native import Core as NativeCore

__all__ = ["SharedDict", "SharedDictLock", "ZeroCopyDict"]

# Unsolved (SharedDict.create(...) alone) they default to Any, like a bare ``dict``.
_K = TypeVar("_K", default=Any)
_V = TypeVar("_V", default=Any)
_D = TypeVar("_D")
_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_DEFAULT_MAX_ITEMS: Final = 10_000
_DEFAULT_HEAP_SIZE: Final = 100 * 2**20
_MISSING: Final[Any] = object()
_pickle_key = pickle.dumps
_loads = pickle.loads
# x86 keeps loads in order and stores in order (TSO): the seqlock-style lock-free reads
# of _fetch and __len__ are sound there. Elsewhere every read takes the lock.
_LOCK_FREE_READS: Final = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}
_crc32 = zlib.crc32
_get_ident = threading.get_ident
_OPEN_SECONDS: Final = 10.0  # how long open() retries while other processes create or remove


class _Closed:
    """Stands in for every view of a closed (or unreachable) dict: any use raises why."""

    def __init__(self, name: str, error: Exception | None = None) -> None:
        self.name = name
        self.error = error

    def _fail(self, *args: object) -> NoReturn:
        if self.error is not None:
            raise self.error
        raise ClosedError(f"SharedDict {self.name!r} is closed")

    __getitem__ = __setitem__ = acquire = _fail


def _is_number(value: object) -> bool:
    """Whether ``increment`` takes ``value``: any number but a bool."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


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


def _size(label: str, value: object, low: int) -> int:
    """``value`` as a plain int of at least ``low`` (any integer-like but bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{label} must be an integer, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{label} must be an integer, not {type(value).__name__}") from None
    if number < low:
        raise ValueError(f"{label} must be at least {low}, got {number}")
    return number


def _encode_item(key: object, value: object) -> tuple[bytes, int, bytes, tuple[int, bytes]]:
    """``(canonical key, its hash, its pickle when needed, stored value)``; names the key."""
    encoded, exact = encode_key(key)
    try:
        stored = encode_value(value)
    except Exception as exc:
        error = type(exc)(
            f"the value of key {key!r} ({type(value).__name__}) cannot be pickled: {exc}"
        )
        raise error from exc
    return encoded, _crc32(encoded), b"" if exact else _pickle_key(key, 5), stored


class SharedDictLock:
    """What :meth:`SharedDict.lock` returns: a context manager holding the dict's lock.

    ``with d.lock() as d:`` runs its body as one atomic step: re-entrant within
    a thread (also across handles of the same dict in the process), excluding
    other threads and other processes. A process forked inside the block does
    not hold the lock; leaving the block there is harmless.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: SharedDict[Any, Any]) -> None:
        self._owner = owner

    def __enter__(self) -> SharedDict[Any, Any]:
        self._owner._acquire()
        return self._owner

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner._unlock()


class _Mutation:
    """A handle's "a change in progress" context: begin, end, repair on failure."""

    __slots__ = ("_owner",)

    def __init__(self, owner: SharedDict[Any, Any]) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        self._owner._begin()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        owner = self._owner
        if exc is None or (isinstance(exc, AllocationError) and owner._clean_failure):
            owner._end()
        else:
            owner._journal.repair()  # nothing half-done may show; a second failure: next taker


class _SnapshotItems(ItemsView[Any, Any]):
    def __init__(self, owner: SharedDict[Any, Any]) -> None:
        super().__init__(owner)
        self._owner = owner

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._owner._snapshot(values=True))


class _SnapshotValues(ValuesView[Any]):
    def __init__(self, owner: SharedDict[Any, Any]) -> None:
        super().__init__(owner)
        self._owner = owner

    def __iter__(self) -> Iterator[Any]:
        return iter([value for _, value in self._owner._snapshot(values=True)])


class SharedDict(BlockHandle, MutableMapping[_K, _V], Generic[_K, _V]):
    """A mapping shared by every process that attaches to it by name.

    Use :meth:`create`, :meth:`attach` or :meth:`open`. Keys are the portable
    kinds of :mod:`~shared_memory_array._dict._keys` (``1``, ``1.0`` and
    ``True`` are one key, as in a dict); values are any picklable objects and
    are copied in and out. Every operation is atomic across threads and
    processes; ``with d.lock():`` makes several one. ``d[k] += 1`` is two
    operations (a read, then a write): use :meth:`increment`.

    Generic like ``dict``: ``SharedDict[str, int]``.

    Attributes
    ----------
    block_name : str
        The shared-memory block's name (``sma_`` + name).
    """

    KIND: ClassVar[BlockKind] = BlockKind.DICT
    KIND_NAME: ClassVar[str] = "SharedDict"
    CONSTRUCTORS: ClassVar[str] = "SharedDict.create(), .attach() or .open()"

    block_name: str = ""
    _dict_name: str = ""
    _lock: DictLock
    _entry: EntryPage
    _data: DataBlock
    _generation: int = 0
    _table: Table
    _journal: Journal
    _ctl: memoryview  # the data block's control words (the cache-hit path reads VERSION)
    # The accelerator's whole locked steps over the current data block (None: the Python path).
    _fast: NativeCore | None = None
    _cache: dict[object, object]
    _cache_version: int = -1
    _clean_failure: bool = False
    _release_lock: weakref.finalize[Any, Any] | None = None
    _locked: SharedDictLock
    _mutation: _Mutation

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        max_items: SupportsIndex | None = None,
        heap_size: SupportsIndex = _DEFAULT_HEAP_SIZE,
        *,
        slot_count: SupportsIndex | None = None,
        grow: bool = True,
    ) -> Self:
        """Create a new shared dict.

        Parameters
        ----------
        name
            1 to 200 letters, digits, ``_``, ``.`` or ``-``; the block is named
            ``sma_`` + name (unless name already starts with ``sma_``).
        max_items
            Distinct keys that fit before the table grows (default 10,000); any
            integer. With ``grow=False``, how many ever fit.
        heap_size
            Bytes for keys and values before the heap grows (default 100 MiB;
            reserved as entries arrive, never up front unless ``grow=False``).
            Each of ``max_items`` entries also gets 72 bytes on top for its own
            overhead (a 24-byte entry header, 16 bytes of allocator tags,
            rounding to 16). An entry stores its canonical key and its value's
            pickle (8 bytes for an ``int`` of 64 bits or a ``float``); a value
            of up to 256 bytes that is updated takes two areas of 1.25 times
            its size from then on. So zero-copy-ipc's ``max_items * (key +
            value) * 2`` holds ``max_items`` entries of any size.
        slot_count
            zero-copy-ipc's name for ``max_items``; give one of the two at most.
        grow
            Let the table and the heap grow as keys and values arrive (the
            default): every process that holds the dict follows. ``False`` keeps
            the fixed capacity of the previous revision: a full table or heap
            raises :class:`~shared_memory_array.AllocationError`.

        Raises
        ------
        BlockExistsError
            A block of that name exists (it is left as it was); see :meth:`open`.
        AllocationError
            The system cannot provide the shared memory.
        ValueError, TypeError
            A bad name or size, or both ``max_items`` and ``slot_count``.
        """
        block_name = _block_name(name, for_attach=False)
        if max_items is not None and slot_count is not None:
            raise TypeError("give max_items or slot_count (its alias), not both")
        label = "max_items" if slot_count is None else "slot_count"
        chosen = max_items if slot_count is None else slot_count
        items = _DEFAULT_MAX_ITEMS if chosen is None else _size(label, chosen, 1)
        # The entries' own overhead comes on top of the keys and values heap_size counts.
        heap_bytes = align(
            _size("heap_size", heap_size, MIN_HEAP) + items * ENTRY_ALLOWANCE + heap_overhead(),
            64,
        )
        if heap_bytes >= MAX_BLOCK:
            raise ValueError(f"heap_size {heap_bytes} is too large for a dict")
        block_id = os.urandom(BLOCK_ID_SIZE)  # known now: the data blocks' names carry it
        header = encode_header(
            BlockKind.DICT, nbytes=ENTRY_PAGE_SIZE, name=block_name, block_id=block_id
        )
        try:
            self = cls._create(len(header) + ENTRY_PAGE_SIZE, name=block_name, populate=True)
        except BlockExistsError as exc:
            raise BlockExistsError(
                exc.name,
                f"a SharedDict (or another block) named {name!r} exists already: "
                f"SharedDict.attach({name!r}) uses it, SharedDict.open({name!r}) attaches "
                "or creates",
            ) from None
        with self._creating():
            block = self._live_block()
            entry = EntryPage(block.buf[len(header) :])
            lock_kind = LOCK_MUTEX if backend.robust_mutex else LOCK_FILE
            entry.format(lock_kind, grow)
            if lock_kind == LOCK_MUTEX:
                start = len(header) + MUTEX_OFFSET
                mutex = block.buf[start : start + MUTEX_SIZE]
                backend.mutex_init(addressof(c_char.from_buffer(mutex)))
                mutex.release()
            entry.release()
            data = DataBlock.create(
                block_name,
                dict_tag(block_id),
                0,
                items,
                heap_bytes,
                heap_reserve=INITIAL_HEAP_RESERVE if grow else None,
            )
            try:
                self._publish(header)  # last: attach waits for the block until now
                self._setup(name, data)
            except BaseException:
                data.unlink()
                data.close()
                raise
        return self

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to the dict that :meth:`create` made under ``name``.

        Raises
        ------
        BlockNotFoundError
            No such dict (or it is still being created and did not finish in time).
        UntrustedBlockError
            The block belongs to another user, or others may write it.
        LayoutError
            The block is not a dict, or its header or geometry is corrupt.
        """
        return cls._attach(name)

    @classmethod
    def open(
        cls,
        name: str,
        max_items: SupportsIndex | None = None,
        heap_size: SupportsIndex = _DEFAULT_HEAP_SIZE,
        *,
        slot_count: SupportsIndex | None = None,
        grow: bool = True,
    ) -> Self:
        """Attach to the dict ``name`` if it exists, else create it (race-free).

        Several processes opening one name at once get one dict: the one that
        creates it wins, the others attach (waiting for it to be created). The
        arguments are :meth:`create`'s, used only by the process that creates.
        """
        # Bounded by time, not by tries: another process's creation takes microseconds to
        # milliseconds, and an attach in that window fails at once (not found, or being
        # created), as a create fails (it exists). A short back-off lets it finish.
        deadline = time.monotonic() + _OPEN_SECONDS
        delay = 0.0005
        while True:
            try:
                return cls._attach(name)
            except BlockNotFoundError:  # gone, not yet there, or being created
                pass
            try:
                return cls.create(name, max_items, heap_size, slot_count=slot_count, grow=grow)
            except BlockExistsError:
                pass  # another process created it between the two calls
            if time.monotonic() > deadline:
                raise BlockNotFoundError(
                    name,
                    f"SharedDict {name!r} neither attached nor created within "
                    f"{_OPEN_SECONDS:.0f} s (another process keeps creating or removing it)",
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    @classmethod
    def _attach(
        cls, name: str, *, identity: str | None = None, block_id: bytes | None = None
    ) -> Self:
        block_name = _block_name(name, for_attach=True)
        self = cls._open(block_name, identity=identity, block_id=block_id)
        try:
            header, block = self._header, self._live_block()
            assert header is not None
            entry = EntryPage(block.buf[header.data_offset :])
            generation = entry.generation
            entry.release()
            tag = dict_tag(header.block_id)
            for _ in range(3):
                try:
                    data = DataBlock.open(block_name, tag, generation)
                    break
                except BlockNotFoundError:  # it grew meanwhile: follow
                    entry = EntryPage(block.buf[header.data_offset :])
                    moved, generation = entry.generation != generation, entry.generation
                    entry.release()
                    if not moved:
                        raise
            else:
                data = DataBlock.open(block_name, tag, generation)
            self._setup(name, data)
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self, name: str, data: DataBlock) -> None:
        """Build the layers over the mapped blocks (entry page, lock, signal, table, cache)."""
        block = self._live_block()
        header = self._header
        assert header is not None
        self._dict_name = name
        self.block_name = block.name
        self._entry = EntryPage(block.buf[header.data_offset :])
        self._cache = {}
        self._cache_version = -1
        self._locked = SharedDictLock(self)
        self._mutation = _Mutation(self)
        if self._area is not None and self._area.notify_offset >= 0:
            self._signal()  # made now: every change looks at its waiters count (_end)
        self._use_data(data)
        lock = DictLock.for_dict(header.block_id)
        if lock is None:
            lock = DictLock.register(header.block_id, name, self._process_lock())
        self._lock = lock
        # A handle dropped without close() still gives its share of the lock back.
        self._release_lock = weakref.finalize(self, lock.release_ref)

    def _process_lock(self) -> ProcessLock:
        block = self._live_block()
        header = self._header
        assert header is not None
        if self._entry.lock_kind == LOCK_MUTEX:
            if not backend.robust_mutex:
                raise BlockNotFoundError(
                    block.name,
                    f"SharedDict {self._dict_name!r} is locked by a robust mutex, which this "
                    "system cannot use",
                )
            start = header.data_offset + MUTEX_OFFSET
            return MutexLock(block.buf[start : start + MUTEX_SIZE])
        return FileLock(backend.fresh_locks(block.hold.locks, block.system_name))

    def _use_data(self, data: DataBlock) -> None:
        """Work on ``data`` from now on (at setup, and after a growth step)."""
        self._data = data
        self._generation = data.generation
        table = self._table = data.table(self._dict_name)
        self._ctl = table.ctl.words
        self._journal = Journal(table, self._forget)
        self.max_items = table.max_items
        self._fast = self._bind_fast(table, data.generation)
        self._forget()

    def _bind_fast(self, table: Table, generation: int) -> NativeCore | None:
        """The table's accelerator core, bound to this dict's lock and words (or None)."""
        core = table.core
        if core is None or self._entry.lock_kind != LOCK_MUTEX:
            return None
        block = self._live_block()
        header = self._header
        assert header is not None
        view = block.buf[:]  # the core's own: the entry block stays mapped while it runs
        base = _accel.address_of(view)
        if not base:
            return None
        signal = self._notify  # made by _setup before the data (None: an older block)
        core.bind_lock(
            view,
            base + header.data_offset + MUTEX_OFFSET,
            base + header.data_offset,  # the generation word
            generation,
            signal.notify_address if signal is not None else 0,
            signal.waiters_address if signal is not None else 0,
            current_identity,
        )
        return core

    # -- the lifetime rule: what is this kind's own ---------------------------------------

    @property
    def name(self) -> str:
        """The name given to :meth:`create` / :meth:`attach`."""
        return self._dict_name

    def _pickle_state(self) -> tuple[Any, ...]:
        return (self._dict_name,)

    @classmethod
    def _open_from_state(
        cls, state: tuple[Any, ...], identity: str | None, block_id: bytes | None
    ) -> Self:
        return cls._attach(state[0], identity=identity, block_id=block_id)

    def _restore_unreachable(self, state: tuple[Any, ...]) -> None:
        self._dict_name = state[0]
        self.block_name = state[0]
        unusable = _Closed(state[0], self._unreachable)
        self._ctl = unusable  # type: ignore[assignment]
        self._lock = unusable  # type: ignore[assignment]
        self._cache = {}
        self._cache_version = -1

    def _unlink_name(self, block: Any) -> bool:
        """An explicit end: the entry's name and the current data's name go now.

        The data blocks' names only if the entry's name was still this dict's:
        else they are a newer dict's of the same name.
        """
        entry = getattr(self, "_entry", None)
        generation = entry.generation if entry is not None else None
        if not block.unlink():
            return False
        if generation is not None:  # the current generation, whichever handle last grew it
            unlink_data_blocks(self._data.entry_name, self._data.tag, generation)
        return True

    def _release(self) -> None:
        """Let go of the views, the data block and this handle's share of the lock (closing)."""
        release_lock, self._release_lock = self._release_lock, None
        if release_lock is None:
            return
        # Lock-free paths read _ctl, every other path takes _lock first: both raise now.
        closed = _Closed(self._dict_name)
        self._fast = None
        self._ctl = closed  # type: ignore[assignment]
        self._lock = closed  # type: ignore[assignment]
        self._cache = {}
        self._cache_version = -1
        self._table.release()
        self._entry.release()
        self._data.close()
        release_lock()

    # -- locking and the crash protocol ------------------------------------------------

    def _unlock(self) -> None:
        """Release one level of the lock."""
        self._lock.release()

    def _acquire(self) -> None:
        """Take the lock; follow a growth; whoever finds a change cut short repairs first."""
        died = self._lock.acquire()
        try:
            if self._entry.generation != self._generation:
                self._follow()
            if self._ctl[HOLDER_PID]:
                self._journal.repair()
            elif died:
                self._table.heap.refresh()
            if died:
                self._lock.consistent()
        except BaseException:
            self._lock.release()
            raise

    def _follow(self) -> None:
        """Another process grew the dict: work on the current data block."""
        old = self._data
        self._data_swap(DataBlock.open(old.entry_name, old.tag, self._entry.generation), old)

    def _data_swap(self, new: DataBlock, old: DataBlock) -> None:
        self._fast = None
        self._table.release()
        self._use_data(new)
        old.close()

    def _forget(self) -> None:
        """Drop the read cache (after a repair or a growth step)."""
        self._cache.clear()
        self._cache_version = -1

    def _begin(self) -> None:
        """Record a mutation in progress (lock held) and bump the version.

        This handle's cache stays valid across its own mutations (the caller
        updates or clears the entries it changes); another process's mutation
        since the cache was filled empties it.
        """
        if self._ctl[VERSION] != self._cache_version:
            self._cache.clear()
        self._table.heap.refresh()
        self._clean_failure = False
        self._cache_version = self._journal.begin()

    def _end(self) -> None:
        """The mutation is complete; whoever waits for a change is woken after the unlock."""
        self._journal.end()
        signal = self._notify
        if signal is not None and signal.waiters():
            self._lock.wake_after_release(signal)

    def lock(self) -> SharedDictLock:
        """Return a context manager holding the dict's lock: one atomic step.

        Re-entrant within a thread (also across handles of the same dict in
        this process); excludes other threads and other processes.
        """
        return self._locked

    # -- room: growth -------------------------------------------------------------------

    def _make_room(self, full: AllocationError, needed: int) -> bool:
        """A put found the table or heap full: make room (lock held, in a mutation).

        Raises the error again when the dict does not grow and the heap cannot
        take more of its region.
        """
        if isinstance(full, HeapFullError) and self._data.reserve_heap(self._table, needed):
            return True
        if not self._entry.grows:
            return False
        old_data, old_table = self._data, self._table
        new = grow(
            old_data,
            old_table,
            self._entry,
            self._dict_name,
            more_items=isinstance(full, TableFullError),
            more_heap=needed if isinstance(full, HeapFullError) else 0,
        )
        self._data_swap(new, old_data)
        self._cache_version = self._journal.begin()  # the mutation goes on in the new block
        return True

    def _put(
        self, encoded: bytes, key_hash: int, original: bytes, stored: tuple[int, bytes]
    ) -> None:
        """Store one item inside a mutation, growing as needed; free what it replaced."""
        while True:
            try:
                replaced = self._table.put(encoded, key_hash, original, stored)[1]
            except (TableFullError, HeapFullError) as full:
                needed = 64 + len(encoded) + len(original) + 2 * len(stored[1])
                if not self._make_room(full, needed):
                    self._clean_failure = True
                    raise self._full_error(full) from None
                continue
            if replaced > TOMBSTONE:
                self._table.heap.free(replaced & OFFSET_MASK)
            return

    def _full_error(self, full: AllocationError) -> AllocationError:
        if isinstance(full, TableFullError):
            return AllocationError(
                f"SharedDict {self._dict_name!r} is full: {self._table.ctl.count} keys of "
                f"max_items {self.max_items} (create it with grow=True, or a larger max_items)",
                1,
            )
        heap = self._table.heap
        return AllocationError(
            f"SharedDict {self._dict_name!r} has no heap room for this item: "
            f"{heap.capacity - heap.used} of {heap.capacity} bytes free, in pieces "
            f"(create it with grow=True, or a larger heap_size)",
            full.requested,
        )

    # -- the mapping -------------------------------------------------------------------

    def _fetch(self, encoded: bytes, key_hash: int) -> tuple[int, int, bytes | None]:
        """Return ``(version, value kind, value bytes or None if absent)``, one snapshot.

        On x86 (whose loads and stores are not reordered with each other) the
        table is first read without the lock, seqlock-style: the read counts
        if no mutation was in progress at its start and the version did not
        move by its end. Otherwise, or if the read raced a writer, it is
        repeated under the lock. The value is copied out before it is checked
        and decoded only after, so a torn read is never decoded.
        """
        fast = self._fast
        if fast is not None:  # the accelerator: both reads in C (the lock unless held here)
            lock = self._lock
            found = fast.get(
                encoded, key_hash, _LOCK_FREE_READS, not lock._depth or lock._owner != _get_ident()
            )
            if found is not None:
                return found
        table = self._table
        if _LOCK_FREE_READS:
            ctl = self._ctl
            version = ctl[VERSION]
            if not ctl[HOLDER_PID]:
                try:
                    index, word, _ = table.probe(encoded, key_hash)
                    kind, data = table.entry_value(word & OFFSET_MASK) if index >= 0 else (0, None)
                    copied = bytes(data) if data is not None else None
                except (IndexError, ValueError):  # read a structure being changed
                    pass
                else:
                    if ctl[VERSION] == version:
                        return version, kind, copied
        self._acquire()
        try:
            table = self._table
            index, word, _ = table.probe(encoded, key_hash)
            if index < 0:
                return self._ctl[VERSION], 0, None
            kind, data = table.entry_value(word & OFFSET_MASK)
            return self._ctl[VERSION], kind, bytes(data)
        finally:
            self._unlock()

    def _remember_at(self, version: int, key: object, value: object, data: bytes) -> None:
        """Cache what was read at ``version`` if the dict is still at that version."""
        with self._lock.thread_lock:  # excludes this process's writers, who update the cache
            if self._ctl[VERSION] != version:
                return
            if self._cache_version != version:
                self._cache.clear()
                self._cache_version = version
            _cache.remember(self._cache, key, value, data)

    def __getitem__(self, key: _K) -> _V:
        cacheable = type(key) in CACHEABLE_KEYS
        if cacheable and self._ctl[VERSION] == self._cache_version:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                if hit is ABSENT:
                    raise KeyError(key)
                if type(hit) is Pickled:
                    return _loads(hit)  # type: ignore[no-any-return]
                return hit  # type: ignore[return-value]
        encoded, _ = encode_key(key)
        version, kind, data = self._fetch(encoded, _crc32(encoded))
        if data is None:
            if cacheable:
                self._remember_at(version, key, ABSENT, b"")
            raise KeyError(key)
        value = decode_value(kind, data)
        if cacheable:
            self._remember_at(version, key, value, data)
        return value  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        cacheable = type(key) in CACHEABLE_KEYS
        if cacheable and self._ctl[VERSION] == self._cache_version:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit is not ABSENT
        try:
            encoded, _ = encode_key(key)
        except TypeError:
            return False  # not a key type: in no SharedDict
        version, _, data = self._fetch(encoded, _crc32(encoded))
        if data is None and cacheable:
            self._remember_at(version, key, ABSENT, b"")
        return data is not None

    def __setitem__(self, key: _K, value: _V) -> None:
        encoded, key_hash, original, stored = _encode_item(key, value)
        fast = self._fast
        if fast is not None:  # the accelerator: the whole locked step in C
            lock = self._lock
            thread_lock = lock._thread_lock  # this process's other threads, and the cache
            thread_lock.acquire()
            try:
                # Not inside this thread's own locked step (the mutex is not re-entrant).
                version = None if lock._depth else fast.store(encoded, key_hash, original, *stored)
                if version is not None:
                    self._after_fast(version, key, value, stored[1])
                    return
            finally:
                thread_lock.release()
        self._acquire()
        try:
            with self._mutation:
                self._put(encoded, key_hash, original, stored)
            if type(key) in CACHEABLE_KEYS:
                data = stored[1]
                _cache.remember(self._cache, key, value, data)
            else:
                self._cache.clear()  # e.g. a str subclass may alias a cached str key
        finally:
            self._unlock()

    def __delitem__(self, key: _K) -> None:
        fast = self._fast
        if fast is not None:  # the accelerator: the whole locked step in C
            encoded, _ = encode_key(key)
            lock = self._lock
            thread_lock = lock._thread_lock
            thread_lock.acquire()
            try:
                removed = None if lock._depth else fast.remove(encoded, _crc32(encoded), False)
                if removed is False:
                    raise KeyError(key)
                if removed is not None:
                    self._after_fast(removed[0], key, ABSENT, b"")
                    return
            finally:
                thread_lock.release()
        self._pop(key, _MISSING, want_value=False)

    def _remove(self, index: int, word: int) -> None:
        """Unpublish slot ``index`` and free its entry, as one mutation (lock held)."""
        with self._mutation:
            self._table.unpublish(index, word)

    def _pop(self, key: object, default: object, *, want_value: bool = True) -> Any:
        encoded, _ = encode_key(key)
        key_hash = _crc32(encoded)
        self._acquire()
        try:
            table = self._table
            index, word, _ = table.probe(encoded, key_hash)
            if index < 0:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            value = table.load_value(word & OFFSET_MASK) if want_value else None
            self._remove(index, word)
            if type(key) in CACHEABLE_KEYS:
                self._cache[key] = ABSENT
            else:
                self._cache.clear()
            return value
        finally:
            self._unlock()

    @overload
    def pop(self, key: _K) -> _V: ...
    @overload
    def pop(self, key: _K, default: _V | _D) -> _V | _D: ...
    def pop(self, key: _K, default: object = _MISSING) -> Any:
        """Remove ``key`` and return its value (``default`` if absent, else KeyError)."""
        return self._pop(key, default)

    def popitem(self) -> tuple[_K, _V]:
        """Remove and return some ``(key, value)`` pair; KeyError when empty."""
        self._acquire()
        try:
            table = self._table
            for index, word in enumerate(table.active().tolist()):
                if word > TOMBSTONE:
                    entry = word & OFFSET_MASK
                    key, value = table.entry_key(entry), table.load_value(entry)
                    self._remove(index, word)
                    self._cache.clear()
                    return key, value  # type: ignore[return-value]
            raise KeyError("popitem(): SharedDict is empty")
        finally:
            self._unlock()

    @overload
    def get(self, key: _K) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _V | _D) -> _V | _D: ...
    def get(self, key: _K, default: object = None) -> Any:
        """``self[key]`` if present, else ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: _K, default: _V = None) -> _V:  # type: ignore[assignment]
        """Return ``self[key]``, first storing ``default`` if ``key`` is absent (atomic)."""
        with self._locked:
            try:
                return self[key]
            except KeyError:
                self[key] = default
                return default

    def increment(self, key: _K, amount: int | float = 1) -> int | float:
        """Add ``amount`` to the number at ``key``, atomically; a missing key counts as 0.

        ``d[k] += 1`` is two operations (a read, then a write), and two
        processes doing it at once lose one update; ``increment`` is one. An
        ``int`` of 64 bits or a ``float`` is changed in place with one store.

        Returns
        -------
        int or float
            The new value.

        Raises
        ------
        TypeError
            The value at ``key`` (or ``amount``) is not a number; nothing changed.
        """
        number = type(amount)  # int and float first: the ABC check costs more than the step
        if number is not int and number is not float and not _is_number(amount):
            raise TypeError(f"increment() needs a number, not {number.__name__}")
        encoded, exact = encode_key(key)
        key_hash = _crc32(encoded)
        fast = self._fast
        if fast is not None:  # the accelerator: the whole locked step in C
            lock = self._lock
            thread_lock = lock._thread_lock
            thread_lock.acquire()
            try:
                stepped = None if lock._depth else fast.increment(encoded, key_hash, amount)
                if stepped is not None:
                    self._after_fast(stepped[0], key, stepped[1], b"")
                    return stepped[1]
            finally:
                thread_lock.release()
        self._acquire()
        try:
            table = self._table
            index, word, _ = table.probe(encoded, key_hash)
            if index < 0:
                result: Any = 0 + amount
            else:
                entry = word & OFFSET_MASK
                current = table.load_value(entry)
                if not isinstance(current, numbers.Number) or isinstance(current, bool):
                    raise TypeError(
                        f"increment() of key {key!r}: its value is a {type(current).__name__}, "
                        "not a number"
                    )
                result = current + amount  # type: ignore[operator]  # both are numbers
                stored = encode_value(result)
                if stored[0] != PICKLED:
                    with self._mutation:
                        done = table.set_number(entry, stored)
                        if not done:
                            self._put(encoded, key_hash, b"", stored)
                    self._after_change(key, result, stored[1])
                    return result  # type: ignore[no-any-return]
            original = b"" if exact else _pickle_key(key, 5)
            stored = encode_value(result)
            with self._mutation:
                self._put(encoded, key_hash, original, stored)
            self._after_change(key, result, stored[1])
            return result  # type: ignore[no-any-return]
        finally:
            self._unlock()

    def compare_and_set(self, key: _K, expected: _V, new: _V) -> bool:
        """Set ``key`` to ``new`` if its value equals ``expected`` (``==``), atomically.

        Returns
        -------
        bool
            Whether it was set. An absent key never equals ``expected``.
        """
        with self._locked:
            try:
                current = self[key]
            except KeyError:
                return False
            if not bool(current == expected):
                return False
            self[key] = new
            return True

    def _after_fast(self, version: int, key: object, value: object, data: bytes) -> None:
        """The cache after a mutation the accelerator made (as :meth:`_begin` and
        :meth:`_after_change` leave it); this process's thread lock is held."""
        if version - 1 != self._cache_version:
            self._cache.clear()
        self._cache_version = version
        self._after_change(key, value, data)

    def _after_change(self, key: object, value: object, data: bytes) -> None:
        if type(key) in CACHEABLE_KEYS:
            _cache.remember(self._cache, key, value, data)
        else:
            self._cache.clear()

    def update(self, other: Any = (), /, **kwargs: _V) -> None:
        """Store every pair of ``other`` and ``kwargs``: all of them, or none.

        Raises
        ------
        AllocationError
            The table or the heap cannot take them all (and the dict cannot
            grow); the dict is unchanged.
        """
        if isinstance(other, Mapping):
            pairs: Iterable[tuple[object, object]] = [(k, other[k]) for k in other]
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]  # noqa: SIM118 - duck-typed mapping
        else:
            pairs = list(other)
        items = [_encode_item(key, value) for key, value in [*pairs, *kwargs.items()]]
        if not items:
            return
        self._acquire()
        try:
            self._update_locked(items)
        finally:
            self._unlock()
        self._cache.clear()

    def _update_locked(self, items: list[tuple[bytes, int, bytes, tuple[int, bytes]]]) -> None:
        """The body of :meth:`update`: one journalled mutation (lock held)."""
        journal = self._journal
        with self._mutation:
            while True:
                table = self._table
                new_keys = {e for e, h, _, _ in items if table.probe(e, h)[0] < 0}
                count = table.ctl.count
                if count + len(new_keys) > self.max_items:
                    full = TableFullError("table full", len(new_keys))
                    if not self._make_room(full, 0):
                        self._clean_failure = True
                        raise self._full_error(full)
                    continue
                if count + table.ctl.tombstones + len(new_keys) > table.fill_limit:
                    table.rebuild()  # now no put below rebuilds: journal indices hold
                saved = (table.ctl.count, table.ctl.tombstones)
                done: list[tuple[int, int]] = []
                needed = sum(64 + len(e) + len(o) + len(s[1]) for e, _, o, s in items)
                try:
                    journal = self._journal
                    recorder = journal.arm(len(items))
                    for encoded, key_hash, original, stored in items:
                        done.append(table.put(encoded, key_hash, original, stored, recorder))
                except (HeapFullError, TableFullError) as full:
                    journal.abandon(done, saved)
                    if not self._make_room(full, needed):
                        self._clean_failure = True
                        raise self._full_error(full) from None
                    continue
                journal.commit()
                for _, replaced in done:
                    if replaced > TOMBSTONE:
                        table.heap.free(replaced & OFFSET_MASK)
                return

    def clear(self) -> None:
        """Remove every key (switches to the empty inactive table, then resets the heap)."""
        self._acquire()
        try:
            with self._mutation:
                self._table.reset()
            self._cache.clear()
        finally:
            self._unlock()

    def __len__(self) -> int:
        ctl = self._ctl
        if _LOCK_FREE_READS:  # seqlock-style, as in _fetch: a count no mutation is changing
            version = ctl[VERSION]
            if not ctl[HOLDER_PID]:
                count = self._table.ctl.count
                if ctl[VERSION] == version:
                    return count
        self._acquire()
        try:
            return self._table.ctl.count
        finally:
            self._unlock()

    def _snapshot(self, *, values: bool) -> list[tuple[Any, Any]]:
        """``(key, value or None)`` for every entry, taken in one atomic step."""
        result = []
        self._acquire()
        try:
            table = self._table
            for word in table.live_words():
                entry = word & OFFSET_MASK
                value = table.load_value(entry) if values else None
                result.append((table.entry_key(entry), value))
        finally:
            self._unlock()
        return result

    def __iter__(self) -> Iterator[_K]:
        return iter([key for key, _ in self._snapshot(values=False)])

    def keys(self) -> KeysView[_K]:
        """A view of the keys; each iteration walks a consistent snapshot."""
        return KeysView(self)

    def items(self) -> ItemsView[_K, _V]:
        """A view of ``(key, value)`` pairs; each iteration is a consistent snapshot."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[_V]:
        """A view of the values; each iteration is a consistent snapshot."""
        return _SnapshotValues(self)

    # -- waiting ---------------------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[SharedDict[_K, _V]], object], timeout: float | None = None
    ) -> bool:
        """Block until ``predicate(d)`` is true; ``False`` if ``timeout`` seconds pass first.

        The predicate is evaluated under the dict's lock, first at once, then
        after every change of the dict by any process (where the system has
        futexes the waiter sleeps in the kernel between changes; elsewhere it
        polls with a bounded back-off, at most 10 ms).
        """
        deadline = deadline_of(timeout)
        signal = self._signal()
        with signal.counted():
            while (generation := self._look(signal, predicate)) is not None:
                if signal.wait(generation, deadline) == generation:
                    return False  # the deadline passed with no change
        return True

    async def wait_for_async(
        self, predicate: Callable[[SharedDict[_K, _V]], object], timeout: float | None = None
    ) -> bool:
        """:meth:`wait_for` without blocking the event loop.

        The predicate runs in the event loop's thread; between changes a thread
        of its own sleeps (see :mod:`~shared_memory_array._waiting`).
        """
        deadline = deadline_of(timeout)
        signal = self._signal()
        with signal.counted():
            while (generation := self._look(signal, predicate)) is not None:
                if await signal.wait_async(generation, deadline) == generation:
                    return False
        return True

    def _look(
        self, signal: Signal, predicate: Callable[[SharedDict[_K, _V]], object]
    ) -> int | None:
        """Under the lock: ``None`` if ``predicate(self)`` holds, else the generation to wait on.

        Call it counted among the waiters (:meth:`Signal.counted`): a change whose
        writer missed the count (it looks under the lock) is one this look sees.
        """
        with self._locked:
            generation = signal.load()
            return None if predicate(self) else generation

    # -- inspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Return table and heap figures.

        Returns
        -------
        dict
            ``name``, ``is_owner`` (this handle owns the dict), ``used_slots``
            (keys stored), ``max_items`` (keys that fit before the table grows),
            ``load_factor`` (used_slots / max_items), ``slot_count`` (the
            ``max_items`` or ``slot_count`` given to :meth:`create`), ``table_slots``
            (slots of the hash table now), ``tombstones``, ``heap_size``
            (bytes blocks can occupy now), ``heap_used`` (bytes in allocated
            blocks, tags included), ``heap_free``, ``heap_limit`` (bytes of
            the heap region reserved), ``grows``, ``generation`` (growth steps
            so far), ``version`` (mutations so far), ``repairs`` (crash repairs).
        """
        with self._locked:
            table = self._table
            ctl = table.ctl
            count = ctl.count
            heap = table.heap
            return {
                "name": self.name,
                "is_owner": self.owner,
                "used_slots": count,
                "max_items": self.max_items,
                "load_factor": count / self.max_items,
                "slot_count": self.max_items,
                "table_slots": table.slots,
                "tombstones": ctl.tombstones,
                "heap_size": heap.capacity,
                "heap_used": heap.used,
                "heap_free": heap.capacity - heap.used,
                "heap_limit": heap.limit,
                "grows": self._entry.grows,
                "generation": self._generation,
                "version": ctl.version,
                "repairs": ctl.repairs,
            }

    def gc_stats(self) -> dict[str, int | float]:
        """Return the heap's free-space figures.

        Returns
        -------
        dict
            ``total_free_blocks``, ``total_free_space`` (bytes),
            ``largest_free_block``, ``allocated_blocks``, ``fragmentation``
            (1 - largest free block / free space).
        """
        with self._locked:
            return self._table.heap.gc_stats()

    def _check(self) -> None:
        """Verify heap and table invariants (for tests); raise LayoutError on violation."""
        with self._locked:
            self._table.check()

    def __repr__(self) -> str:
        if self._unreachable is not None and not self.closed:
            return f"<SharedDict {self._dict_name!r} unreachable>"
        if self._block is None or self.closed:
            return f"<SharedDict {self._dict_name!r} closed>"
        return f"<SharedDict {self._dict_name!r} {len(self)} keys>"


ZeroCopyDict = SharedDict
