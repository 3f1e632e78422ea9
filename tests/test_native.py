"""The accelerator (``_native``, chosen by ``_accel``) against its pure-Python twins.

Differential tests run random sequences of heap, table and dict steps through both
implementations on two copies of the same bytes and require the same bytes and the same
results after every step. Cross-process tests put a process on each path on one dict:
counts stay exact, and a process killed at any shared store of a step (the accelerator's
test hook) or inside a write (the pure path's fault injection) is repaired by the other.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _children_dict import python_path
from _children_native import STEPS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_memory_array import SharedDict, _accel
from shared_memory_array._dict import _table
from shared_memory_array._dict._journal import Journal
from shared_memory_array._dict._keys import encode_key
from shared_memory_array._dict._layout import FLOAT64, INT64, OFFSET_MASK, PICKLED, Geometry
from shared_memory_array._dict._table import Table
from shared_memory_array._heap import Heap
from shared_memory_array._platform import backend

needs_native = pytest.mark.skipif(not _accel.native, reason="the accelerator is not in use")
needs_native_dict = pytest.mark.skipif(
    not (_accel.native and backend.robust_mutex),
    reason="the accelerator's dict steps need the dict's robust mutex, which this backend "
    "does not use (the portable backend locks a dict with flock)",
)
needs_native_attach = pytest.mark.skipif(
    not (_accel.native and backend.kernel_holds and not backend.lock_files),
    reason="the accelerator's attach step takes an OFD lock on the block itself (Linux backend)",
)
BUILT = importlib.util.find_spec("shared_memory_array._native") is not None
"""Whether the accelerator is built here (a child process without the pure flag uses it)."""
TIMEOUT = 60
SCRIPT = os.path.join(os.path.dirname(__file__), "_children_native.py")
_counter = iter(range(1 << 30))


def outcome(action: Callable[[], Any]) -> Any:
    """What ``action`` returned, or the type and message of what it raised."""
    try:
        return action()
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def test_pure_environment_forces_the_python_path() -> None:
    """SHARED_MEMORY_ARRAY_PURE=1 makes a process run its pure-Python twins only."""
    code = (
        "from shared_memory_array import _accel, SharedDict\n"
        "from shared_memory_array._heap import Heap\n"
        "heap = Heap.format(memoryview(bytearray(8192)), 0, 8192)\n"
        "print(_accel.native, _accel.lib, heap._address)\n"
    )
    env = {**os.environ, _accel.PURE_ENV: "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.stdout.split() == ["False", "None", "0"], result.stderr


def test_accelerator_is_used_where_ci_requires_it() -> None:
    """Where .ci/run built it (SHARED_MEMORY_ARRAY_REQUIRE_NATIVE=1), the accelerator is used."""
    if os.environ.get("SHARED_MEMORY_ARRAY_REQUIRE_NATIVE") != "1":
        pytest.skip("only where .ci/run requires the accelerator")
    assert _accel.native


@needs_native
def test_status_codes_match_the_accelerator() -> None:
    """The table's names for the accelerator's status codes are the accelerator's own."""
    lib = _accel.lib
    assert lib is not None
    assert _table._STATUS_TABLE_FULL == lib.STATUS_TABLE_FULL
    assert _table._STATUS_NO_EMPTY_SLOT == lib.STATUS_NO_EMPTY_SLOT
    assert _table._STATUS_CORRUPT == lib.STATUS_CORRUPT


# -- the heap ---------------------------------------------------------------------------------

HEAP_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 6000)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
        st.tuples(st.just("free any"), st.integers(0, 1 << 16)),
        st.tuples(st.just("extend"), st.integers(0, 1 << 16)),
    ),
    max_size=120,
)


