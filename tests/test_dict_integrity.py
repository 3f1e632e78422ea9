"""SharedDict stays atomic through forks, failures inside lock(), killed repairs (issue 9)."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _children_dict import PORTABLE_KEYS, die_inside_repair, die_inside_update, python_path
from _children_dict import update_and_clear_forever as alternate
from conftest import has

from shared_memory_array import AllocationError, SharedDict
from shared_memory_array._heap import Heap

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
spawn = multiprocessing.get_context("spawn")
_counter = iter(range(1 << 30))


def unique_name() -> str:
    return f"test_dict_int_{os.getpid()}_{next(_counter)}"


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    with SharedDict.create(unique_name(), max_items=128, heap_size=1 << 17) as d:
        yield d


def fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child that exits 0 if it returns, 1 if it raises."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() with threads running: forking then is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_exit_code(pid: int) -> int:
    """Wait (at most TIMEOUT seconds, then SIGKILL) for child ``pid``; return its exit code."""
    done = threading.Event()

    def kill_if_late() -> None:
        if not done.wait(TIMEOUT):
            os.kill(pid, signal.SIGKILL)

    watchdog = threading.Thread(target=kill_if_late, daemon=True)
    watchdog.start()
    _, status = os.waitpid(pid, 0)
    done.set()
    watchdog.join()
    return os.waitstatus_to_exitcode(status)


def increment_times(handle: SharedDict, times: int) -> None:
    for _ in range(times):
        with handle.lock():
            handle["n"] = handle["n"] + 1


# -- finding 7: fork after the name is gone --------------------------------------------------


def _increment_or_exit_3(handle: SharedDict, times: int) -> None:
    """``increment_times``, exiting with status 3 on the library's AllocationError."""
    try:
        increment_times(handle, times)
    except AllocationError:
        traceback.print_exc()
        os._exit(3)


def test_children_forked_after_unlink_exclude_each_other() -> None:
    """Children forked from a handle whose name was unlinked still exclude each other: 2N exact.

    Where a child cannot get a lock of its own without the name (lock files),
    each fails at its first use with a clear error, and nothing is lost.
    """
    name = unique_name()
    creator = SharedDict.create(name, max_items=16, heap_size=1 << 14)
    handle = SharedDict.attach(name)
    creator.close()  # unlinks the name: a child cannot reopen the block by name
    try:
        handle["n"] = 0
        times = 1500
        pids = [fork(lambda: _increment_or_exit_3(handle, times)) for _ in range(2)]
        if has("reopen_after_unlink"):
            assert [wait_exit_code(pid) for pid in pids] == [0, 0]
            assert handle["n"] == 2 * times
        else:
            assert [wait_exit_code(pid) for pid in pids] == [3, 3]
            assert handle["n"] == 0
        handle._check()
    finally:
        handle.close()


# -- finding 8: fork inside ``with d.lock()`` -------------------------------------------------


def test_fork_inside_lock_gives_child_a_sane_lock(shared: SharedDict) -> None:
    """A child forked inside lock() leaves the block cleanly; its later operations release it."""
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = -1
    try:
        with shared.lock():
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child, still inside the with block
                shared["in_child"] = os.getpid()  # takes the child's own lock
        if pid == 0:  # pragma: no cover
            shared["after"] = 2
            os.write(ready_write, b"r")
            os.read(go_read, 1)  # stay alive while the parent takes the lock
            os._exit(0)
    except BaseException:
        if pid == 0:  # pragma: no cover
            traceback.print_exc()
            os._exit(1)
        raise
    try:
        assert select.select([ready_read], [], [], TIMEOUT)[0], "child did not get the lock"
        os.read(ready_read, 1)
        locked = threading.Event()

        def take_lock() -> None:
            with shared.lock():
                shared["parent"] = 3
            locked.set()

        threading.Thread(target=take_lock, daemon=True).start()
        assert locked.wait(TIMEOUT), "the child kept the lock after its operations"
    finally:
        os.write(go_write, b"g")
        code = wait_exit_code(pid)
        for fd in (ready_read, ready_write, go_read, go_write):
            os.close(fd)
    assert code == 0
    assert (shared["in_child"], shared["after"], shared["parent"]) == (pid, 2, 3)


