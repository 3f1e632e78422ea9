"""A SharedDict grows online: its table and heap, followed by every holder, through crashes.

Issue 19 item 4: ``grow=True`` by default; memory reserved as it is needed; every
atomicity and crash guarantee kept through a growth step (SIGKILL at chosen
points: the dict is as it was before or after it).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator

import pytest
from _children_v3 import grow_forever, insert_until_growth_then_die
from conftest import run_in_private_shm

from shared_memory_array import AllocationError, SharedDict, list_blocks
from shared_memory_array._dict._store import DataBlock, data_name

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
spawn = multiprocessing.get_context("spawn")
_counter = iter(range(1 << 30))


def unique() -> str:
    return f"grow_{os.getpid()}_{next(_counter)}"


@pytest.fixture
def small() -> Iterator[SharedDict]:
    """A dict that must grow soon: 8 keys, a 4 KiB heap."""
    with SharedDict.create(unique(), max_items=8, heap_size=4096) as d:
        yield d


def test_the_table_and_the_heap_grow_and_keep_every_item(small: SharedDict) -> None:
    """Thousands of keys and large values go into a dict made for 8 keys in 4 KiB."""
    expected = {f"k{i}": ("v" * (i % 700), i) for i in range(3000)}
    for key, value in expected.items():
        small[key] = value
    assert dict(small.items()) == expected
    stats = small.stats()
    assert stats["generation"] > 0
    assert stats["max_items"] >= 3000
    small._check()


def test_every_holder_follows_a_growth_without_re_attaching(small: SharedDict) -> None:
    """A second handle, made before the growth, sees every key written after it."""
    other = SharedDict.attach(small.name)
    try:
        before = other.stats()["generation"]
        small.update({f"k{i}": i for i in range(500)})
        assert other["k499"] == 499
        assert len(other) == 500
        assert other.stats()["generation"] > before
        other["from_other"] = "x"  # and writes through it land in the grown dict
        assert small["from_other"] == "x"
    finally:
        other.close()


def test_only_the_current_generation_stays_on_the_system(small: SharedDict) -> None:
    """After growth steps, one data block of the dict exists: the old ones are gone."""
    small.update({f"k{i}": i for i in range(200)})
    names = [info.name for info in list_blocks() if info.name.startswith(small.block_name)]
    generation = small.stats()["generation"]
    assert sorted(names) == sorted([small.block_name, data_block_name(small, generation)])


def test_grow_false_keeps_the_fixed_capacity() -> None:
    """With grow=False a full table or heap raises AllocationError and nothing changes."""
    with SharedDict.create(unique(), max_items=8, heap_size=4096, grow=False) as fixed:
        for i in range(8):
            fixed[i] = i
        with pytest.raises(AllocationError, match="grow=True"):
            fixed[8] = 8
        with pytest.raises(AllocationError, match="heap"):
            fixed[0] = "x" * 10_000
        assert dict(fixed.items()) == {i: i for i in range(8)}
        assert fixed.stats()["generation"] == 0


def test_memory_is_reserved_as_it_is_needed() -> None:
    """The default dict reserves its heap as entries arrive, never 100 MiB up front."""
    with SharedDict.create(unique()) as shared:
        stats = shared.stats()
        assert stats["heap_limit"] <= 1 << 20
        shared.update({f"k{i}": "v" * 100 for i in range(2000)})
        assert shared.stats()["heap_limit"] > stats["heap_limit"]
        assert shared.stats()["generation"] == 0  # the limit rose inside the same block


_FILL_A_SMALL_SHM = r"""
import sys
from shared_memory_array import SharedDict
d = SharedDict.create("docker_default")
for i in range(20_000):
    d[f"key{i}"] = "value" * 10
assert len(d) == 20_000
print("ok", d.stats()["heap_limit"], d.stats()["generation"], flush=True)
d.close()
"""


def test_the_default_dict_works_in_a_64_mib_dev_shm() -> None:
    """SharedDict.create(name) in Docker's default 64 MiB /dev/shm, with 20,000 items."""
    done = run_in_private_shm(
        [sys.executable, "-c", _FILL_A_SMALL_SHM], size="64m", timeout=TIMEOUT
    )
    if done.returncode != 0 and "mount" in done.stderr and "ok" not in done.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize("where", ["created", "copied", "committed"])
def test_a_process_killed_inside_a_growth_leaves_the_dict_before_or_after(where: str) -> None:
    """SIGKILL at a chosen point of a growth step: the dict is whole, as before or after it."""
    with SharedDict.create(unique(), max_items=8, heap_size=1 << 14) as shared:
        shared.update({f"old{i}": i for i in range(5)})
        child = spawn.Process(target=insert_until_growth_then_die, args=(shared.name, where))
        child.start()
        child.join(TIMEOUT)
        assert child.exitcode == -signal.SIGKILL, child.exitcode
        shared._check()  # takes the lock: repairs what the killed process left
        contents = dict(shared.items())
        assert {f"old{i}": i for i in range(5)}.items() <= contents.items()
        new = {key: value for key, value in contents.items() if key.startswith("new")}
        assert new == {f"new{i}": i for i in range(len(new))}  # a prefix: no half insert
        generation = shared.stats()["generation"]
        if where == "committed":
            assert generation == 1  # after the step
        else:
            assert generation == 0  # before it
        for i in range(200):  # and it still grows
            shared[f"again{i}"] = i
        shared._check()
        assert shared["again199"] == 199


