"""Atomic updates of SharedDict across processes: increment, compare_and_set, open.

Issue 19 items 2 and 3; issue 17 items 3, 4 and 11. Every multi-process test has
a timeout, and runs under spawn, forkserver and fork where the start method
matters.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _children_v3 import (
    cas_increment_times,
    hold_lock_with_a_forked_child,
    increment_times,
    open_and_count,
    slow_create,
)

from shared_memory_array import BlockNotFoundError, LayoutError, SharedArray, SharedDict
from shared_memory_array._platform import OWNER, backend

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
METHODS = ["spawn", "forkserver", "fork"]
HERE = Path(__file__).parent
_counter = iter(range(1 << 30))


def unique() -> str:
    return f"atomic_{os.getpid()}_{next(_counter)}"


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    with SharedDict.create(unique(), max_items=64, heap_size=1 << 16) as d:
        yield d


def join_all(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        process.join(TIMEOUT)
    for process in processes:
        if process.exitcode is None:
            process.kill()
        assert process.exitcode == 0, process.exitcode


# -- increment ----------------------------------------------------------------------------


def test_increment_counts_a_missing_key_as_zero_and_returns_the_new_value(
    shared: SharedDict,
) -> None:
    """increment() of a missing key stores the amount; ints and floats add as Python adds."""
    assert shared.increment("n") == 1
    assert shared.increment("n", 41) == 42
    assert shared.increment("n", -2) == 40
    assert shared.increment("x", 0.5) == 0.5
    assert shared.increment("n", 0.25) == 40.25  # int + float is a float, stored as one
    assert shared["n"] == 40.25
    assert type(shared["n"]) is float
    assert shared.increment("big", 2**63 - 1) == 2**63 - 1
    assert shared.increment("big") == 2**63  # past 64 bits: a Python int, pickled
    assert shared["big"] == 2**63
    shared._check()


def test_increment_of_a_non_number_raises_and_changes_nothing(shared: SharedDict) -> None:
    """increment() of a value that is not a number raises TypeError; the value stays."""
    shared["s"] = "text"
    shared["flag"] = True
    with pytest.raises(TypeError, match="not a number"):
        shared.increment("s")
    with pytest.raises(TypeError, match="not a number"):
        shared.increment("flag")
    with pytest.raises(TypeError, match="needs a number"):
        shared.increment("n", "1")  # type: ignore[arg-type]
    assert shared["s"] == "text"
    assert shared["flag"] is True
    assert "n" not in shared


@pytest.mark.parametrize("method", METHODS)
def test_four_processes_incrementing_end_exact(shared: SharedDict, method: str) -> None:
    """Four processes doing increment() 2,000 times each end at exactly 8,000 (no lost update)."""
    context: Any = multiprocessing.get_context(method)
    start = context.Event()
    workers = [
        context.Process(target=increment_times, args=(shared.name, 2000, start)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    join_all(workers)
    assert shared["n"] == 8000


def test_compare_and_set(shared: SharedDict) -> None:
    """compare_and_set sets only when the value equals the expected one; absent never equals."""
    assert not shared.compare_and_set("k", None, 1)
    assert "k" not in shared
    shared["k"] = [1, 2]
    assert not shared.compare_and_set("k", [1], "x")
    assert shared.compare_and_set("k", [1, 2], "x")
    assert shared["k"] == "x"


def test_compare_and_set_loops_in_two_processes_lose_no_update(shared: SharedDict) -> None:
    """Two processes adding with compare_and_set loops end exact."""
    shared["n"] = 0
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [
        context.Process(target=cas_increment_times, args=(shared.name, 500, start))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    start.set()
    join_all(workers)
    assert shared["n"] == 1000


# -- open -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_four_processes_opening_one_name_get_one_dict(method: str) -> None:
    """Four processes calling open() at once get the same dict (one block id, all counts)."""
    name = unique()
    context: Any = multiprocessing.get_context(method)
    barrier = context.Barrier(5)
    results = context.Queue()
    workers = [
        context.Process(target=open_and_count, args=(name, barrier, results)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(TIMEOUT)
    ids = {results.get(timeout=TIMEOUT) for _ in workers}
    barrier.wait(TIMEOUT)
    try:
        assert len(ids) == 1
        with SharedDict.attach(name) as shared:
            assert shared["opened"] == 4
            assert not shared.owner  # one of the workers created it and owns it
    finally:
        barrier.wait(TIMEOUT)
        join_all(workers)


def test_open_keeps_trying_while_another_process_is_mid_creation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attach says "not found" and create says "exists" for a while: open() waits it out.

    The window of another process's creation (its lock files not all made yet, under
    the portable backend); a fixed number of immediate retries used up in it.
    """
    with SharedDict.create(unique(), max_items=8) as made:
        real_attach = SharedDict._attach.__func__  # type: ignore[attr-defined]
        ready_at = time.monotonic() + 0.3

        def not_yet(cls: type[SharedDict[Any, Any]], /, name: str, **kwargs: Any) -> Any:
            if time.monotonic() < ready_at:
                raise BlockNotFoundError(name, "being created or removed")
            return real_attach(cls, name, **kwargs)

        monkeypatch.setattr(SharedDict, "_attach", classmethod(not_yet))
        with SharedDict.open(made.name) as opened:
            assert not opened.owner
            assert opened._header is not None
            assert made._header is not None
            assert opened._header.block_id == made._header.block_id