def test_child_forked_while_a_thread_holds_the_lock_waits_for_it(shared: SharedDict) -> None:
    """A child forked while another thread holds lock() gets its own lock, free once released."""
    shared["n"] = 0
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with shared.lock():
            shared["n"] = 1
            holding.set()
            release.wait(TIMEOUT)
            shared["n"] = 2

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(TIMEOUT)

    def child() -> None:
        with shared.lock():  # waits for the parent's thread, not for a lock this child holds
            assert shared["n"] == 2
            shared["n"] = 3

    pid = fork(child)
    release.set()
    holder.join(TIMEOUT)
    assert wait_exit_code(pid) == 0
    assert shared["n"] == 3


# -- finding 9: an exception inside ``with d.lock()`` ----------------------------------------


def test_interrupt_inside_a_write_is_repaired_before_it_leaves(
    shared: SharedDict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt after a write published, before it freed, leaves a sound dict."""
    shared["k"] = "old" * 100
    monkeypatch.setattr(
        Heap, "free", lambda self, payload: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with shared.lock():
        with pytest.raises(KeyboardInterrupt):
            shared["k"] = "new" * 100
        monkeypatch.undo()
        assert shared["k"] in ("old" * 100, "new" * 100)
        assert not shared._journal.pending
    shared._check()  # the replaced entry is not leaked


def test_memory_error_inside_lock_leaves_no_half_update(
    shared: SharedDict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain MemoryError caught inside lock() leaves update() unapplied and no armed journal."""
    python_path(shared)  # the fault is injected into the Python twin of the heap
    old = {f"k{i}": "old" for i in range(10)}
    shared.update(old)
    original = Heap.alloc
    calls = [0]

    def alloc(self: Heap, nbytes: int) -> int:
        calls[0] += 1
        if calls[0] == 5:  # the journal and three entries: three slots already published
            raise MemoryError("simulated")
        return original(self, nbytes)

    monkeypatch.setattr(Heap, "alloc", alloc)
    with shared.lock():
        with pytest.raises(MemoryError):
            shared.update({f"k{i}": "new" for i in range(10)})
        monkeypatch.setattr(Heap, "alloc", original)
        assert dict(shared.items()) == old  # this handle sees no half-applied update
        shared["other"] = 1
    with SharedDict.attach(shared.name) as other:
        assert dict(other.items()) == {**old, "other": 1}
    assert shared._journal.armed == 0  # nothing a later repair could replay
    shared._check()


# -- finding 10: repair is restartable --------------------------------------------------------


@pytest.mark.parametrize("stores", [1, 3])
def test_repair_killed_halfway_is_finished_by_the_next(shared: SharedDict, stores: int) -> None:
    """A repair SIGKILLed in its restore loop is finished by the next: the update stays undone."""
    old = {f"k{i}": "old" for i in range(10)}
    shared.update(old)
    writer = spawn.Process(target=die_inside_update, args=(shared.name,))
    writer.start()
    writer.join(TIMEOUT)
    assert writer.exitcode == -signal.SIGKILL
    repairer = spawn.Process(target=die_inside_repair, args=(shared.name, stores))
    repairer.start()
    repairer.join(TIMEOUT)
    assert repairer.exitcode == -signal.SIGKILL
    assert dict(shared.items()) == old
    assert shared.stats()["repairs"] == 1
    shared._check()


# -- finding 11: len() is atomic --------------------------------------------------------------


def test_len_never_sees_a_half_done_update_or_clear(shared: SharedDict) -> None:
    """len() while another process alternates update(50 new keys) and clear() is 0 or 50."""
    ready = spawn.Event()
    child = spawn.Process(target=alternate, args=(shared.name, ready))
    child.start()
    try:
        assert ready.wait(TIMEOUT)
        seen = {len(shared) for _ in range(100_000)}
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(TIMEOUT)
    assert seen <= {0, 50}, sorted(seen)


# -- finding 12: portable keys ----------------------------------------------------------------


def test_portable_keys_are_one_key_under_every_hash_seed(shared: SharedDict) -> None:
    """Processes with different PYTHONHASHSEED each add missing keys: every key is stored once."""
    script = os.path.join(os.path.dirname(__file__), "_children_dict.py")
    for seed in ("1", "2", "3", "4", "5"):
        result = subprocess.run(
            [sys.executable, script, "add-missing", shared.name],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    assert len(shared) == len(PORTABLE_KEYS)
    for key in PORTABLE_KEYS:
        assert shared[key] == "1"  # the first process added them all, the others found them
    stored: list[Any] = list(shared)
    assert len(set(stored)) == len(stored)
    assert set(stored) == set(PORTABLE_KEYS)
