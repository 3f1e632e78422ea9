"""Single-process tests of SharedDict: mapping behaviour, keys, capacity, repair, lifetime."""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from _children_dict import Point, Tagged
from conftest import block_exists
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shared_memory_array
from shared_memory_array import (
    AllocationError,
    BlockExistsError,
    BlockNotFoundError,
    LayoutError,
    SharedArrayError,
    SharedDict,
    SharedDictLock,
    ZeroCopyDict,
)
from shared_memory_array._block import PREFIX, SharedBlock
from shared_memory_array._dict._keys import decode_key, encode_key
from shared_memory_array._header import BlockKind, encode_header, header_size_for

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

_counter = iter(range(1 << 30))


def unique_name() -> str:
    return f"test_dict_{os.getpid()}_{next(_counter)}"


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    with SharedDict.create(unique_name(), max_items=64, heap_size=1 << 16) as d:
        yield d


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Number(enum.IntEnum):
    ONE = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Mutable:
    """Compares by identity: no canonical encoding."""

    value: int


class Opaque:
    """Hashable by identity, no canonical encoding."""

    def __init__(self, value: int) -> None:
        self.value = value


def normalized(key: object) -> object:
    """A representation of a key that tells 1, 1.0 and True apart, stable across processes."""
    if isinstance(key, frozenset):
        return ("frozenset", sorted(repr(normalized(k)) for k in key))
    if isinstance(key, tuple):
        return ("tuple", [normalized(k) for k in key])
    return (type(key).__name__, repr(key))


# -- keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        None,
        0,
        -1,
        2**70,
        -(2**70),
        1.5,
        -0.25,
        "",
        "é\ud800",
        b"\x00",
        (1, ("a", b"b")),
        frozenset(),
    ],
)
def test_key_encoding_round_trips(key: object) -> None:
    """decode_key(encode_key(k)) gives back a key equal to k, of the same type when exact."""
    encoded, exact = encode_key(key)
    assert exact
    decoded = decode_key(encoded)
    assert decoded == key
    assert normalized(decoded) == normalized(key)


def test_equal_keys_encode_equally() -> None:
    """Keys equal in a dict (1, 1.0, True; -0.0 and 0; frozensets of any order) encode equally."""
    assert encode_key(1)[0] == encode_key(1.0)[0] == encode_key(True)[0]
    assert encode_key(0)[0] == encode_key(-0.0)[0] == encode_key(False)[0]
    assert encode_key((1, "a"))[0] == encode_key((True, "a"))[0]
    members = [str(i) for i in range(50)]
    assert encode_key(frozenset(members))[0] == encode_key(frozenset(reversed(members)))[0]
    assert encode_key(frozenset({1, 2.5}))[0] == encode_key(frozenset({2.5, 1.0}))[0]
    assert encode_key("1")[0] != encode_key(1)[0] != encode_key(b"1")[0]


def test_numeric_aliases_share_one_entry(shared: SharedDict) -> None:
    """1, 1.0 and True are one key, and the key first inserted is the one kept, as in a dict."""
    shared[1.0] = "float"
    shared[True] = "bool"
    shared[1] = "int"
    assert len(shared) == 1
    assert shared[1.0] == shared[True] == "int"
    (key,) = list(shared)
    assert type(key) is float
    assert key == 1.0


def test_unhashable_key_is_rejected(shared: SharedDict) -> None:
    """An unhashable key raises TypeError on store and is simply absent on lookup."""
    with pytest.raises(TypeError):
        shared[[1, 2]] = 1
    assert [1, 2] not in shared
    assert len(shared) == 0


@pytest.mark.parametrize("key", [range(3), Decimal("1.5"), object(), (1, range(2)), Opaque(1)])
def test_keys_of_other_types_are_refused_by_type(shared: SharedDict, key: object) -> None:
    """A hashable key of a type without a canonical encoding raises TypeError naming the type."""
    with pytest.raises(TypeError, match=r"range|Decimal|object|Opaque"):
        shared[key] = "value"
    assert key not in shared
    assert len(shared) == 0


