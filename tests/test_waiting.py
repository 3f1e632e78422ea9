"""Waiting for shared state: SharedArray.notify/wait/wait_async, SharedDict.wait_for(_async).

Issue 19 item 1: no polling loop where the system allows it, no lost wake-up, a
timeout that is honoured, a waiter killed while waiting harms nobody, asyncio
waiting never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _children_v3 import (
    count_frames,
    cpu_while_waiting,
    wait_for_key,
    wait_for_key_forever,
    wait_on_array_forever,
)

from shared_memory_array import ClosedError, SharedArray, SharedDict

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
METHODS = ["spawn", "forkserver", "fork"]
_counter = iter(range(1 << 30))


@pytest.fixture
def frame() -> Iterator[SharedArray]:
    with SharedArray.allocate(4, "int64") as array:
        yield array


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    with SharedDict.create(f"wait_{os.getpid()}_{next(_counter)}", max_items=16) as d:
        yield d


def test_notify_returns_the_new_generation_and_wait_after_it_returns_at_once(
    frame: SharedArray,
) -> None:
    """notify() counts up; wait(after=older) returns at once with the current generation."""
    first = frame.notify()
    second = frame.notify()
    assert second == (first + 1) & 0xFFFFFFFF
    assert frame.wait(timeout=1, after=first) == second


def test_wait_honours_its_timeout(frame: SharedArray) -> None:
    """With no notify, wait(timeout) raises TimeoutError after about the timeout."""
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no notify"):
        frame.wait(timeout=0.2)
    assert time.monotonic() - start >= 0.2


def test_a_thread_waiting_is_woken_by_notify(frame: SharedArray) -> None:
    """A thread blocked in wait() returns when another thread notifies."""
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(frame.wait(timeout=TIMEOUT)))
    waiter.start()
    time.sleep(0.1)
    generation = frame.notify()
    waiter.join(TIMEOUT)
    assert got == [generation]


@pytest.mark.parametrize("method", METHODS)
def test_no_frame_is_lost_between_processes(frame: SharedArray, method: str) -> None:
    """300 frames, each notified and acknowledged: the consumer sees every one, in order.

    Each side waits with ``after=`` the last generation it saw, so a notify that
    comes between two waits is never missed (a lost one would time out).
    """
    context: Any = multiprocessing.get_context(method)
    results = context.Queue()
    with SharedArray.allocate(1, "int64") as ack:
        consumer = context.Process(target=count_frames, args=(frame.name, ack.name, 300, results))
        consumer.start()
        try:
            acknowledged = 0
            for number in range(1, 301):
                frame[0] = number
                frame.notify()
                acknowledged = ack.wait(timeout=TIMEOUT, after=acknowledged)
                assert int(ack[0]) == number
            seen = results.get(timeout=TIMEOUT)
        finally:
            consumer.join(TIMEOUT)
    assert consumer.exitcode == 0
    assert seen == list(range(1, 301))


def test_a_waiter_sleeps_without_burning_cpu(frame: SharedArray) -> None:
    """A process blocked in wait() for half a second uses next to no CPU (no busy loop)."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    results = context.Queue()
    waiter = context.Process(target=cpu_while_waiting, args=(frame.name, ready, results))
    waiter.start()
    assert ready.wait(TIMEOUT)
    time.sleep(0.5)
    frame.notify()
    used = results.get(timeout=TIMEOUT)
    waiter.join(TIMEOUT)
    assert used < 0.1  # CPU seconds, not wall time: a busy loop would use about 0.5