@needs_native
@given(HEAP_STEPS, st.sampled_from([0, 8, 64]))
def test_heap_steps_write_the_same_bytes(steps: list[tuple[str, int]], offset: int) -> None:
    """alloc, free and extend in C and in Python leave identical bytes and results."""
    size = 40_000
    buffers = [bytearray(offset + size + 8) for _ in range(2)]
    native, pure = (Heap.format(memoryview(b), offset, size, 8192) for b in buffers)
    assert native._address
    pure._address = 0  # its pure-Python twin
    live: list[int] = []
    for step, argument in steps:
        if step == "alloc":
            results = [outcome(functools.partial(h.alloc, argument)) for h in (native, pure)]
            if isinstance(results[0], int):
                live.append(results[0])
        elif step == "extend":
            results = [outcome(functools.partial(h.extend, argument)) for h in (native, pure)]
        else:
            payload = live[argument % len(live)] if step == "free" and live else argument
            results = [outcome(functools.partial(h.free, payload)) for h in (native, pure)]
            if results[0] is None and payload in live:
                live.remove(payload)
        assert results[0] == results[1], (step, argument)
        assert buffers[0] == buffers[1], (step, argument)
        assert native._end_block == pure._end_block
    native.check()
    pure.check()


# -- the table --------------------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(14)] + [i * 1000 for i in range(6)] + ["a much longer key " * 3]
VALUES = st.one_of(
    st.binary(max_size=300).map(lambda raw: (PICKLED, raw)),
    st.integers(-(1 << 63), (1 << 63) - 1).map(lambda n: (INT64, struct.pack("<q", n))),
    st.floats(allow_nan=False).map(lambda x: (FLOAT64, struct.pack("<d", x))),
)
TABLE_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KEYS), VALUES),
        st.tuples(
            st.just("update"),
            st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4),
            st.none(),
        ),
        st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
        st.tuples(st.just("set number"), st.sampled_from(KEYS), VALUES),
        st.tuples(st.just("read"), st.sampled_from(KEYS), st.none()),
        st.tuples(st.just("extend"), st.integers(0, 1 << 15), st.none()),
    ),
    max_size=60,
)


def table_pair() -> tuple[Table, Table, list[memoryview]]:
    geometry = Geometry.plan(64, 10, 1 << 15)
    buffers = [memoryview(bytearray(geometry.block_size)) for _ in range(2)]
    tables = []
    for buf in buffers:
        Heap.format(buf[geometry.heap : geometry.block_size], 0, geometry.heap_size, 4096)
        tables.append(Table(buf, geometry, "diff"))
    native, pure = tables
    assert native.core is not None
    pure.core = None  # its pure-Python twin
    pure.heap._address = 0
    return native, pure, buffers


def table_step(table: Table, step: str, key: Any, value: Any) -> Any:
    if step == "extend":
        return table.heap.extend(key)
    if step == "update":  # an update's puts, each recorded in an armed journal
        value = key
        saved = (table.ctl.count, table.ctl.tombstones)
        journal = Journal(table, lambda: None)
        recorder = journal.arm(len(value))
        done = []
        try:
            for each_key, each_value in value:
                encoded = encode_key(each_key)[0]
                done.append(table.put(encoded, zlib.crc32(encoded), b"", each_value, recorder))
        except Exception:
            journal.abandon(done, saved)
            raise
        journal.commit()
        for _, replaced in done:
            if replaced > 1:
                table.heap.free(replaced & OFFSET_MASK)
        return done
    encoded = encode_key(key)[0]
    key_hash = zlib.crc32(encoded)
    found = table.probe(encoded, key_hash)
    if step == "put":
        index, replaced = table.put(encoded, key_hash, b"", value)
        if replaced > 1:
            table.heap.free(replaced & OFFSET_MASK)
        return found, index, replaced
    if found[0] < 0:
        return found
    entry = found[1] & OFFSET_MASK
    if step == "delete":
        table.unpublish(found[0], found[1])
    elif step == "set number":
        return found, table.set_number(entry, value)
    kind, data = table.entry_value(entry)
    return found, kind, bytes(data)