def test_portable_key_kinds_encode_canonically() -> None:
    """Enum members, named tuples, frozen dataclasses, complex, numpy scalars encode canonically."""
    assert encode_key(Point(1, "a"))[0] == encode_key((1, "a"))[0]
    assert encode_key(complex(2, 0))[0] == encode_key(2)[0]
    assert encode_key(complex(0.5, -0.0))[0] == encode_key(0.5)[0]
    assert encode_key(complex(-0.0, 1))[0] == encode_key(complex(0.0, 1))[0]
    assert encode_key(np.int64(3))[0] == encode_key(3)[0]
    assert encode_key(np.bool_(True))[0] == encode_key(1)[0]
    assert encode_key(np.float32(0.5))[0] == encode_key(0.5)[0]
    assert encode_key(np.float32(0.1))[0] != encode_key(0.1)[0]  # unequal, as in a dict
    assert encode_key(np.complex64(1 + 2j))[0] == encode_key(1 + 2j)[0]
    assert encode_key(Colour.RED)[0] != encode_key(Colour.BLUE)[0] != encode_key("red")[0]
    assert encode_key(Number.ONE)[0] == encode_key(1)[0]  # an IntEnum member equals its int
    tags = [str(i) for i in range(20)]
    assert (
        encode_key(Tagged("t", frozenset(tags)))[0]
        == encode_key(Tagged("t", frozenset(reversed(tags))))[0]
    )
    assert encode_key(Tagged("t", frozenset()))[0] != encode_key(Tagged("u", frozenset()))[0]
    assert decode_key(encode_key(Colour.BLUE)[0]) is Colour.BLUE
    with pytest.raises(TypeError, match="datetime64"):
        encode_key(np.datetime64("2020-01-01"))
    with pytest.raises(TypeError, match="Mutable"):
        encode_key(Mutable(1))


def test_portable_keys_round_trip_through_the_dict(shared: SharedDict) -> None:
    """Each portable key kind is found by an equal key and iterates back as first inserted."""
    keys = [Colour.RED, Point(2, "b"), Tagged("x", frozenset({"a"})), np.int64(5), 1 + 2j]
    for number, key in enumerate(keys):
        shared[key] = number
    assert shared[(2, "b")] == 1
    assert shared[5] == 3
    assert shared[Tagged("x", frozenset({"a"}))] == 2
    assert sorted(map(repr, shared)) == sorted(map(repr, keys))


# -- values ---------------------------------------------------------------------------


def test_numpy_values_keep_dtype_and_shape(shared: SharedDict) -> None:
    """A numpy array value comes back with its dtype, shape and data."""
    array = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]
    shared["array"] = array
    back = shared["array"]
    assert back.dtype == np.int16
    assert back.shape == (3, 2)
    np.testing.assert_array_equal(back, array)


def test_mutable_values_are_fresh_copies(shared: SharedDict) -> None:
    """Each read of a mutable value returns a new object: mutating it changes nothing shared."""
    shared["list"] = [1, 2]
    first = shared["list"]
    first.append(3)
    assert shared["list"] == [1, 2]
    assert shared["list"] is not shared["list"]


def test_cached_immutable_values_are_kept_as_objects(shared: SharedDict) -> None:
    """Cached reads of tuples of scalars return the same object; with a list inside, fresh ones."""
    shared["tuple"] = (1, "a", (2.5, None, b"x"), frozenset({3}))
    assert shared["tuple"] == (1, "a", (2.5, None, b"x"), frozenset({3}))
    assert shared["tuple"] is shared["tuple"]
    shared["inner list"] = (1, [2])
    first = shared["inner list"]
    first[1].append(3)
    assert shared["inner list"] == (1, [2])
    assert shared["inner list"] is not shared["inner list"]


def test_mapping_methods(shared: SharedDict) -> None:
    """get, pop, popitem, setdefault, update, keys/values/items and clear behave as on a dict."""
    shared.update({"a": 1, "b": 2}, c=3)
    assert shared.get("a") == 1
    assert shared.get("z", "dflt") == "dflt"
    assert sorted(shared.keys()) == ["a", "b", "c"]
    assert sorted(shared.values()) == [1, 2, 3]
    assert sorted(shared.items()) == [("a", 1), ("b", 2), ("c", 3)]
    assert shared.pop("a") == 1
    assert shared.pop("a", None) is None
    with pytest.raises(KeyError):
        shared.pop("a")
    assert shared.setdefault("b", 99) == 2
    assert shared.setdefault("d", 4) == 4
    key, value = shared.popitem()
    assert key not in shared
    assert value in (2, 3, 4)
    shared.update([("x", 1), ("x", 2)])
    assert shared["x"] == 2
    assert shared == {k: v for k, v in shared.items()}
    shared.clear()
    assert len(shared) == 0
    assert list(shared) == []
    with pytest.raises(KeyError):
        shared.popitem()
    with pytest.raises(KeyError):
        del shared["nope"]


# -- capacity ---------------------------------------------------------------------------