def test_a_waiter_killed_while_waiting_harms_nobody(frame: SharedArray) -> None:
    """SIGKILL a process blocked in wait(): notify and other waiters work as before."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    victim = context.Process(target=wait_on_array_forever, args=(frame.name, ready))
    victim.start()
    assert ready.wait(TIMEOUT)
    time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(TIMEOUT)
    before = frame.notify()
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(frame.wait(timeout=TIMEOUT, after=before)))
    waiter.start()
    after = frame.notify()
    waiter.join(TIMEOUT)
    assert got == [after]


def test_wait_async_never_blocks_the_event_loop(frame: SharedArray) -> None:
    """While a task awaits wait_async(), other tasks run; a notify from a thread wakes it."""

    async def scenario() -> tuple[int, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        notifier = threading.Timer(0.3, frame.notify)
        notifier.start()
        generation = await frame.wait_async(timeout=TIMEOUT)
        stop.set()
        await ticking
        notifier.join(TIMEOUT)  # its notify() is over before the fixture closes the frame
        return generation, ticks

    generation, ticks = asyncio.run(scenario())
    assert generation >= 1
    assert ticks >= 10  # the loop kept running during the wait


def test_a_cancelled_wait_async_leaves_no_thread_behind(frame: SharedArray) -> None:
    """Cancelling wait_async() ends its thread (no library thread outlives the wait)."""

    async def scenario() -> None:
        task = asyncio.create_task(frame.wait_async())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name == "shared_memory_array-wait"]:
            break
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "shared_memory_array-wait"]


def test_wait_async_timeout(frame: SharedArray) -> None:
    """wait_async(timeout) raises TimeoutError."""
    with pytest.raises(TimeoutError):
        asyncio.run(frame.wait_async(timeout=0.2))


def test_wait_on_a_closed_array_raises_closed_error() -> None:
    """notify and wait on a closed handle raise ClosedError."""
    array = SharedArray.allocate(1)
    array.close()
    with pytest.raises(ClosedError):
        array.notify()
    with pytest.raises(ClosedError):
        array.wait(timeout=0)


# -- SharedDict.wait_for --------------------------------------------------------------------


def test_wait_for_a_predicate_already_true_returns_at_once(shared: SharedDict) -> None:
    """wait_for() of a true predicate returns True without waiting."""
    shared["x"] = 1
    assert shared.wait_for(lambda d: d["x"] == 1, timeout=0)


def test_wait_for_times_out_with_false(shared: SharedDict) -> None:
    """wait_for() returns False when the timeout passes first."""
    start = time.monotonic()
    assert not shared.wait_for(lambda d: "never" in d, timeout=0.2)
    assert time.monotonic() - start >= 0.2


@pytest.mark.parametrize("method", METHODS)
def test_wait_for_wakes_on_a_change_in_another_process(shared: SharedDict, method: str) -> None:
    """A process blocked in wait_for() returns once another process sets the key it waits for."""
    context: Any = multiprocessing.get_context(method)
    results = context.Queue()
    waiter = context.Process(target=wait_for_key, args=(shared.name, "go", TIMEOUT, results))
    waiter.start()
    try:
        assert results.get(timeout=TIMEOUT)[0] == "ready"
        time.sleep(0.1)
        for i in range(5):
            shared[f"other{i}"] = i  # changes that do not satisfy it: it keeps waiting
        shared["go"] = "now"
        assert results.get(timeout=TIMEOUT) == ("found", "now")
    finally:
        waiter.join(TIMEOUT)
    assert waiter.exitcode == 0


def test_a_change_inside_an_outer_lock_wakes_the_waiter_when_the_lock_is_released(
    shared: SharedDict,
) -> None:
    """The wake-up waits for the outermost release, whichever handle of the dict changed it.

    A change made through a second handle inside ``with shared.lock()`` ends
    while the lock is still held; the waiter must be woken when the outer
    block releases it (a wake-up kept per handle would be lost: the waiter
    would time out).
    """
    results: Any = multiprocessing.get_context("spawn").Queue()
    waiter = multiprocessing.get_context("spawn").Process(
        target=wait_for_key, args=(shared.name, "go", 20, results)
    )
    waiter.start()
    try:
        assert results.get(timeout=TIMEOUT)[0] == "ready"
        time.sleep(0.1)
        with SharedDict.attach(shared.name) as other, shared.lock():
            other["go"] = "now"
            shared["also"] = 1
        assert results.get(timeout=TIMEOUT) == ("found", "now")
    finally:
        waiter.join(TIMEOUT)
    assert waiter.exitcode == 0


def test_a_killed_dict_waiter_harms_nobody(shared: SharedDict) -> None:
    """SIGKILL a process inside wait_for(): the dict and other waiters work as before."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    victim = context.Process(target=wait_for_key_forever, args=(shared.name, ready))
    victim.start()
    assert ready.wait(TIMEOUT)
    time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(TIMEOUT)
    shared["a"] = 1
    setter = threading.Timer(0.1, lambda: shared.__setitem__("b", 2))
    setter.start()
    assert shared.wait_for(lambda d: "b" in d, timeout=TIMEOUT)
    setter.join(TIMEOUT)  # done before the fixture closes the dict


def test_wait_for_async_never_blocks_the_event_loop(shared: SharedDict) -> None:
    """wait_for_async() lets other tasks run; a change from a thread satisfies it."""

    async def scenario() -> tuple[bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(1000):
                ticks += 1
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        setter = threading.Timer(0.3, lambda: shared.__setitem__("ready", True))
        setter.start()
        found = await shared.wait_for_async(lambda d: d.get("ready", False), timeout=TIMEOUT)
        ticking.cancel()
        setter.join(TIMEOUT)  # done before the fixture closes the dict
        return found, ticks

    found, ticks = asyncio.run(scenario())
    assert found
    assert ticks >= 10
