"""``SharedDict``: a process-shared mapping in one block (header, table, heap).

Three layers, each readable alone:

* ``_table``: the block's layout and the hash table over it (probing,
  publishing entries with one 8-byte store, table rebuilds);
* ``_journal``: the crash protocol, the mutation marker, the ``update``
  journal and the restartable repair, written down in its docstring;
* this module: the mapping facade: create/attach/close, the lock, a read cache,
  and the ``MutableMapping`` API, each operation one step of the protocol.

Atomicity
---------
Every mutation runs under :class:`~shared_memory_array._lock.BlockLock`
(``flock`` plus a thread lock); the kernel releases ``flock`` when its holder
dies, so a killed holder never blocks the others, and the next taker repairs
(``_journal``). A mutation that raises (``MemoryError``, ``KeyboardInterrupt``)
is repaired before the exception leaves it, so a caller who catches it inside
``with d.lock():`` sees the dict as it was.

Reads are served from a per-handle cache of small values while the shared
version is unchanged; any mutation anywhere bumps the version, so a read never
returns a value older than the last completed write. Immutable values (scalars,
and tuples and frozensets of them) are cached as the objects themselves, others
as their pickle, so every read of a mutable value gets a fresh object. A cache
miss on x86 reads
the table without the lock, seqlock-style, and keeps the result only if no
mutation was in progress and the version did not move meanwhile (else, and on
other architectures, it reads under the lock); see :meth:`SharedDict._fetch`.
``len()`` reads the count the same way.
"""

from __future__ import annotations

import operator
import pickle
import platform
import re
import weakref
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
from typing import Any, ClassVar, Final, NoReturn, SupportsIndex

from typing_extensions import Self

from ._block import PREFIX
from ._handle import BlockHandle
from ._header import BlockKind, align, encode_header, header_size_for
from ._heap import Heap, heap_overhead
from ._journal import Journal
from ._keys import encode_key
from ._lock import BlockLock
from ._table import (
    COUNT,
    HOLDER_PID,
    MAX_BLOCK,
    MIN_HEAP,
    OFFSET_MASK,
    REPAIRS,
    TOMBSTONE,
    TOMBSTONES,
    VERSION,
    Geometry,
    Table,
)
from .errors import AllocationError, BlockNotFoundError, ClosedError, LayoutError

__all__ = ["SharedDict", "SharedDictLock", "ZeroCopyDict"]

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_PICKLE_PROTOCOL: Final = 5
_CACHE_MAX_ITEMS: Final = 1 << 16
_CACHE_MAX_VALUE: Final = 4096
_DEFAULT_MAX_ITEMS: Final = 10_000
# Keys whose dict equality matches canonical-bytes equality: cacheable by the key itself.
_CACHEABLE_KEYS: Final = frozenset({str, int, bytes, float, bool, type(None)})
_IMMUTABLE_VALUES: Final = frozenset({str, int, bytes, float, bool, complex, type(None)})
_CONTAINERS: Final = frozenset({tuple, frozenset})
_MAX_NESTING: Final = 8
_MISSING: Final = object()
_dumps = pickle.dumps
_loads = pickle.loads
# x86 keeps loads in order and stores in order (TSO): the seqlock-style lock-free reads
# of _fetch and __len__ are sound there. Elsewhere every read takes the lock.
_LOCK_FREE_READS: Final = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}
_crc32 = zlib.crc32
_ABSENT: Final = object()  # cached "no such key"


class _Pickled(bytes):
    """A cached value kept as its pickle: each read gets a fresh object."""


