"""Functions run in child processes by the SharedDict tests (importable under spawn).

Also runnable as a script for the PYTHONHASHSEED test:
``python _children_dict.py NAME`` attaches, checks the parent's keys and writes its own.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from shared_memory_array import SharedDict
from shared_memory_array._heap import Heap

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


def die_inside(name: str, where: str) -> None:
    """Start ``d["k0"] = ...`` and SIGKILL this process at a chosen point inside it.

    ``where`` is ``"heap"`` (right after the first free-list update: heap lists
    half-updated, nothing published), ``"free"`` (new entry published, the
    replaced entry not yet freed) or ``"update"`` (three of six slots of an
    ``update`` published).
    """
    shared = SharedDict.attach(name)

    def kill_after(method: str) -> None:
        original = getattr(Heap, method)

        def killed(self: Heap, *args: Any) -> None:
            original(self, *args)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(Heap, method, killed)

    if where == "update":
        original_put = SharedDict._put
        calls = []

        def put_then_die(self: SharedDict, *args: Any) -> tuple[int, int]:
            result = original_put(self, *args)
            calls.append(result)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        SharedDict._put = put_then_die  # type: ignore[method-assign,assignment]
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


def hashseed_check(name: str) -> None:
    """Script body: verify the parent's keys, then store CHILD_KEYS."""
    with SharedDict.attach(name) as shared:
        for key, value in PARENT_KEYS.items():
            assert shared[key] == value, key
        assert set(shared) == set(PARENT_KEYS)
        shared.update(CHILD_KEYS)
    print("ok")


if __name__ == "__main__":
    hashseed_check(sys.argv[1])