@needs_native
@given(TABLE_STEPS)
def test_table_steps_write_the_same_bytes(steps: list[tuple[str, Any, Any]]) -> None:
    """probe, put (new, in place, journalled), set_number, unpublish: identical in C and Python."""
    native, pure, buffers = table_pair()
    for step, key, value in steps:
        results = [
            outcome(functools.partial(table_step, t, step, key, value)) for t in (native, pure)
        ]
        assert results[0] == results[1], (step, key)
        assert bytes(buffers[0]) == bytes(buffers[1]), (step, key)
    native.check()
    pure.check()


@needs_native
def test_table_rebuild_inside_a_put_matches() -> None:
    """A put that must rebuild the table (tombstones) rebuilds it as the Python twin does."""
    native, pure, buffers = table_pair()
    switched = set()
    for table in (native, pure):
        for round_number in range(6):
            for i in range(9):
                table_step(table, "put", f"r{round_number}_{i}", (PICKLED, b"x" * i))
                switched.add(table.ctl.active)
            for i in range(9):
                table_step(table, "delete", f"r{round_number}_{i}", None)
    assert switched == {0, 1}  # the puts rebuilt the table
    assert bytes(buffers[0]) == bytes(buffers[1])
    native.check()


# -- whole steps of the dict ------------------------------------------------------------------

DICT_KEYS = ["a", "b", "c", "n", "x", 1, 2.5]
DICT_VALUES = st.one_of(
    st.integers(-(1 << 64), 1 << 64),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=400),
    st.none(),
)
DICT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(DICT_KEYS), DICT_VALUES),
        st.tuples(
            st.just("increment"),
            st.sampled_from(DICT_KEYS),
            st.one_of(st.integers(-(1 << 63), 1 << 63), st.floats(allow_nan=False)),
        ),
        st.tuples(st.just("get"), st.sampled_from(DICT_KEYS), st.none()),
        st.tuples(st.just("delete"), st.sampled_from(DICT_KEYS), st.none()),
        st.tuples(st.just("update"), st.dictionaries(st.sampled_from(DICT_KEYS), DICT_VALUES)),
    ),
    max_size=40,
)


def dict_step(shared: SharedDict, step: str, key: Any, value: Any = None) -> Any:
    if step == "set":
        shared[key] = value
    elif step == "increment":
        return shared.increment(key, value)
    elif step == "get":
        return shared[key]
    elif step == "delete":
        del shared[key]
    else:
        shared.update(key)
    return None


def data_bytes(shared: SharedDict) -> bytes:
    """The current data block from its control words on (its header holds its own name)."""
    data = shared._data
    return bytes(data._live_block().buf[data.geometry.control :])


@pytest.fixture
def dict_pair() -> Iterator[tuple[SharedDict, SharedDict]]:
    base = f"native_pair_{os.getpid()}_{next(_counter)}"
    with (
        SharedDict.create(base + "_c", max_items=12, heap_size=4096, grow=False) as native,
        SharedDict.create(base + "_p", max_items=12, heap_size=4096, grow=False) as pure,
    ):
        yield native, python_path(pure)


@needs_native_dict
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # emptied per example
@given(steps=DICT_STEPS)
def test_dict_steps_write_the_same_bytes(
    dict_pair: tuple[SharedDict, SharedDict], steps: list[tuple[Any, ...]]
) -> None:
    """Stores, increments, reads (whole locked steps in C) match the Python path byte for byte."""
    native, pure = dict_pair
    native.clear()
    pure.clear()
    assert native._fast is not None
    assert pure._fast is None
    for step in steps:
        results = [outcome(functools.partial(dict_step, d, *step)) for d in (native, pure)]
        assert results[0] == results[1], step
        assert data_bytes(native) == data_bytes(pure), step
    native._check()
    assert dict(native.items()) == dict(pure.items())


