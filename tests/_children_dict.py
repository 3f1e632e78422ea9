"""Functions run in child processes by the SharedDict tests (importable under spawn).

Also runnable as a script for the PYTHONHASHSEED tests:
``python _children_dict.py NAME`` attaches, checks the parent's keys and writes its own;
``python _children_dict.py add-missing NAME`` stores each of PORTABLE_KEYS unless present.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import signal
import sys
import time
from typing import Any, NamedTuple

import numpy as np

from shared_memory_array import SharedDict
from shared_memory_array._heap import Heap


class Colour(enum.Enum):
    """A plain Enum: its members are keys by class and name."""

    RED = "red"
    BLUE = ("blue", 2)


class Point(NamedTuple):
    """A named tuple: the same key as the plain tuple it equals."""

    x: int
    y: str


@dataclasses.dataclass(frozen=True)
class Tagged:
    """A frozen dataclass holding a frozenset of strings (its pickle varies with the hash seed)."""

    label: str
    tags: frozenset[str]


# Keys whose canonical encoding must not depend on the process or its hash seed.
PORTABLE_KEYS: list[Any] = [
    Tagged("t", frozenset({"alpha", "beta", "gamma", "delta", "epsilon"})),
    Colour.BLUE,
    Point(1, "p"),
    (Colour.RED, frozenset({"x", "y", "z"})),
    np.int64(7),
    np.float32(0.5),
    complex(1.5, -2.0),
    frozenset({Tagged("u", frozenset({"q", "r", "s"})), b"raw", None}),
]

# Keys whose built-in hash() differs between processes with different PYTHONHASHSEED.
PARENT_KEYS: dict[Any, Any] = {
    "text key": 1,
    b"bytes key": 2,
    ("tuple", b"key", 3): 3,
    frozenset({"a", "b", "c", "d", "e"}): 4,
    frozenset({("x", 1), ("y", 2)}): 5,
}
CHILD_KEYS: dict[Any, Any] = {"from child": "hello", frozenset({"p", "q", "r"}): "set"}


def increment(name: str, times: int) -> int:
    """Attach and add 1 to ``d["n"]`` ``times`` times, each under ``lock()``."""
    with SharedDict.attach(name) as shared:
        for _ in range(times):
            with shared.lock():
                shared["n"] = shared["n"] + 1
    return times


def hold_lock(name: str, ready: Any) -> None:
    """Take the dict's lock, tell the parent, and sleep holding it (until killed)."""
    shared = SharedDict.attach(name)
    with shared.lock():
        shared["holder"] = os.getpid()
        ready.set()
        time.sleep(120)


def write_forever(name: str, ready: Any) -> None:
    """Overwrite a few keys with values of changing sizes as fast as possible (until killed)."""
    shared = SharedDict.attach(name)
    round_number = 0
    while True:
        for slot in range(20):
            size = (round_number * 7 + slot * 13) % 900
            shared[f"k{slot}"] = (round_number, bytes([slot % 256]) * size)
        shared.update({f"u{slot}": round_number for slot in range(5)})
        if round_number % 3 == 0:
            shared.pop("extra", None)
        else:
            shared["extra"] = round_number
        round_number += 1
        if round_number == 5:
            ready.set()


def python_path(shared: SharedDict) -> SharedDict:
    """Take ``shared`` off the accelerator (``_accel``): fault injection patches the Python
    twins, which the accelerator's C steps never call (``tests/test_native.py`` kills the C
    steps at every store instead)."""
    shared._fast = None
    shared._table.core = None
    shared._table.heap._address = 0
    return shared


def die_inside(name: str, where: str) -> None:
    """Start ``d["k0"] = ...`` and SIGKILL this process at a chosen point inside it.

    ``where`` is ``"heap"`` (right after the first free-list update: heap lists
    half-updated, nothing published), ``"free"`` (new entry published, the
    replaced entry not yet freed) or ``"update"`` (three of six slots of an
    ``update`` published).
    """
    shared = python_path(SharedDict.attach(name))

    def kill_after(method: str) -> None:
        original = getattr(Heap, method)

        def killed(self: Heap, *args: Any) -> None:
            original(self, *args)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(Heap, method, killed)

    if where == "update":
        kill_at_alloc(5)  # the journal and three entries allocated: three slots published
        shared.update({f"k{i}": ("new", b"n" * 200) for i in range(6)})
        return
    if where == "heap":
        kill_after("_insert")
        kill_after("_unlink")
    else:

        def killed_before(self: Heap, payload: int) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        Heap.free = killed_before  # type: ignore[method-assign]
    shared["k0"] = ("new", b"n" * 200)


def kill_at_alloc(calls: int) -> None:
    """Make this process SIGKILL itself on its ``calls``-th heap allocation."""
    original = Heap.alloc
    count = [0]

    def alloc(self: Heap, nbytes: int) -> int:
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, nbytes)

    Heap.alloc = alloc  # type: ignore[method-assign]


def die_inside_update(name: str) -> None:
    """Run ``update`` of ``k0``..``k9`` and SIGKILL this process after 5 of its 10 slots changed."""
    shared = python_path(SharedDict.attach(name))
    kill_at_alloc(7)  # the journal, then one entry per key: five published, the sixth allocating
    shared.update({f"k{i}": "new" for i in range(10)})


def die_inside_repair(name: str, stores: int) -> None:
    """Attach, start repairing and SIGKILL this process after ``stores`` journal slot restores."""
    from shared_memory_array._dict import _journal

    original = _journal.restore_slot
    count = [0]

    def restore_slot(table: Any, index: int, word: int) -> None:
        original(table, index, word)
        count[0] += 1
        if count[0] == stores:
            os.kill(os.getpid(), signal.SIGKILL)

    _journal.restore_slot = restore_slot
    shared = SharedDict.attach(name)
    shared.stats()  # any locked operation repairs first
    sys.exit("the repair did not reach the kill point")


def update_and_clear_forever(name: str, ready: Any) -> None:
    """Alternate ``update`` of 50 new keys and ``clear()`` (until killed)."""
    shared = SharedDict.attach(name)
    rounds = 0
    while True:
        shared.update({f"r{rounds}_{i}": i for i in range(50)})
        shared.clear()
        rounds += 1
        if rounds == 5:
            ready.set()


def hashseed_check(name: str) -> None:
    """Script body: verify the parent's keys, then store CHILD_KEYS."""
    with SharedDict.attach(name) as shared:
        for key, value in PARENT_KEYS.items():
            assert shared[key] == value, key
        assert set(shared) == set(PARENT_KEYS)
        shared.update(CHILD_KEYS)
    print("ok")


def add_missing(name: str) -> None:
    """Script body: for each of PORTABLE_KEYS, store the key under lock() unless present."""
    with SharedDict.attach(name) as shared:
        for key in PORTABLE_KEYS:
            with shared.lock():
                if key not in shared:
                    shared[key] = os.environ.get("PYTHONHASHSEED")
    print("ok")


if __name__ == "__main__":
    # Import this file as the module ``_children_dict``, as the tests do, so that the key
    # classes above have the same qualified names in the script and in the test process.
    import _children_dict

    if sys.argv[1] == "add-missing":
        _children_dict.add_missing(sys.argv[2])
    else:
        _children_dict.hashseed_check(sys.argv[1])