def test_open_attaches_an_existing_dict_and_ignores_its_arguments() -> None:
    """open() of an existing name attaches; the sizes given are the creator's concern only."""
    with SharedDict.create(unique(), max_items=8) as first:
        first["a"] = 1
        with SharedDict.open(first.name, max_items=10_000, grow=False) as second:
            assert second["a"] == 1
            assert second.stats()["grows"] is True
            assert not second.owner


# -- issue 17 item 11: attach while another process is creating ----------------------------


def test_attach_during_create_is_not_found_never_a_layout_error() -> None:
    """Attaching a dict whose creator is not done: not found, or the dict; never "corrupt"."""
    name = unique()
    context = multiprocessing.get_context("spawn")
    created = context.Event()
    creator = context.Process(target=slow_create, args=(name, created, 1.5))
    creator.start()
    try:
        assert created.wait(TIMEOUT)
        outcomes = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                with SharedDict.attach(name) as shared:
                    outcomes.add("attached" if shared.get("ready") else "empty")
                    break
            except BlockNotFoundError:
                outcomes.add("not found")
            except LayoutError as exc:  # the bug: a block being created reported as corrupt
                pytest.fail(f"attach during create raised LayoutError: {exc}")
        assert outcomes & {"not found", "attached", "empty"}
    finally:
        creator.join(TIMEOUT)
    assert creator.exitcode == 0


def test_attach_between_the_creators_open_and_its_owner_lock_is_not_a_layout_error() -> None:
    """A block whose creator made the file but has not yet taken OWNER is waited for.

    A creator's ``O_CREAT`` comes microseconds before its OWNER lock. An
    attach in between found an empty block that nobody owned and called it
    corrupt (LayoutError), which ``SharedDict.open`` passed on: four processes
    opening one name at once failed now and then on the pure path.
    """
    name = unique()
    system = backend.system_name(name)
    fd = backend.open_block(system, create=True, writable=True)  # the file; no owner yet
    locks = backend.locks(fd, system, writable=True, created=True)
    owned = threading.Event()

    def become_owner() -> None:
        time.sleep(0.02)  # the attach below looks first, and finds nobody
        if locks.try_lock(OWNER, exclusive=True):
            owned.set()

    creator = threading.Thread(target=become_owner)
    creator.start()
    try:
        # Owned, but its header never comes: "still being created" (not found), not corrupt.
        with pytest.raises(BlockNotFoundError, match="still being created"):
            SharedArray.attach(name)
        assert owned.is_set()
    finally:
        creator.join(TIMEOUT)
        locks.close()
        backend.unlink(system)


# -- issue 17 items 3 and 4: locks across forks -----------------------------------------------


def test_a_killed_holder_s_lock_is_not_kept_by_its_forked_child(shared: SharedDict) -> None:
    """A holder SIGKILLed inside lock() while its forked child lives does not block the others."""
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    holder = context.Process(target=hold_lock_with_a_forked_child, args=(shared.name, ready))
    holder.start()
    grandchild = ready.get(timeout=TIMEOUT)
    try:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        # Not join(): the live grandchild keeps the holder's exit pipe open; poll the pid.
        deadline = time.monotonic() + TIMEOUT
        while holder.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        took = multiprocessing.get_context("fork").Event()

        def take() -> None:
            with shared.lock():
                shared["after"] = 1
            took.set()

        taker = multiprocessing.get_context("fork").Process(target=take)
        taker.start()
        taker.join(10)
        if taker.exitcode is None:
            taker.kill()
        assert took.is_set(), "the lock stayed held while the killed holder's child lived"
        assert shared["after"] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


_FORK_AT_LIMIT = r"""
import os, resource, sys
from shared_memory_array import SharedDict
d = SharedDict.attach(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
filler = []
try:
    while True:
        filler.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
pid = os.fork()
if pid == 0:
    try:
        for _ in range(2000):
            with d.lock():
                d["n"] = d["n"] + 1
        os._exit(0)
    except MemoryError as exc:  # AllocationError: refused clearly
        print("refused:", exc, flush=True)
        os._exit(3)
for fd in filler:
    os.close(fd)
for _ in range(2000):
    with d.lock():
        d["n"] = d["n"] + 1
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_child_forked_at_the_descriptor_limit_never_shares_the_lock_silently(
    shared: SharedDict,
) -> None:
    """Forked with no descriptor left: the child excludes its parent, or is refused clearly."""
    shared["n"] = 0
    done = subprocess.run(
        [sys.executable, "-c", _FORK_AT_LIMIT, shared.name],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if "child 3" in done.stdout:  # the portable backend: flock needs a descriptor of its own
        assert "refused:" in done.stdout
        assert shared["n"] == 2000
    else:
        assert "child 0" in done.stdout, done.stdout
        assert shared["n"] == 4000  # parent and child excluded each other: no lost update