def _immutable(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is a tuple or frozenset made of immutable scalars, recursively.

    Such a value may be cached as the object itself: no reader can change it.
    Only the exact types count (a subclass may carry mutable attributes).
    """
    if type(value) in _IMMUTABLE_VALUES:
        return True
    if type(value) in _CONTAINERS and depth < _MAX_NESTING:
        return all(_immutable(item, depth + 1) for item in value)  # type: ignore[attr-defined]
    return False


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


class SharedDictLock:
    """What :meth:`SharedDict.lock` returns: a context manager holding the dict's lock.

    ``with d.lock() as d:`` runs its body as one atomic step: re-entrant within
    a thread (also across handles of the same dict in the process), excluding
    other threads and other processes. A process forked inside the block does
    not hold the lock; leaving the block there is harmless.
    """

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


class SharedDict(BlockHandle, MutableMapping[Any, Any]):
    """A mapping shared by every process that attaches to it by name.

    Use :meth:`create` or :meth:`attach`. Keys are the portable kinds of
    :mod:`~shared_memory_array._keys` (``1``, ``1.0`` and ``True`` are one key,
    as in a dict); values are any picklable objects and are copied in and out.
    Every operation is atomic across threads and processes; ``with d.lock():``
    makes several one.

    Attributes
    ----------
    name : str
        The name given to :meth:`create` / :meth:`attach`.
    block_name : str
        The shared-memory block's name (``sma_`` + name).
    max_items : int
        How many distinct keys always fit.
    """

    KIND: ClassVar[BlockKind] = BlockKind.DICT
    KIND_NAME: ClassVar[str] = "SharedDict"
    CONSTRUCTORS: ClassVar[str] = "SharedDict.create(), .attach() or .open()"

    block_name: str
    max_items: int = 0
    _dict_name: str = ""
    _lock: BlockLock
    _table: Table
    _journal: Journal
    _heap: Heap
    _buf: memoryview
    _ctl: memoryview
    _cache: dict[object, object]
    _cache_version: int
    _release_lock: weakref.finalize[[], SharedDict] | None = None

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        max_items: SupportsIndex | None = None,
        heap_size: SupportsIndex = 100 * 2**20,
        *,
        slot_count: SupportsIndex | None = None,
    ) -> Self:
        """Create a new shared dict.

        Parameters
        ----------
        name
            1 to 200 letters, digits, ``_``, ``.`` or ``-``; the block is named
            ``sma_`` + name (unless name already starts with ``sma_``).
        max_items
            Distinct keys that always fit (default 10,000); any integer.
        heap_size
            Bytes for keys and values (each entry takes 24 + its key and value
            pickles, rounded up to 16, plus 16 bytes of allocator tags).
        slot_count
            zero-copy-ipc's name for ``max_items``; give one of the two at most.

        Raises
        ------
        BlockExistsError
            A block of that name exists (it is left as it was).
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
        heap_bytes = align(_size("heap_size", heap_size, MIN_HEAP) + heap_overhead(), 64)
        control = header_size_for(extra_len=Geometry.packed_size(), name=block_name)
        geometry = Geometry.plan(control, items, heap_bytes)
        total = geometry.block_size
        if total >= MAX_BLOCK:
            raise ValueError(f"a dict block of {total} bytes is too large")
        header = encode_header(
            BlockKind.DICT, nbytes=total - control, extra=geometry.pack(), name=block_name
        )
        self = cls._create(total, name=block_name)
        with self._creating():
            block = self._live_block()
            block.make_present(0, total)
            Heap.format(block.buf, geometry.heap, geometry.heap_size)
            self._publish(header)  # last: attach waits for the block until now
            self._setup(name, geometry)
        return self

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to the dict that :meth:`create` made under ``name``.

        Raises
        ------
        BlockNotFoundError
            No such dict.
        UntrustedBlockError
            The block belongs to another user, or others may write it.
        LayoutError
            The block is not a dict, or its header or geometry is corrupt.
        """
        return cls._attach(name)

    @classmethod
    def _attach(
        cls, name: str, *, identity: str | None = None, block_id: bytes | None = None
    ) -> Self:
        block_name = _block_name(name, for_attach=True)
        self = cls._open(block_name, identity=identity, block_id=block_id)
        try:
            header, block = self._header, self._live_block()
            assert header is not None
            geometry = Geometry.unpack(
                header.extra,
                data_offset=header.data_offset,
                block_size=block.size,
                where=f"block {block_name!r}",
            )
            self._setup(name, geometry)
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self, name: str, geometry: Geometry) -> None:
        """Build the layers over the mapped block (table, journal, lock, cache)."""
        block = self._live_block()
        self._dict_name = name
        self.block_name = block.name
        self.max_items = geometry.max_items
        table = Table(block.buf, geometry, name)
        self._buf = block.buf
        self._table = table
        self._heap = table.heap
        self._ctl = table.ctl
        self._journal = Journal(table, self._forget)
        self._cache = {}
        self._cache_version = -1
        self._lock = BlockLock.for_block(block)
        # A handle dropped without close() still gives its lock descriptor back.
        self._release_lock = weakref.finalize(self, self._lock.release_ref)

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

    # -- locking and the crash protocol ------------------------------------------------

    def _acquire(self) -> None:
        """Take the lock; whoever finds a mutation cut short (at any depth) repairs first."""
        self._lock.acquire()
        if self._ctl[HOLDER_PID]:
            self._repair_holding()

    def _repair_holding(self) -> None:
        """Repair with the lock just taken; release it if the repair fails."""
        try:
            self._journal.repair()
        except BaseException:
            self._lock.release()
            raise

    def _forget(self) -> None:
        """Drop the read cache (after a repair)."""
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
        self._cache_version = self._journal.begin()

    def _failed(self) -> None:
        """A mutation raised: repair now, with the lock still held, so nothing half-done shows.

        If the repair itself is interrupted the marker stays set, and the next
        operation repairs.
        """
        self._journal.repair()

    def lock(self) -> SharedDictLock:
        """Return a context manager holding the dict's lock: one atomic step.

        Re-entrant within a thread (also across handles of the same dict in
        this process); excludes other threads and other processes.
        """
        return SharedDictLock(self)

    def _remember(self, key: object, value: object, data: bytes | memoryview) -> None:
        """Cache ``key -> value`` (lock held, cache valid for the current version)."""
        cache = self._cache
        if len(cache) >= _CACHE_MAX_ITEMS:
            cache.clear()
        if type(value) in _IMMUTABLE_VALUES or value is _ABSENT:
            cache[key] = value
        elif len(data) > _CACHE_MAX_VALUE:
            cache.pop(key, None)
        elif type(value) in _CONTAINERS and _immutable(value):
            cache[key] = value  # a tuple of scalars: hits need not unpickle
        else:
            cache[key] = _Pickled(data)

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
        table = self._table
        if _LOCK_FREE_READS:
            ctl = self._ctl
            version = ctl[VERSION]
            if not ctl[HOLDER_PID]:
                try:
                    index, word, _ = table.probe(encoded, key_hash)
                    data = bytes(table.entry_value(word & OFFSET_MASK)) if index >= 0 else None
                except (IndexError, LayoutError):  # read a structure being changed
                    pass
                else:
                    if ctl[VERSION] == version:
                        return version, data
        self._acquire()
        try:
            index, word, _ = table.probe(encoded, key_hash)
            data = bytes(table.entry_value(word & OFFSET_MASK)) if index >= 0 else None
            return self._ctl[VERSION], data
        finally:
            self._lock.release()

    def _remember_at(self, version: int, key: object, value: object, data: bytes) -> None:
        """Cache what was read at ``version`` if the dict is still at that version."""
        with self._lock.thread_lock:  # excludes this process's writers, who update the cache
            if self._ctl[VERSION] != version:
                return
            if self._cache_version != version:
                self._cache.clear()
                self._cache_version = version
            self._remember(key, value, data)

    def __getitem__(self, key: object) -> Any:
        cacheable = type(key) in _CACHEABLE_KEYS
        if cacheable and self._ctl[VERSION] == self._cache_version:
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
        if cacheable and self._ctl[VERSION] == self._cache_version:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit is not _ABSENT
        try:
            encoded, _ = encode_key(key)
        except TypeError:
            return False  # not a key type: in no SharedDict
        version, data = self._fetch(encoded, _crc32(encoded))
        if data is None and cacheable:
            self._remember_at(version, key, _ABSENT, b"")
        return data is not None

    def __setitem__(self, key: object, value: object) -> None:
        encoded, exact = encode_key(key)
        data = _dumps(value, _PICKLE_PROTOCOL)
        original = b"" if exact else _dumps(key, _PICKLE_PROTOCOL)
        key_hash = _crc32(encoded)
        self._acquire()
        try:
            self._begin()
            try:
                replaced = self._table.put(encoded, key_hash, original, data)[1]
                if replaced > TOMBSTONE:
                    self._heap.free(replaced & OFFSET_MASK)
            except AllocationError:
                self._journal.end()  # put changed nothing
                raise
            except BaseException:
                self._failed()
                raise
            self._journal.end()
            if type(key) in _CACHEABLE_KEYS:
                self._remember(key, value, data)
            else:
                self._cache.clear()  # e.g. a str subclass may alias a cached str key
        finally:
            self._lock.release()

    def __delitem__(self, key: object) -> None:
        self._pop(key, _MISSING, want_value=False)

    def _remove(self, index: int, word: int) -> None:
        """Unpublish slot ``index`` and free its entry, as one mutation (lock held)."""
        self._begin()
        try:
            self._table.unpublish(index, word)
        except BaseException:
            self._failed()
            raise
        self._journal.end()

    def _pop(self, key: object, default: object, *, want_value: bool = True) -> Any:
        encoded, _ = encode_key(key)
        key_hash = zlib.crc32(encoded)
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
            table = self._table
            for index, word in enumerate(table.active().tolist()):
                if word > TOMBSTONE:
                    entry = word & OFFSET_MASK
                    key, value = table.entry_key(entry), table.load_value(entry)
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
            self._update_locked(items)
        finally:
            self._lock.release()

    def _update_locked(self, items: list[tuple[bytes, int, bytes, bytes]]) -> None:
        """The body of :meth:`update`: one journalled mutation (lock held)."""
        ctl, table, journal = self._ctl, self._table, self._journal
        new_keys = {e for e, h, _, _ in items if table.probe(e, h)[0] < 0}
        count = ctl[COUNT]
        if count + len(new_keys) > self.max_items:
            raise AllocationError(
                f"SharedDict {self.name!r} cannot take {len(new_keys)} new keys: "
                f"{count} of max_items {self.max_items} used",
                len(new_keys),
            )
        self._begin()
        try:
            if count + ctl[TOMBSTONES] + len(new_keys) > table.fill_limit:
                table.rebuild()  # now no put below rebuilds: journal indices hold
            saved = (ctl[COUNT], ctl[TOMBSTONES])
            done: list[tuple[int, int]] = []
            try:
                journal.arm(len(items))
                for encoded, key_hash, original, data in items:
                    done.append(table.put(encoded, key_hash, original, data, journal))
            except AllocationError:
                journal.abandon(done, saved)
                journal.end()
                raise
            journal.commit()
            for _, replaced in done:
                if replaced > TOMBSTONE:
                    self._heap.free(replaced & OFFSET_MASK)
        except AllocationError:
            raise
        except BaseException:
            self._failed()
            raise
        journal.end()
        self._cache.clear()

    def clear(self) -> None:
        """Remove every key (switches to the empty inactive table, then resets the heap)."""
        self._acquire()
        try:
            self._begin()
            try:
                self._table.reset()
            except BaseException:
                self._failed()
                raise
            self._journal.end()
            self._cache.clear()
        finally:
            self._lock.release()

    def __len__(self) -> int:
        ctl = self._ctl
        if _LOCK_FREE_READS:  # seqlock-style, as in _fetch: a count no mutation is changing
            version = ctl[VERSION]
            if not ctl[HOLDER_PID]:
                count = ctl[COUNT]
                if ctl[VERSION] == version:
                    return int(count)
        self._acquire()
        try:
            return int(self._ctl[COUNT])
        finally:
            self._lock.release()

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

    def stats(self) -> dict[str, Any]:
        """Return table and heap figures.

        Returns
        -------
        dict
            ``name``, ``is_owner`` (this handle created the dict),
            ``used_slots`` (keys stored), ``max_items``, ``load_factor``
            (used_slots / max_items), ``slot_count`` (table slots),
            ``tombstones``, ``heap_size`` (bytes blocks can occupy),
            ``heap_used`` (bytes in allocated blocks, tags included),
            ``heap_free``, ``version`` (number of mutations so far),
            ``repairs`` (crash repairs so far).
        """
        self._acquire()
        try:
            ctl = self._ctl
            count = int(ctl[COUNT])
            return {
                "name": self.name,
                "is_owner": self.owner,
                "used_slots": count,
                "max_items": self.max_items,
                "load_factor": count / self.max_items,
                "slot_count": self._table.slots,
                "tombstones": int(ctl[TOMBSTONES]),
                "heap_size": self._heap.capacity,
                "heap_used": self._heap.used,
                "heap_free": self._heap.capacity - self._heap.used,
                "version": int(ctl[VERSION]),
                "repairs": int(ctl[REPAIRS]),
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
            self._table.check()
        finally:
            self._lock.release()

    # -- lifetime ----------------------------------------------------------------------

    def _release(self) -> None:
        """Let go of the table's views and this handle's share of the lock."""
        if self._release_lock is None:
            return
        # Lock-free paths read _ctl, every other path takes _lock first: both raise now.
        closed = _Closed(self.name)
        self._ctl = closed  # type: ignore[assignment]
        self._lock = closed  # type: ignore[assignment]
        self._cache = {}
        self._cache_version = -1
        self._table.release()
        self._buf.release()
        self._release_lock()

    def __repr__(self) -> str:
        if self._block is None:
            return f"<SharedDict {self.name!r} closed>"
        return f"<SharedDict {self.name!r} {len(self)} of {self.max_items} keys>"


ZeroCopyDict = SharedDict