def test_max_items_distinct_keys_fit_and_one_more_fails() -> None:
    """Exactly max_items keys fit; the next new key raises AllocationError and changes nothing."""
    with SharedDict.create(unique_name(), max_items=10, heap_size=1 << 16, grow=False) as d:
        for i in range(10):
            d[i] = i
        with pytest.raises(AllocationError, match="full"):
            d[10] = 10
        d[3] = "replaced"  # an existing key still takes a new value
        assert dict(d.items()) == {**{i: i for i in range(10)}, 3: "replaced"}
        d._check()


def test_table_survives_many_tombstones() -> None:
    """Inserting and deleting far more keys than slots keeps working (tombstones get rebuilt)."""
    with SharedDict.create(unique_name(), max_items=8, heap_size=1 << 16) as d:
        for i in range(500):
            d[f"k{i}"] = i
            if i >= 5:
                del d[f"k{i - 5}"]
        assert dict(d.items()) == {f"k{i}": i for i in range(495, 500)}
        d._check()


def test_heap_full_leaves_contents_unchanged() -> None:
    """A value too large for the heap raises AllocationError; every key keeps its value."""
    with SharedDict.create(unique_name(), max_items=10, heap_size=4096, grow=False) as d:
        d["a"] = b"x" * 1000
        d["b"] = 2
        before = dict(d.items())
        with pytest.raises(AllocationError) as info:
            d["a"] = b"y" * 5000
        assert isinstance(info.value, MemoryError)
        assert isinstance(info.value, SharedArrayError)
        with pytest.raises(AllocationError):
            d["c"] = b"y" * 5000
        assert dict(d.items()) == before
        d._check()


@pytest.mark.parametrize("reason", ["table", "heap"])
def test_update_is_all_or_nothing(reason: str) -> None:
    """An update that does not fit raises AllocationError and stores none of its pairs."""
    with SharedDict.create(unique_name(), max_items=8, heap_size=4096, grow=False) as d:
        d.update({"a": 1, "b": 2})
        before = dict(d.items())
        batch: dict[str, object]
        if reason == "table":
            batch = {f"n{i}": i for i in range(7)}
        else:
            batch = {"a": "new", "z": b"q" * 1000, "y": b"q" * 4000}  # 4096 + 8 entries: no room
        with pytest.raises(AllocationError):
            d.update(batch)
        assert dict(d.items()) == before
        d._check()


# -- names, errors and lifetime -----------------------------------------------------------


def test_block_name_carries_prefix_and_attach_takes_either() -> None:
    """create("x") makes block sma_x; attach("x") and attach("sma_x") both find it."""
    name = unique_name()
    with SharedDict.create(name, max_items=4, heap_size=4096) as d:
        assert d.block_name == PREFIX + name
        assert block_exists(PREFIX + name)
        d["k"] = "v"
        for alias in (name, PREFIX + name):
            with SharedDict.attach(alias) as other:
                assert other["k"] == "v"
    assert not block_exists(PREFIX + name)


def test_create_existing_name_raises() -> None:
    """Creating a dict under a name in use raises BlockExistsError and leaves the first intact."""
    name = unique_name()
    with SharedDict.create(name, max_items=4, heap_size=4096) as d:
        d["k"] = 1
        with pytest.raises(BlockExistsError):
            SharedDict.create(name, max_items=4, heap_size=4096)
        assert d["k"] == 1
        with SharedDict.attach(name) as other:
            assert dict(other.items()) == {"k": 1}


def test_sizes_accept_any_integer_and_slot_count_alias() -> None:
    """max_items and heap_size take integer-likes (numpy ints); slot_count is max_items' alias."""
    with SharedDict.create(unique_name(), max_items=np.int64(10), heap_size=np.uint32(4096)) as d:
        assert d.max_items == 10
        assert type(d.max_items) is int
    with SharedDict.create(unique_name(), slot_count=12, heap_size=4096) as d:
        assert d.stats()["max_items"] == 12
    with pytest.raises(TypeError, match="slot_count"):
        SharedDict.create(unique_name(), max_items=4, slot_count=4)


