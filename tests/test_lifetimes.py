"""API.md section 0: explicit ends free now, implicit ends never pull the rug, nothing leaks.

Multi-process tests of the one lifetime rule, every one with timeouts: results returned
by workers under every executor, owners killed by SIGKILL/SIGTERM/SIGHUP while another
process holds their block, ``with Pool()`` workers writing tokens, reader-side
releases with many tokens outstanding, the writer's pool, handles in flight, and a
creator in another time namespace.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _children_lifetimes import (
    dict_owner_and_wait,
    make_array,
    own_and_wait,
    write_tokens_and_wait,
)
from conftest import block_exists, has, unlink_from_outside

from shared_memory_array import (
    BlockNotFoundError,
    SharedArray,
    SharedDict,
    _codec,
    _lifetime,
    _reaper,
    cleanup,
    list_blocks,
    read,
    release,
    write,
)
from shared_memory_array._block import SharedBlock

TIMEOUT = 60
HERE = Path(__file__).parent
CHILDREN = HERE / "_children_lifetimes.py"
METHODS = [
    m for m in ("spawn", "forkserver", "fork") if m in multiprocessing.get_all_start_methods()
]
N_RESULTS = 20

pytestmark = [
    pytest.mark.usefixtures("no_leaked_blocks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]


def _exists(name: str) -> bool:
    return block_exists(name)


def _wait_until(condition: Callable[[], bool], seconds: float, *, create: bool = False) -> bool:
    """Poll ``condition`` for up to ``seconds``; ``create`` also makes a block-creating call
    each round (the reaper runs on those, at most every few seconds)."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        if create:
            SharedArray.allocate(None, 1, "u1").close()
        time.sleep(0.05)


def _check_results(results: list[SharedArray]) -> list[str]:
    """Every worker result is readable here and holds its index; return the block names."""
    assert len(results) == N_RESULTS
    for index, result in enumerate(results):
        assert float(result.as_array()[0]) == index
        assert float(result.as_array()[-1]) == index
    return [result.name for result in results]


def _close_and_expect_gone(results: list[SharedArray]) -> None:
    names = [result.name for result in results]
    for result in results:
        result.close()
    del results
    gc.collect()
    assert _wait_until(lambda: not any(_exists(n) for n in names), 15, create=True), [
        n for n in names if _exists(n)
    ]


@pytest.mark.parametrize("method", METHODS)
def test_worker_results_survive_a_process_pool_executor(method: str) -> None:
    """A SharedArray a worker creates and returns is valid in the caller, then freed by it."""
    context = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as executor:
        results = list(executor.map(make_array, range(N_RESULTS), timeout=TIMEOUT))
    _check_results(results)
    _close_and_expect_gone(results)


@pytest.mark.parametrize("how", ["map", "imap", "apply_async"])
def test_worker_results_survive_a_multiprocessing_pool(how: str) -> None:
    """Pool.map, imap and apply_async: every returned array is there after the pool is gone."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        if how == "map":
            results = pool.map(make_array, range(N_RESULTS))
        elif how == "imap":
            results = list(pool.imap(make_array, range(N_RESULTS)))
        else:
            pending = [pool.apply_async(make_array, (i,)) for i in range(N_RESULTS)]
            results = [p.get(TIMEOUT) for p in pending]
    _check_results(results)  # the workers were SIGTERMed by the with block
    _close_and_expect_gone(results)


def test_worker_results_survive_joblib_loky() -> None:
    """joblib's loky backend returns worker-created arrays that stay valid in the caller."""
    joblib = pytest.importorskip("joblib")
    parallel = joblib.Parallel(n_jobs=2, backend="loky", timeout=TIMEOUT)
    results = parallel(joblib.delayed(make_array)(i) for i in range(N_RESULTS))
    _check_results(results)
    _close_and_expect_gone(results)


