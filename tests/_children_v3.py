"""Functions run in child processes by the tests of growth, atomic updates and waiting.

Importable under spawn and forkserver (the tests put this directory on the path).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from shared_memory_array import SharedArray, SharedDict


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def increment_times(name: str, times: int, start: Any) -> int:
    """Attach, wait for ``start``, then ``increment("n")`` ``times`` times."""
    with SharedDict.attach(name) as shared:
        start.wait(60)
        for _ in range(times):
            shared.increment("n")
    return times


def cas_increment_times(name: str, times: int, start: Any) -> int:
    """Add 1 to ``d["n"]`` ``times`` times with a compare_and_set loop."""
    with SharedDict.attach(name) as shared:
        start.wait(60)
        for _ in range(times):
            while True:
                current = shared["n"]
                if shared.compare_and_set("n", current, current + 1):
                    break
    return times


def open_and_count(name: str, barrier: Any, results: Any) -> None:
    """All at once: ``SharedDict.open(name)``, increment "opened", report the block id.

    Holds the dict until the parent has looked at it (three barrier steps).
    """
    barrier.wait(60)
    shared = SharedDict.open(name, max_items=64, heap_size=1 << 16)
    shared.increment("opened")
    header = shared._header
    assert header is not None
    results.put(header.block_id.hex())
    barrier.wait(60)  # every process has opened it
    barrier.wait(60)  # the parent has looked
    shared.close()


def insert_until_growth_then_die(name: str, where: str, growths: int = 1) -> None:
    """Insert keys until the dict grows, and SIGKILL this process at ``where`` in the step.

    ``where``: ``"created"`` (the new data block exists, nothing copied), ``"copied"``
    (its tables are being rebuilt), ``"committed"`` (the entry names the new block;
    the old one is not unlinked yet). With ``"committed"``, ``growths`` steps are
    made and the last one is cut there.
    """
    from shared_memory_array._dict import _store
    from shared_memory_array._dict._table import Table

    if where == "created":
        original_create = _store.DataBlock.create.__func__  # type: ignore[attr-defined]

        def create(cls: Any, *args: Any, **kwargs: Any) -> Any:
            original_create(cls, *args, **kwargs)
            _die()

        _store.DataBlock.create = classmethod(create)  # type: ignore[method-assign,assignment]
    elif where == "copied":
        original_rebuild = Table.rebuild

        def rebuild(self: Table, live: Any = None) -> None:
            if live is not None:  # the growth's rebuild into the new block
                _die()
            original_rebuild(self, live)

        Table.rebuild = rebuild  # type: ignore[method-assign]
    else:
        original_unlink = _store.DataBlock.unlink
        commits = iter(range(1, growths + 1))

        def unlink(self: Any) -> None:  # grow() unlinks the old block right after the commit
            if next(commits, growths) == growths:
                _die()
            original_unlink(self)

        _store.DataBlock.unlink = unlink  # type: ignore[method-assign]
    shared = SharedDict.attach(name)
    for index in range(10_000):
        shared[f"new{index}"] = index
    raise SystemExit("the dict never grew")


def grow_forever(name: str, ready: Any) -> None:
    """Overwrite a few keys and add a batch of new keys each round (it grows), until killed."""
    shared = SharedDict.attach(name)
    round_number = 0
    while True:
        for slot in range(10):
            shared[f"k{slot}"] = (round_number, bytes([slot]) * ((round_number + slot) % 300))
        shared.update({f"batch{round_number}_{i}": round_number for i in range(20)})
        shared.increment("rounds")
        round_number += 1
        if round_number == 3:
            ready.set()


def wait_for_key(name: str, key: str, timeout: float, results: Any) -> None:
    """Report whether ``key`` appears in the dict within ``timeout`` (``wait_for``)."""
    with SharedDict.attach(name) as shared:
        results.put(("ready", os.getpid()))
        found = shared.wait_for(lambda d: key in d, timeout=timeout)
        results.put(("found" if found else "timeout", shared.get(key)))


def wait_for_key_forever(name: str, ready: Any) -> None:
    """Wait (for ever) for a key that never comes: a waiter to be killed."""
    shared = SharedDict.attach(name)
    ready.set()
    shared.wait_for(lambda d: "never" in d)


def count_frames(name: str, ack_name: str, frames: int, results: Any) -> None:
    """Take ``frames`` frames of an array, acknowledging each through a second array."""
    with SharedArray.attach(name) as frame, SharedArray.attach(ack_name) as ack:
        seen: list[int] = []
        generation = 0
        while len(seen) < frames:
            generation = frame.wait(timeout=60, after=generation)
            seen.append(int(frame[0]))
            ack[0] = seen[-1]
            ack.notify()
        results.put(seen)


def cpu_while_waiting(name: str, ready: Any, results: Any) -> None:
    """Wait for one notify and report the CPU seconds this process used meanwhile."""
    import resource

    with SharedArray.attach(name) as frame:
        generation = frame.notify()  # the test's notify comes after this one
        before = resource.getrusage(resource.RUSAGE_SELF)
        ready.set()
        frame.wait(timeout=60, after=generation + 1)
        after = resource.getrusage(resource.RUSAGE_SELF)
        results.put((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))


def wait_on_array_forever(name: str, ready: Any) -> None:
    """Wait for a notify that never comes: a waiter to be killed."""
    frame = SharedArray.attach(name)
    ready.set()
    frame.wait()


def slow_create(name: str, created: Any, seconds: float) -> None:
    """Create a dict whose header is written ``seconds`` late (a slow creator)."""
    from shared_memory_array._handle import BlockHandle

    original = BlockHandle._publish

    def publish(self: BlockHandle, header: bytes) -> None:
        if type(self).__name__ == "SharedDict":
            created.set()
            time.sleep(seconds)
        original(self, header)

    BlockHandle._publish = publish  # type: ignore[method-assign]
    shared = SharedDict.create(name, max_items=16, heap_size=1 << 14)
    shared["ready"] = True
    time.sleep(seconds)
    shared.close()


def hold_lock_with_a_forked_child(name: str, ready: Any) -> None:
    """Fork a child that sleeps, then take the dict's lock and sleep holding it (until killed)."""
    shared = SharedDict.attach(name)
    child = os.fork()
    if child == 0:  # pragma: no cover - the grandchild: lives on after its parent is killed
        time.sleep(60)
        os._exit(0)
    with shared.lock():
        shared["holder"] = os.getpid()
        ready.put(child)
        time.sleep(120)