@pytest.mark.parametrize(
    ("name", "error"),
    [("", ValueError), ("a/b", ValueError), ("x" * 201, ValueError), (3, TypeError)],
)
def test_create_rejects_bad_names(name: Any, error: type[Exception]) -> None:
    """Names that are empty, too long, with unsafe characters or not str are refused."""
    with pytest.raises(error):
        SharedDict.create(name, max_items=4, heap_size=4096)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_items": 0}, ValueError),
        ({"heap_size": 10}, ValueError),
        ({"max_items": 1.5}, TypeError),
        ({"max_items": True}, TypeError),
        ({"slot_count": "8"}, TypeError),
    ],
)
def test_create_rejects_bad_sizes(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """A non-positive or non-integer max_items or a tiny heap is refused before any block exists."""
    with pytest.raises(error):
        SharedDict.create(unique_name(), **kwargs)


def test_attach_missing_raises_block_not_found() -> None:
    """Attaching a name no dict has raises BlockNotFoundError (a KeyError)."""
    with pytest.raises(BlockNotFoundError):
        SharedDict.attach(unique_name())
    with pytest.raises(BlockNotFoundError):
        SharedDict.attach("bad/name")


def test_attach_rejects_other_kinds_and_bad_geometry() -> None:
    """A block of another kind, or a dict header with impossible geometry, raises LayoutError."""
    name = unique_name()
    header = encode_header(BlockKind.ARRAY, nbytes=0)
    block = SharedBlock.create(4096, name=PREFIX + name)
    try:
        block.buf[: len(header)] = header
        with pytest.raises(LayoutError, match="kind"):
            SharedDict.attach(name)
    finally:
        block.close()
        block.unlink()
    # A dict whose data block's geometry is impossible (written over by another process).
    with SharedDict.create(name, max_items=4, heap_size=4096) as made:
        data_name = made._data.name
        data = SharedBlock.attach(data_name)
        try:
            control = header_size_for(extra_len=48, name=data_name)  # a 48-byte geometry
            geometry = (control, 10**12, 12, 5, 0, 0)
            extra = b"".join(value.to_bytes(8, "little") for value in geometry)
            header = encode_header(
                BlockKind.DICT_DATA, nbytes=data.size - control, extra=extra, name=data_name
            )
            data.buf[: len(header) - 512] = header[:-512]  # the header, not the lifetime area
            with pytest.raises(LayoutError, match="slot count 12"):
                SharedDict.attach(name)
        finally:
            data.close()


def test_close_is_idempotent_and_later_use_raises() -> None:
    """close() twice is fine; any use afterwards raises ValueError; the creator unlinks."""
    name = unique_name()
    d = SharedDict.create(name, max_items=4, heap_size=4096)
    other = SharedDict.attach(name)
    other.close()
    other.close()
    d["k"] = 1  # the attached handle's close did not unlink
    d.close()
    d.close()
    assert d.closed
    for use in (lambda: d["k"], lambda: d.__setitem__("k", 2), lambda: len(d), d.stats):
        with pytest.raises(ValueError, match="closed"):
            use()
    with pytest.raises(BlockNotFoundError):
        SharedDict.attach(name)


def test_alias_and_pickle_handle(shared: SharedDict) -> None:
    """ZeroCopyDict is SharedDict; a pickled handle unpickles as an attached handle."""
    assert ZeroCopyDict is SharedDict
    shared["k"] = "v"
    with pickle.loads(pickle.dumps(shared)) as again:
        assert again["k"] == "v"
        assert again.name == shared.name


def test_stats_and_gc_stats(shared: SharedDict) -> None:
    """stats() and gc_stats() report the documented figures consistently."""
    shared.update({i: "x" * i for i in range(10)})
    stats = shared.stats()
    assert stats["name"] == shared.name
    assert stats["is_owner"] is True
    with SharedDict.attach(shared.name) as other:
        assert other.stats()["is_owner"] is False
    assert stats["used_slots"] == 10
    assert stats["max_items"] == 64
    assert stats["load_factor"] == 10 / 64
    assert 0 < stats["heap_used"] < stats["heap_size"]
    gc = shared.gc_stats()
    assert gc["total_free_space"] == stats["heap_size"] - stats["heap_used"]
    assert gc["total_free_blocks"] >= 1
    assert 0.0 <= gc["fragmentation"] <= 1.0


# -- locking -------------------------------------------------------------------------------


def test_lock_returns_the_public_lock_class(shared: SharedDict) -> None:
    """d.lock() returns a SharedDictLock, exported by the package, whose with-target is d."""
    lock = shared.lock()
    assert isinstance(lock, SharedDictLock)
    assert "SharedDictLock" in shared_memory_array.__all__
    with lock as held:
        assert held is shared


def test_lock_is_reentrant_across_handles(shared: SharedDict) -> None:
    """lock() nests, also with a second handle of the same dict in this process."""
    with SharedDict.attach(shared.name) as other:
        with shared.lock(), other.lock(), shared.lock():
            other["n"] = 1
            shared["n"] = shared["n"] + 1
        assert other["n"] == 2


def test_reused_name_gets_its_own_lock() -> None:
    """A new dict under a name whose old block is still mapped here gets a lock of its own."""
    name = unique_name()
    old = SharedDict.create(name, max_items=4, heap_size=4096)
    still_mapped = SharedDict.attach(name)
    old.close()  # unlinks the name; still_mapped keeps the old block
    with SharedDict.create(name, max_items=4, heap_size=4096) as new:
        assert new._lock is not still_mapped._lock
        with new.lock(), still_mapped.lock():
            new["k"] = "new block"
        assert still_mapped.get("k") is None
    still_mapped.close()


def test_threads_increment_exactly(shared: SharedDict) -> None:
    """Threads doing locked read-modify-write increments lose none."""
    shared["n"] = 0

    def work() -> None:
        for _ in range(200):
            with shared.lock():
                shared["n"] += 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert shared["n"] == 800


def test_cache_sees_writes_of_other_handles(shared: SharedDict) -> None:
    """A read served from one handle's cache reflects a write made through another handle."""
    shared["k"] = 1
    assert shared["k"] == 1
    assert "new" not in shared
    with SharedDict.attach(shared.name) as other:
        other["k"] = 2
        other["new"] = 3
    assert shared["k"] == 2
    assert "new" in shared


# -- crash repair ---------------------------------------------------------------------------


def test_interrupted_mutation_is_repaired_on_next_lock(shared: SharedDict) -> None:
    """A recorded in-progress mutation with damaged heap lists and a leak is repaired."""
    shared.update({f"k{i}": i for i in range(20)})
    del shared["k3"]
    table = shared._table
    table.heap.alloc(500)  # a leaked entry, as left by a writer killed before publishing
    table.ctl.holder_pid = 999_999  # a mutation was in progress
    heap_lists = 8 * 8  # the heap's lists, after its 8 meta words (see _heap)
    table.hbuf[heap_lists : heap_lists + 8 * 96] = bytes(8 * 96)  # free lists lost
    assert shared["k5"] == 5
    assert shared.stats()["repairs"] == 1
    shared._check()
    assert dict(shared.items()) == {f"k{i}": i for i in range(20) if i != 3}


# -- state machine ----------------------------------------------------------------------------

keys = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 1.0, 2.0, 0.5, -1.5]),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.tuples(st.integers(0, 2), st.text(max_size=1)),
    st.frozensets(st.integers(0, 3), max_size=3),
)
values = st.one_of(
    st.integers(),
    st.text(max_size=20),
    st.binary(max_size=300),
    st.lists(st.integers(), max_size=5),
    st.none(),
)