def test_unpickled_handle_of_a_let_go_block_becomes_its_owner() -> None:
    """The owner pickles its handle and drops it; the unpickled handle owns: close frees now."""
    owner = SharedArray.copy(None, np.arange(4))
    name = owner.name
    data = pickle.dumps(owner)
    del owner
    gc.collect()
    assert _exists(name)  # a handle is in flight: kept
    landed = pickle.loads(data)
    assert landed.owner
    assert landed.as_array().tolist() == [0, 1, 2, 3]
    landed.close()
    assert not _exists(name)


def test_unpickled_handle_while_the_owner_lives_is_not_an_owner() -> None:
    """While the owner holds its handle, an unpickled copy is an attachment; closing it keeps it."""
    with SharedArray.copy(None, np.arange(4)) as owner:
        copy = pickle.loads(pickle.dumps(owner))
        assert not copy.owner
        copy.close()
        assert _exists(owner.name)
    assert not _exists(owner.name)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_killed_owner_never_pulls_the_rug_from_a_holder(signum: int) -> None:
    """The owner dies by a signal while this process holds its array: data, attach, then gone."""
    context = multiprocessing.get_context("spawn")
    names: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=own_and_wait, args=(names,))
    child.start()
    try:
        name = names.get(timeout=TIMEOUT)
        held = SharedArray.attach(name)
        os.kill(child.pid or 0, signum)
        child.join(TIMEOUT)
        assert child.exitcode == -signum
        SharedArray.allocate(None, 1, "u1").close()  # a block-creating call: the reaper runs
        assert held.as_array().sum() == sum(range(1000))
        again = SharedArray.attach(name)  # new attaches keep working
        assert again.as_array()[999] == 999
        again.close()
        assert not any(info.name == name and info.state == "orphan" for info in list_blocks())
        held.close()  # the last holder lets go: gone at once
        assert not _exists(name)
    finally:
        if child.is_alive():
            child.kill()
        child.join(TIMEOUT)


def test_orphans_of_a_killed_owner_are_reaped_by_the_next_creating_process() -> None:
    """A SIGTERMed owner that nobody holds: a new process's first block-creating call reaps it."""
    context = multiprocessing.get_context("spawn")
    names: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=own_and_wait, args=(names,))
    child.start()
    name = names.get(timeout=TIMEOUT)
    child.terminate()
    child.join(TIMEOUT)
    assert _exists(name)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from shared_memory_array import SharedArray as S; S.allocate(None, 1, 'u1').close()",
        ],
        timeout=TIMEOUT,
        check=True,
    )
    assert done.returncode == 0
    assert not _exists(name)