def data_block_name(shared: SharedDict, generation: int) -> str:
    """The name of the data block of ``generation`` of ``shared``."""
    return data_name(shared.block_name, shared._data.tag, generation)


def data_blocks_of(shared: SharedDict) -> list[str]:
    """The names of the dict's data blocks on the system, from a listing."""
    return sorted(
        info.name for info in list_blocks() if info.name.startswith(shared.block_name + "~")
    )


@pytest.mark.parametrize("then", ["unlink", "grow"])
def test_the_old_block_a_mover_killed_after_its_commit_left_goes_by_name(then: str) -> None:
    """Killed between the commit and the old block's unlink: that name goes with the dict.

    The writer makes two growth steps and is killed in the second, so this
    process, still at generation 0, never maps the block left behind (closing
    the last mapping would have reaped it). The name goes when the dict is
    unlinked, or at its next growth; it is not left for a reaper's scan.
    """
    shared = SharedDict.create(unique(), max_items=8, heap_size=1 << 14)
    try:
        shared.update({f"old{i}": i for i in range(5)})
        child = spawn.Process(
            target=insert_until_growth_then_die, args=(shared.name, "committed", 2)
        )
        child.start()
        child.join(TIMEOUT)
        assert child.exitcode == -signal.SIGKILL, child.exitcode
        shared._check()
        assert shared.stats()["generation"] == 2
        assert data_blocks_of(shared) == [data_block_name(shared, n) for n in (1, 2)]
        if then == "grow":
            while shared.stats()["generation"] < 3:
                shared[f"more{len(shared)}"] = 0
            assert data_blocks_of(shared) == [data_block_name(shared, 3)]
    finally:
        shared.close()
        shared.unlink()
    assert data_blocks_of(shared) == []


def test_unlink_removes_a_leftover_of_any_earlier_generation() -> None:
    """Two movers killed in a row can leave a block two or more generations back: it goes too.

    The leftover is made here by hand, as a block of generation 0 of a dict
    that has grown past generation 2, and kept mapped meanwhile (a block
    nobody maps that is not its dict's current one goes when its last mapping
    does, or at the reaper's next scan; this is about its name going at once).
    """
    shared = SharedDict.create(unique(), max_items=8, heap_size=4096)
    leftover = None
    try:
        shared.update({f"k{i}": i for i in range(100)})
        assert shared.stats()["generation"] >= 3
        data = shared._data
        leftover = DataBlock.create(data.entry_name, data.tag, 0, 8, 4096)
        assert data_block_name(shared, 0) in data_blocks_of(shared)
    finally:
        shared.close()
        shared.unlink()
        assert data_blocks_of(shared) == []
        if leftover is not None:
            leftover.close()


@pytest.mark.parametrize("first", ["old", "new"])
def test_an_unlinked_dict_and_a_new_dict_of_its_name_grow_apart(first: str) -> None:
    """A dict unlinked but still used, and a new dict of its name: neither touches the other.

    Both grow through the same generations, in either order; a holder of the
    old dict that follows its growth late finds the old dict's data, and a
    process that attaches by name finds the new one's. (Data blocks named by
    the dict's name and generation alone were shared by the two: the second
    grower took the first's block for a killed mover's leftover and removed it.)
    """
    name = unique()
    old = SharedDict.create(name, max_items=8, heap_size=4096)
    late = SharedDict.attach(name)  # a holder of the old dict that follows later
    try:
        old.update({f"old{i}": i for i in range(5)})
        old.unlink()  # its holders go on using it
        with SharedDict.create(name, max_items=8, heap_size=4096) as new:
            growers = [old, new] if first == "old" else [new, old]
            for shared in growers:
                label = "old" if shared is old else "new"
                shared.update({f"{label}{i}": i for i in range(40)})
                assert shared.stats()["generation"] >= 2
            assert dict(late.items()) == {f"old{i}": i for i in range(40)}
            with SharedDict.attach(name) as again:
                assert dict(again.items()) == {f"new{i}": i for i in range(40)}
            assert late._data.tag != new._data.tag
    finally:
        late.close()
        old.close()


def test_a_writer_killed_at_random_points_while_the_dict_grows(small: SharedDict) -> None:
    """SIGKILLing a writer that makes the dict grow, several times: whole values, updates whole."""
    for attempt in range(4):
        ready = spawn.Event()
        child = spawn.Process(target=grow_forever, args=(small.name, ready))
        child.start()
        try:
            assert ready.wait(TIMEOUT)
            threading.Event().wait(0.02 * attempt)
        finally:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(TIMEOUT)
        assert child.exitcode == -signal.SIGKILL
        small._check()
        for slot in range(10):
            round_number, data = small[f"k{slot}"]
            assert data == bytes([slot]) * ((round_number + slot) % 300)
        batches: dict[int, int] = {}
        for key in small:
            if isinstance(key, str) and key.startswith("batch"):
                number = int(key[5:].split("_")[0])
                batches[number] = batches.get(number, 0) + 1
        assert all(count == 20 for count in batches.values())  # update(): all or nothing
    assert small.stats()["generation"] > 0