class DictMachine(RuleBasedStateMachine):
    """SharedDict against a plain dict: same contents and key types after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name()
        self.owner = SharedDict.create(self.name, max_items=12, heap_size=4096)
        self.handle = SharedDict.attach(self.name)
        self.model: dict[Any, Any] = {}

    def _apply(self, action: Any) -> None:
        """Run ``action`` on the shared dict; on AllocationError the model stays as it was."""
        try:
            action(self.handle)
        except AllocationError:
            return
        action(self.model)

    @rule(key=keys, value=values)
    def set(self, key: Any, value: Any) -> None:
        self._apply(lambda d: d.__setitem__(key, value))

    @rule(key=keys)
    def get(self, key: Any) -> None:
        assert self.handle.get(key, "missing") == self.model.get(key, "missing")
        assert (key in self.handle) == (key in self.model)

    @rule(key=keys)
    def delete(self, key: Any) -> None:
        if key in self.model:
            del self.handle[key]
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                del self.handle[key]

    @rule(key=keys)
    def pop(self, key: Any) -> None:
        assert self.handle.pop(key, "missing") == self.model.pop(key, "missing")

    @rule(key=keys, value=values)
    def setdefault(self, key: Any, value: Any) -> None:
        self._apply(lambda d: d.setdefault(key, value))

    @rule(batch=st.lists(st.tuples(keys, values), max_size=6))
    def update(self, batch: list[tuple[Any, Any]]) -> None:
        self._apply(lambda d: d.update(batch))

    @precondition(lambda self: len(self.model) > 8)
    @rule()
    def clear(self) -> None:
        self.handle.clear()
        self.model.clear()

    @rule()
    def reattach(self) -> None:
        self.handle.close()
        self.handle = SharedDict.attach(self.name)

    @invariant()
    def same_contents(self) -> None:
        self.handle._check()
        assert len(self.handle) == len(self.model)
        ours = {repr(normalized(k)): v for k, v in self.handle.items()}
        theirs = {repr(normalized(k)): v for k, v in self.model.items()}
        assert ours == theirs

    def teardown(self) -> None:
        self.handle.close()
        self.owner.close()


TestDictMachine = DictMachine.TestCase