def test_pool_workers_writing_tokens_leave_nothing_after_the_parent_exits() -> None:
    """`with Pool()` (which SIGTERMs its workers) three times, then exit: no block remains."""
    done = subprocess.run(
        [sys.executable, str(CHILDREN), "pool"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stderr
    names = done.stdout.split()
    assert len(names) == 18
    left = [name for name in names if _exists(name)]
    assert not left, left


def test_reader_release_frees_memory_within_two_seconds_with_100_outstanding() -> None:
    """A reader releases 100 tokens of a live writer: the blocks go within 2 s (bar the pool)."""
    context = multiprocessing.get_context("spawn")
    tokens_queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=write_tokens_and_wait, args=(tokens_queue, 100, 256 << 10))
    child.start()
    try:
        tokens = tokens_queue.get(timeout=TIMEOUT)
        names = [token.split(":")[2] for token in tokens]
        assert all(_exists(name) for name in names)
        for index, token in enumerate(tokens):
            assert int(np.asarray(read(token))[0]) == index
            release(token)
            with pytest.raises(BlockNotFoundError):  # dead at once, everywhere
                read(token)
        released_at = time.monotonic()
        # The writer's last write was well over 2 s ago only if the test was slow; either
        # way at most POOL_MAX_BLOCKS blocks stay pooled, and only until 2 s after its last write.
        assert _wait_until(lambda: sum(map(_exists, names)) <= _codec.POOL_MAX_BLOCKS, 2.0 + 0.5), (
            sum(map(_exists, names))
        )
        assert _wait_until(lambda: not any(map(_exists, names)), 2.0 + 1.0)
        assert time.monotonic() - released_at < 5
    finally:
        child.terminate()
        child.join(TIMEOUT)


def test_a_pooled_block_unlinked_from_outside_is_never_handed_out() -> None:
    """Someone unlinks a pooled block's name: the next write makes a new block and reads back."""
    token = write(np.zeros(4096), threshold=0)
    name = token.split(":")[2]
    release(token)
    assert name in _codec.writer.pooled_names()
    assert any(info.name == name and info.state == "pooled" for info in list_blocks())
    unlink_from_outside(name)
    second = write(np.ones(4096), threshold=0)
    try:
        assert second.split(":")[2] != name
        assert float(np.asarray(read(second)).sum()) == 4096
    finally:
        release(second)
        _codec.writer.drop_all()


def test_configure_pool_bytes_zero_turns_reuse_off() -> None:
    """With configure(pool_bytes=0) a released block is unlinked at once, never pooled."""
    _codec.configure(pool_bytes=0)
    try:
        token = write(np.zeros(1024), threshold=0)
        name = token.split(":")[2]
        release(token)
        assert not _exists(name)
        assert _codec.writer.pooled_names() == []
    finally:
        _codec.configure()


def test_the_pool_empties_itself_two_seconds_after_the_last_write() -> None:
    """A pooled block is unlinked by the collector once 2 s pass without a write."""
    token = write(np.zeros(2048), threshold=0)
    name = token.split(":")[2]
    release(token)
    assert _exists(name)
    assert _wait_until(lambda: not _exists(name), _codec.POOL_IDLE_SECONDS + 2.0)


def _pickle_in_a_dying_child(pickle_path: Path) -> str:
    """A child creates an array, pickles its handle to ``pickle_path`` and is SIGKILLed."""
    done = subprocess.run(
        [sys.executable, str(CHILDREN), "pickle", str(pickle_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=HERE,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout.strip()


def test_a_handle_in_flight_keeps_its_block_until_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickled handle of a dead owner keeps its block within the grace; landing owns it."""
    pickle_path = tmp_path / "in-flight.pkl"
    name = _pickle_in_a_dying_child(pickle_path)
    assert _reaper.judge(name).in_flight == 1
    monkeypatch.setenv(_lifetime.GRACE_ENV, "30")
    assert name not in cleanup().cleaned  # in flight, within the grace: kept
    with pickle_path.open("rb") as pickled:
        landed = pickle.load(pickled)  # lands: in flight no more, and owns it
    assert landed.owner
    assert landed.as_array().tolist() == list(range(10))
    landed.close()
    assert not _exists(name)


def test_a_handle_that_never_lands_is_reaped_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace is bounded: a pickle nobody loads does not keep its block for ever."""
    name = _pickle_in_a_dying_child(tmp_path / "lost.pkl")
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0.5")
    time.sleep(0.6)
    assert name in cleanup().cleaned


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_a_creator_in_another_time_namespace_is_never_cleaned_while_alive() -> None:
    """Start times differ across time namespaces; the kernel's answer does not: kept while alive."""
    code = (
        "import sys, time; from shared_memory_array import SharedArray as S; "
        "a = S.allocate(None, 8, 'u1'); print(a.name, flush=True); sys.stdin.read()"
    )
    try:
        child = subprocess.Popen(
            ["unshare", "-T", "--boottime", "1000000", sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
    except OSError as exc:  # pragma: no cover
        pytest.skip(f"cannot start a time namespace: {exc}")
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()
        if not name:
            pytest.skip("unshare -T did not start (no time namespaces here)")
        info = next(info for info in list_blocks() if info.name == name)
        assert info.in_use is True
        if has("process_table"):
            assert info.creator_alive is False  # the pid's start time looks wrong from here
        assert name not in cleanup().cleaned
        assert _exists(name)
    finally:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.close()
        child.wait(TIMEOUT)
        child.stdout.close()
    assert _wait_until(lambda: not _exists(name), 5)  # its normal exit unlinked it


def test_explicit_ends_free_now_even_while_others_hold() -> None:
    """The owner's close unlinks the name at once; a holder's view stays valid."""
    owner = SharedArray.copy(None, np.arange(3))
    holder = SharedArray.attach(owner.name)
    view = holder.as_array()
    owner.close()
    assert not _exists(holder.name)
    assert view.tolist() == [0, 1, 2]
    holder.close()


def test_forked_child_holds_its_own_lock() -> None:
    """A forked child's hold is its own description: the parent letting go does not drop it."""
    block = SharedBlock.create(4096)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(write_end)
        os.read(read_end, 1)  # wait until the parent let go
        judged = _reaper.judge(block.name)
        os._exit(0 if judged.in_use else 3)
    os.close(read_end)
    try:
        from shared_memory_array import _lifetime, _platform

        for hold in _lifetime.holds_of_this_process():
            if hold.name == block.name:  # the parent lets go of every lock it holds
                hold.locks.unlock(_platform.HOLD)
                hold.locks.unlock(_platform.OWNER)
        os.write(write_end, b"x")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(write_end)
        block.unlink()
        block.close()


def test_a_dict_outlives_its_killed_creator_while_held_then_goes() -> None:
    """The dict's creator is SIGKILLed: a holder keeps using it; its close then frees it."""
    context = multiprocessing.get_context("spawn")
    names: multiprocessing.Queue[str] = context.Queue()
    name = f"lifetime_{os.getpid()}"
    child = context.Process(target=dict_owner_and_wait, args=(names, name))
    child.start()
    try:
        names.get(timeout=TIMEOUT)
        held = SharedDict.attach(name)
        child.kill()
        child.join(TIMEOUT)
        SharedArray.allocate(None, 1, "u1").close()  # a block-creating call: the reaper runs
        assert held["answer"] == 42
        held["after"] = "still here"
        again = SharedDict.attach(name)
        assert again["after"] == "still here"
        again.close()
        held.close()
        assert not _exists(held.block_name)
    finally:
        if child.is_alive():
            child.kill()
        child.join(TIMEOUT)


def test_an_unpickled_dict_whose_creator_let_go_becomes_the_owner() -> None:
    """Pickle the creator's dict, drop the creator: the unpickled handle owns and frees it."""
    created = SharedDict.create(f"handoff_{os.getpid()}", max_items=8, heap_size=1 << 16)
    created["k"] = "v"
    block_name = created.block_name
    data = pickle.dumps(created)
    del created
    gc.collect()
    assert _exists(block_name)  # in flight: kept
    landed = pickle.loads(data)
    assert landed.stats()["is_owner"]
    assert landed["k"] == "v"
    landed.close()
    assert not _exists(block_name)


def test_garbage_collected_inside_the_registry_lock_does_not_deadlock() -> None:
    """A handle in a reference cycle, collected while the hold or dict lock registry is locked."""
    code = """
import gc
from shared_memory_array import SharedArray, SharedDict, _lifetime
from shared_memory_array._dict import _lock
owner = SharedArray.allocate(10, "f8")
d = SharedDict.create("gc_in_lock_%d" % __import__("os").getpid(), max_items=4, heap_size=4096)
for registry_lock in (_lifetime._registry_lock, _lock._registry_lock):
    cycle = [SharedArray.attach(owner.name), SharedDict.attach(d.name)]
    cycle.append(cycle)
    del cycle
    with registry_lock:  # as if an allocation under the lock had triggered the collector
        gc.collect()
owner.close()
d.close()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