# -- processes on both paths ------------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    name = f"native_mp_{os.getpid()}_{next(_counter)}"
    with SharedDict.create(name, max_items=256, heap_size=1 << 16) as d:
        yield d


def start(command: str, *arguments: str, pure: bool) -> subprocess.Popen[str]:
    env = {**os.environ, _accel.PURE_ENV: "1" if pure else "0"}
    process = subprocess.Popen(
        [sys.executable, SCRIPT, command, *arguments],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    if first != f"native={BUILT and not pure}":
        code, _, errors = finish(process)
        raise AssertionError(f"{command}: {first!r}, exit {code}: {errors}")
    return process


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Exit code, the rest of standard output (after the lines read so far) and errors."""
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdin.close()
    output = process.stdout.read()  # the text layer may hold lines read ahead: no communicate()
    errors = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    return process.wait(TIMEOUT), output.strip(), errors


def test_processes_on_both_paths_count_exactly(shared: SharedDict) -> None:
    """Two pure and two accelerated processes incrementing one counter count exactly."""
    shared.update({f"parent_{i}": i for i in range(20)})
    times = 300
    workers = [start("count", shared.name, f"w{i}", str(times), pure=i % 2 == 0) for i in range(4)]
    for worker in workers:
        code, output, errors = finish(worker)
        assert (code, output) == (0, "ok"), errors
    assert shared["n"] == 4 * times
    for i in range(4):
        assert {shared[f"w{i}_{j}"] for j in range(50)} == {times - 50 + j for j in range(50)}
    shared._check()


def ask(process: subprocess.Popen[str], line: str) -> str:
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()
    return process.stdout.readline().strip()


@needs_native_dict
@pytest.mark.parametrize("step", STEPS)
def test_accelerated_step_killed_at_every_store_is_repaired_by_a_pure_process(
    shared: SharedDict, step: str
) -> None:
    """An accelerated step SIGKILLed at its k-th shared store, for every k: a pure process
    repairs it, and the dict holds the old or the new value with every invariant."""
    shared.update({"n": 0, "big": "x" * 300, "small": "s0", "gone": 0})
    shared.update({f"gone{k}": k for k in range(1, 80)})
    shared["small"] = "s00"  # its first update: two areas, updated in place from now on
    verifier = start("verify", shared.name, pure=True)
    sweeper = start("sweep", shared.name, step, pure=False)
    assert sweeper.stdout is not None
    key = {"store_new": "new", "store_replace": "big", "store_in_place": "small"}
    previous = {"big": repr("x" * 300), "small": repr("s00"), "n": "0"}
    kills = repairs = 0
    try:
        while True:
            line = sweeper.stdout.readline().split()
            assert line, "the sweep ended early"
            if line[0] == "done":
                break
            k = int(line[1])
            seen = {"increment": "n", "delete": f"gone{k}", "store_new": f"new{k}"}
            name = seen.get(step) or key[step]
            repaired, value = ask(verifier, name).split(" ", 1)
            repairs = int(repaired)
            kills += 1
            new = {
                "store_new": repr("v" * 40),
                "store_replace": repr("x" * (300 + k)),
                "store_in_place": repr(f"s{k}"),
                "increment": str(int(previous.get("n", "0")) + 1),
                "delete": "None",
            }[step]
            old = {"store_new": "None", "delete": str(k)}.get(step) or previous[name]
            assert value in (old, new), (step, k, value, old, new)
            previous[name] = value
            assert sweeper.stdin is not None
            sweeper.stdin.write("next\n")
            sweeper.stdin.flush()
    finally:
        for process in (sweeper, verifier):
            process.kill()
            process.communicate(timeout=TIMEOUT)  # and close its pipes
    assert kills >= 3  # the step's stores were reached
    assert repairs >= 1
    shared._check()


@needs_native_dict
@pytest.mark.parametrize("where", ["heap", "free", "update"])
def test_pure_process_killed_inside_a_write_is_repaired_here(
    shared: SharedDict, where: str
) -> None:
    """A pure process killed inside a write: this accelerated process repairs at its next step."""
    shared.update({f"k{i}": ("old", b"o" * (i * 37)) for i in range(30)})
    for i in range(0, 30, 3):
        del shared[f"k{i + 1}"]
    before = dict(shared.items())
    child = start("die", shared.name, where, pure=True)
    assert finish(child)[0] == -signal.SIGKILL
    assert shared["k0"] in (before["k0"], ("new", b"n" * 200))
    shared["after"] = 1  # the accelerator's store: the repair was done first
    assert shared.increment("after") == 2
    assert shared.stats()["repairs"] == 1
    if where == "update":
        assert {k: v for k, v in shared.items() if k != "after"} == before
    shared._check()


@pytest.mark.parametrize("holder_pure", [True, False])
def test_lock_holder_killed_on_one_path_frees_the_other(
    shared: SharedDict, holder_pure: bool
) -> None:
    """A holder of the lock SIGKILLed on one path: a process on the other path goes on."""
    holder = start("hold", shared.name, pure=holder_pure)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.communicate(timeout=TIMEOUT)
    if holder_pure:  # this process: the accelerator where it is used
        assert shared.increment("n") == 1
        shared["after"] = "here"
    else:
        shared.update({f"parent_{i}": i for i in range(20)})
        worker = start("count", shared.name, "w", "10", pure=True)
        code, output, errors = finish(worker)
        assert (code, output) == (0, "ok"), errors
        assert shared["n"] == 10
    assert shared["holder"] == holder.pid
    shared._check()


@pytest.mark.parametrize("waiter_pure", [True, False])
def test_a_change_on_one_path_wakes_a_waiter_on_the_other(
    shared: SharedDict, waiter_pure: bool
) -> None:
    """wait_for sleeping on the futex word on one path is woken by a store on the other."""
    waiter = start("wait", shared.name, pure=waiter_pure)
    try:
        assert waiter.stdout is not None
        assert waiter.stdout.readline().strip() == "waiting"
        signal_words = shared._signal()
        for _ in range(TIMEOUT * 100):  # it counts itself in before it sleeps
            if signal_words.waiters():
                break
            time.sleep(0.01)
        setter = start("set", shared.name, pure=not waiter_pure)
        assert finish(setter)[:2] == (0, "ok")
        code, output, errors = finish(waiter)
        assert (code, output) == (0, "True"), errors
    finally:
        if waiter.poll() is None:
            waiter.kill()
            finish(waiter)


# -- attaching --------------------------------------------------------------------------------


@needs_native_attach
def test_accelerated_open_holds_and_reads_the_header() -> None:
    """open_held opens, checks, holds and reads in one call; it leaves refusals to Python."""
    import stat

    from shared_memory_array import SharedArray
    from shared_memory_array._platform import HOLD

    with SharedArray.allocate(None, 1000, "float64") as owner:
        system_name = backend.system_name(owner.name)
        held = backend.open_held(system_name, writable=True, header_bytes=4096)
        assert held is not None
        fd, info, header = held
        try:
            assert (info.st_ino, info.st_size) == (os.fstat(fd).st_ino, os.fstat(fd).st_size)
            assert header == os.pread(fd, 4096, 0)
            locks = backend.locks(os.dup(fd), system_name, writable=True, created=False)
            assert not locks.try_lock(HOLD, exclusive=True)  # HOLD is held shared on fd
            locks.close()
        finally:
            os.close(fd)
        path = os.path.join(backend.directory or "/dev/shm", system_name)
        os.chmod(path, 0o622)  # writable by group and others: untrusted
        try:
            assert backend.open_held(system_name, writable=True, header_bytes=4096) is None
        finally:
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    assert backend.open_held("sma_no_such_block", writable=True, header_bytes=4096) is None
