"""Cross-process tests of SharedDict: hashing, locking, and surviving killed processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from _children_dict import (
    CHILD_KEYS,
    PARENT_KEYS,
    die_inside,
    hold_lock,
    increment,
    write_forever,
)

from shared_memory_array import SharedDict

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
spawn = multiprocessing.get_context("spawn")
_counter = iter(range(1 << 30))


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    name = f"test_dict_mp_{os.getpid()}_{next(_counter)}"
    with SharedDict.create(name, max_items=128, heap_size=1 << 17) as d:
        yield d


def run_in_thread(action: object) -> threading.Thread:
    """Run ``action`` in a daemon thread, so a deadlock fails the test instead of hanging it."""
    thread = threading.Thread(target=action, daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(timeout=TIMEOUT)
    return thread


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_child_with_other_hash_seed_finds_same_keys(shared: SharedDict, seed: str) -> None:
    """A child with another PYTHONHASHSEED finds the parent's keys; the parent finds the child's."""
    shared.update(PARENT_KEYS)
    env = {**os.environ, "PYTHONHASHSEED": seed}
    script = os.path.join(os.path.dirname(__file__), "_children_dict.py")
    result = subprocess.run(
        [sys.executable, script, shared.name],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    for key, value in {**PARENT_KEYS, **CHILD_KEYS}.items():
        assert shared[key] == value


def test_locked_increments_from_many_processes_are_exact(shared: SharedDict) -> None:
    """N processes x M increments under lock() give exactly N*M."""
    shared["n"] = 0
    processes, times = 4, 150
    with spawn.Pool(processes) as pool:
        results = pool.starmap_async(increment, [(shared.name, times)] * processes)
        assert results.get(timeout=TIMEOUT) == [times] * processes
    assert shared["n"] == processes * times


def test_killed_lock_holder_does_not_block_others(shared: SharedDict) -> None:
    """A child SIGKILLed while holding lock() leaves a dict the parent can lock and write."""
    ready = spawn.Event()
    child = spawn.Process(target=hold_lock, args=(shared.name, ready))
    child.start()
    try:
        assert ready.wait(TIMEOUT)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    finally:
        child.join(TIMEOUT)
    assert child.exitcode == -signal.SIGKILL

    def write() -> None:
        with shared.lock():
            shared["after"] = "parent"

    assert not run_in_thread(write).is_alive()
    assert shared["after"] == "parent"
    assert shared["holder"] == child.pid
    shared._check()


@pytest.mark.parametrize("where", ["heap", "free", "update"])
def test_process_killed_inside_a_write_is_repaired(shared: SharedDict, where: str) -> None:
    """A writer killed mid-operation leaves old-or-new values; the next locker repairs the heap."""
    shared.update({f"k{i}": ("old", b"o" * (i * 37)) for i in range(30)})
    for i in range(0, 30, 3):
        del shared[f"k{i + 1}"]  # free blocks of several sizes, so the write touches lists
    before = dict(shared.items())
    child = spawn.Process(target=die_inside, args=(shared.name, where))
    child.start()
    child.join(TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    value = shared["k0"]
    assert value in (before["k0"], ("new", b"n" * 200))
    assert shared.stats()["repairs"] == 1
    if where == "update":
        assert dict(shared.items()) == before  # rolled back as a whole
    shared._check()
    after = dict(shared.items())
    assert {k: v for k, v in after.items() if k != "k0"} == {
        k: v for k, v in before.items() if k != "k0"
    }
    shared["k0"] = "usable"  # and the repaired heap works
    shared._check()


def test_writer_killed_at_random_points_leaves_readable_dict(shared: SharedDict) -> None:
    """SIGKILLing a busy writer, several times, leaves well-formed values and a sound heap."""
    for attempt in range(4):
        ready = spawn.Event()
        child = spawn.Process(target=write_forever, args=(shared.name, ready))
        child.start()
        try:
            assert ready.wait(TIMEOUT)
            threading.Event().wait(0.01 * attempt)
        finally:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(TIMEOUT)
        assert child.exitcode == -signal.SIGKILL
        for slot in range(20):
            round_number, data = shared[f"k{slot}"]
            assert data == bytes([slot % 256]) * ((round_number * 7 + slot * 13) % 900)
        rounds = {shared[f"u{slot}"] for slot in range(5)}
        assert len(rounds) == 1  # update() is all-or-nothing, even when killed
        shared._check()


def test_reader_racing_a_writer_never_sees_torn_values(shared: SharedDict) -> None:
    """Reads concurrent with another process's writes always return a complete value."""
    ready = spawn.Event()
    child = spawn.Process(target=write_forever, args=(shared.name, ready))
    child.start()
    try:
        assert ready.wait(TIMEOUT)
        seen = set()
        for attempt in range(200_000):
            slot = attempt % 20
            round_number, data = shared[f"k{slot}"]
            assert data == bytes([slot % 256]) * ((round_number * 7 + slot * 13) % 900)
            seen.add(round_number)
            assert f"u{slot % 5}" in shared
            if len(seen) > 20:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(TIMEOUT)
    assert len(seen) > 20  # the writer really was writing meanwhile


def test_writes_are_seen_by_other_processes(shared: SharedDict) -> None:
    """Values written in children are read by the parent right after the children finish."""
    shared["n"] = 10
    child = spawn.Process(target=increment, args=(shared.name, 5))
    child.start()
    child.join(TIMEOUT)
    assert child.exitcode == 0
    assert shared["n"] == 15
