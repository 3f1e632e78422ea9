"""list_blocks() and cleanup(): what is found, what is removed, what is never touched.

The rule (API.md section 0, decided by :mod:`shared_memory_array._reaper`): a
block that any live process maps is kept whatever its header's creator pid
says; a block nobody maps, of which no pickled handle is in flight, is an
orphan and goes; format v1 blocks fall back to their creator's pid; unreadable
headers wait 60 s and for nobody to have them open.

Other processes (and other engineers' test runs) may own blocks in /dev/shm
while these tests run, so every test goes through the ``scope`` fixture: the
scan sees only the blocks the test made. One test checks the unrestricted
scan, in dry-run mode only. Other processes also *reap*: any process of this
user unlinks every orphan it sees when it creates its first block or exits. So
an orphan a test writes by hand is *shielded*: its lifetime words say a handle
of it was pickled just now, which every other process waits 60 s for, while
this test sets the handoff grace to 0 (``SHARED_MEMORY_ARRAY_HANDOFF_GRACE``)
and so sees a plain orphan. Orphans a test cannot shield (a killed child's) may
still be reaped by another process first: the test then skips rather than fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import pytest
from conftest import (
    block_exists,
    dead_identity,
    library_blocks,
    make_unheld_block,
    needs,
    private_shm_command,
    refuse_unlink,
    remove_block,
    run_in_private_shm,
)
from conftest import shield as shield_in_flight

import shared_memory_array as sma
from shared_memory_array import _lifetime, _reaper, _registry
from shared_memory_array._block import PREFIX, SharedBlock, new_name, unlink_block
from shared_memory_array._header import BlockKind, encode_header
from shared_memory_array._platform import backend
from shared_memory_array._process import current_identity

start_time = backend.start_time

TIMEOUT = 60  # seconds, for every join/get/read: a hung child fails the test
HELPER = Path(__file__).with_name("_children_registry.py")
FIXTURES = Path(__file__).with_name("fixtures")
SHM = backend.directory or "/dev/shm"

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

MakeBlock = Callable[..., SharedBlock]
WriteBlock = Callable[..., str]


@pytest.fixture
def scope(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names the registry may see; tests add the blocks they create (as users name them)."""
    names: set[str] = set()
    real_scan = _registry._block_names

    def scoped_scan() -> list[str]:  # the scan gives system names (a long name's is a hash)
        seen = {backend.system_name(name) for name in names}
        return [name for name in real_scan() if name in seen]

    monkeypatch.setattr(_registry, "_block_names", scoped_scan)
    return names


@pytest.fixture
def make_block(scope: set[str]) -> Iterator[MakeBlock]:
    """Make blocks this process maps (so holds), with a valid header of ``kind`` or raw bytes."""
    made: list[SharedBlock] = []

    def make(
        kind: BlockKind = BlockKind.CODEC,
        *,
        creator: tuple[int, int] | None = None,
        content: bytes | None = None,
        size: int = 4096,
    ) -> SharedBlock:
        if content is None:
            content = _header(kind, creator)
        block = SharedBlock.create(max(size, len(content)))
        block.buf[: len(content)] = content
        made.append(block)
        scope.add(block.name)
        return block

    yield make
    for block in made:
        block.close()
        block.unlink()


@pytest.fixture
def shielded(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process waits for no pickled handle (see the module docstring).

    Its own periodic scan is stopped too: with no grace it would reap a
    test's orphan whenever a block-creating call of the test falls 5 s after
    the last scan, so only the test's explicit ``cleanup()`` may judge.
    """
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0")
    monkeypatch.setattr(_reaper, "SCAN_INTERVAL", math.inf)


@pytest.fixture
def write_block(scope: set[str]) -> Iterator[WriteBlock]:
    """Make blocks by hand (nobody maps them) in scope; remove them after.

    ``shield``: mark a handle of it pickled just now, so that other processes
    leave the block alone for their 60 s grace (see the module docstring).
    A ``bytes`` name (one that is not UTF-8) is written as a file of the
    blocks' directory, where the backend has one.
    """
    written: list[bytes] = []
    made: list[str] = []

    def write(
        content: bytes,
        *,
        name: str | bytes | None = None,
        size: int = 4096,
        shield: bool = True,
        uid: int | None = None,
    ) -> str:
        data = bytearray(max(size, len(content)))
        data[: len(content)] = content
        if shield:
            shield_in_flight(data)
        if not isinstance(name, bytes):
            made.append(make_unheld_block(bytes(data), name=name, uid=uid))
            scope.add(backend.system_name(made[-1]))
            return made[-1]
        raw_name = name
        path = os.path.join(os.fsencode(SHM), raw_name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        written.append(path)
        try:
            os.write(fd, data)
            if uid is not None:
                os.fchown(fd, uid, -1)
        finally:
            os.close(fd)
        text_name = os.fsdecode(raw_name)
        scope.add(text_name)
        return text_name

    yield write
    for path in written:
        if os.path.lexists(path):
            os.unlink(path)
    for made_name in made:
        remove_block(made_name)


def _header(
    kind: BlockKind = BlockKind.CODEC, creator: tuple[int, int] | None = None, name: str = ""
) -> bytes:
    dtype = np.dtype("<f4") if kind == BlockKind.ARRAY else None
    layout = {"dtype": dtype, "shape": (3, 4), "strides": (16, 4)} if dtype else {}
    return encode_header(kind, nbytes=48, creator=creator, name=name, **layout)  # type: ignore[arg-type]


def _exists(name: str) -> bool:
    return block_exists(name)


def _infos() -> dict[str, sma.BlockInfo]:
    return {info.name: info for info in sma.list_blocks()}


def _present_or_skip(*names: str) -> None:
    """Skip if another process's reaper removed an unshielded orphan before this test looked."""
    gone = [name for name in names if not _exists(name)]
    if gone:
        pytest.skip(f"another process reaped {gone} first (any process may)")


class Child:
    """A ``_children_registry.py serve`` process: creates, attaches, pickles on request."""

    def __init__(self, scope: set[str]) -> None:
        self.scope = scope
        self.made: set[str] = set()
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid

    def ask(self, command: str) -> dict[str, Any]:
        """Send one command; its JSON reply (fails if the child does not answer in time)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        assert ready, f"child did not answer {command!r} in time"
        line = self.process.stdout.readline()
        assert line, f"child died on {command!r} (exit {self.process.poll()})"
        reply: dict[str, Any] = json.loads(line)
        assert "error" not in reply, reply
        if "name" in reply:
            self.made.add(reply["name"])
            self.scope.add(reply["name"])
            if "data" in reply:  # a dict's data block (see _dict._store)
                self.made.add(reply["data"])
                self.scope.add(reply["data"])
        return reply

    def kill(self) -> None:
        """SIGKILL the child and wait for it: nothing of its exit code runs."""
        self.process.kill()
        assert self.process.wait(timeout=TIMEOUT) == -signal.SIGKILL
        self._close_pipes()

    def exit(self) -> None:
        """A normal exit (its exit hook runs)."""
        assert self.process.stdin is not None
        self.process.stdin.write("exit\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=TIMEOUT) == 0
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def child(scope: set[str]) -> Iterator[Callable[[], Child]]:
    """Start serve children; kill any still running, and unlink what they made, after."""
    started: list[Child] = []

    def start() -> Child:
        started.append(Child(scope))
        return started[-1]

    yield start
    for one in started:
        if one.process.poll() is None:
            one.kill()
    for one in started:
        for name in one.made:
            unlink_block(name)


# -- list_blocks -----------------------------------------------------------------------


def test_list_reports_each_kind_with_creator(make_block: MakeBlock) -> None:
    """Blocks of every kind are listed with name, kind, size, creator, state and in_use."""
    blocks = {kind: make_block(kind) for kind in BlockKind}
    infos = _infos()
    assert set(infos) == {block.name for block in blocks.values()}
    for kind, block in blocks.items():
        info = infos[block.name]
        assert (info.kind, info.size) == (kind.name.lower(), 4096)
        assert (info.creator_pid, info.creator_alive) == (os.getpid(), True)
        assert (info.state, info.in_use) == ("live", True)
        assert info.error is None
        assert not info.name.startswith("/")
    array = infos[blocks[BlockKind.ARRAY].name]
    assert (array.shape, array.dtype, array.generation) == ((3, 4), "float32", 0)
    assert infos[blocks[BlockKind.DICT].name].shape is None


def test_list_reports_unreadable_blocks_as_unknown(make_block: MakeBlock) -> None:
    """Garbage, a torn header or no bytes at all: listed as unknown, with the reason."""
    garbage = make_block(content=b"not a header at all")
    torn = make_block(content=encode_header(BlockKind.ARRAY)[:40] + b"\xff" * 100)
    empty = make_block(content=b"")
    os.truncate(os.path.join(SHM, empty.name), 0)
    infos = _infos()
    for block in (garbage, torn, empty):
        info = infos[block.name]
        assert (info.kind, info.creator_pid, info.creator_alive) == ("unknown", None, None)
        assert info.state == "unreadable"
        assert info.error
    assert infos[empty.name].size == 0
    assert "too short" in (infos[empty.name].error or "")
    assert "magic" in (infos[garbage.name].error or "")


def test_list_skips_a_block_that_vanishes_mid_scan(
    make_block: MakeBlock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name read from the directory whose block is gone by the time it is opened is left out."""
    kept = make_block()
    monkeypatch.setattr(_registry, "_block_names", lambda: [PREFIX + "gone_meanwhile", kept.name])
    assert [info.name for info in sma.list_blocks()] == [kept.name]


def test_info_and_result_are_frozen() -> None:
    """BlockInfo and CleanupResult are immutable value objects."""
    info = sma.BlockInfo(name="sma_x", kind="codec", size=1, creator_pid=1, creator_alive=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sma.CleanupResult().dry_run = True  # type: ignore[misc]


def test_nothing_is_scanned_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where blocks cannot be enumerated, listing is empty and cleanup does nothing."""
    monkeypatch.setattr(backend, "can_list", False)
    assert sma.list_blocks() == []
    assert sma.cleanup() == sma.CleanupResult()


def test_unrestricted_scan_dry_run_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real /dev/shm scan runs end to end; a dry run never reaps nor unlinks anything."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a dry run tried to unlink {args}")

    mine = SharedBlock.create(4096)
    header = encode_header(BlockKind.CODEC, nbytes=0)
    mine.buf[: len(header)] = header
    try:
        assert mine.name in {info.name for info in sma.list_blocks()}
        with monkeypatch.context() as patch:
            patch.setattr(_reaper, "reap", forbidden)
            patch.setattr(os, "unlink", forbidden)
            result = sma.cleanup(dry_run=True)
        assert result.dry_run
        assert mine.name in result.skipped
        assert not result.failed
    finally:
        mine.close()
        mine.unlink()


def test_describe_block_accepts_slash_and_short_names(make_block: MakeBlock) -> None:
    """describe_block takes a name with a slash or without the prefix; absent names raise."""
    block = make_block(BlockKind.ARRAY)
    info, header = _registry.describe_block("/" + block.name)
    assert info.name == block.name
    assert header is not None
    assert header.shape == (3, 4)
    short_info, _ = _registry.describe_block(block.name[len(PREFIX) :])
    assert short_info.name == block.name
    with pytest.raises(sma.BlockNotFoundError, match="'does_not_exist'"):
        _registry.describe_block("does_not_exist")
    with pytest.raises(TypeError):
        _registry.describe_block(42)  # type: ignore[arg-type]


# -- the rule: held blocks stay, whatever their pid says -------------------------------


CREATORS = {
    "dead pid": dead_identity(),
    "pid 0": (0, 0),
    "pid beyond pid_t": (2**31, 0),
    "pid 2**32-1": (2**32 - 1, 0),
}


@pytest.mark.parametrize("creator", CREATORS.values(), ids=CREATORS.keys())
def test_held_block_is_kept_whatever_its_creator_pid(
    make_block: MakeBlock, creator: tuple[int, int]
) -> None:
    """A block this process maps is never cleaned, even when its header names a dead creator."""
    block = make_block(BlockKind.ARRAY, creator=creator)
    (info,) = sma.list_blocks()
    assert (info.creator_pid, info.creator_alive) == (creator[0], False)
    assert (info.state, info.in_use) == ("live", True)
    result = sma.cleanup()
    assert (result.cleaned, result.failed, result.skipped) == ([], [], [block.name])
    assert "in use" in result.reasons[block.name]
    assert _exists(block.name)


@pytest.mark.parametrize(
    "creator", [current_identity(), *CREATORS.values()], ids=["running: this process", *CREATORS]
)
@pytest.mark.usefixtures("shielded")
def test_unheld_block_is_an_orphan_whatever_its_creator_pid(
    write_block: WriteBlock, creator: tuple[int, int]
) -> None:
    """A block nobody maps is an orphan and is cleaned, even when its creator still runs."""
    name = write_block(_header(BlockKind.DICT, creator))
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use, info.creator_pid) == ("orphan", False, creator[0])
    result = sma.cleanup()
    assert (result.cleaned, result.failed, result.skipped) == ([name], [], [])
    assert "no process holds it" in result.reasons[name]
    assert not _exists(name)


@needs("process_table")
def test_zombie_creator_is_shown_dead_and_decides_nothing(make_block: MakeBlock) -> None:
    """A creator that exited, not yet reaped (a zombie), shows as dead; its held block stays."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        identity = (zombie.pid, start_time(zombie.pid))
        deadline = time.monotonic() + TIMEOUT
        while _state(zombie.pid) != "Z":
            assert time.monotonic() < deadline, "child never became a zombie"
            time.sleep(0.01)
        block = make_block(creator=identity)
        (info,) = sma.list_blocks()
        assert (info.creator_pid, info.creator_alive, info.in_use) == (zombie.pid, False, True)
        assert sma.cleanup().skipped == [block.name]
    finally:
        zombie.wait(timeout=TIMEOUT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat_file:
        data = stat_file.read()
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def test_dry_run_reports_without_unlinking(
    make_block: MakeBlock, write_block: WriteBlock, shielded: None
) -> None:
    """dry_run lists in ``cleaned`` what would go (the orphan), and unlinks nothing."""
    orphan = write_block(_header())
    held = make_block()
    result = sma.cleanup(dry_run=True)
    assert (result.cleaned, result.skipped, result.dry_run) == ([orphan], [held.name], True)
    assert _exists(orphan)
    assert _exists(held.name)


# -- the rule, across processes ----------------------------------------------------------


def test_orphans_of_a_sigkilled_creator_are_cleaned(
    child: Callable[[], Child], make_block: MakeBlock
) -> None:
    """A SIGKILLed creator's array, codec block and dict are orphans and go; a held block stays."""
    creator = child()
    made_dict = creator.ask(f"create dict {PREFIX}orphan_{new_name()[len(PREFIX) :]}")
    names = [
        creator.ask("create array")["name"],
        creator.ask("create codec")["name"],
        made_dict["name"],
        made_dict["data"],  # the dict's data block (see _dict._store)
    ]

    survivor = make_block(BlockKind.ARRAY)
    creator.kill()
    _present_or_skip(*names)
    infos = _infos()
    for name in names:
        info = infos[name]
        assert (info.state, info.in_use) == ("orphan", False), name
        assert (info.creator_pid, info.creator_alive) == (creator.pid, False)
    assert (infos[survivor.name].state, infos[survivor.name].in_use) == ("live", True)
    dry = sma.cleanup(dry_run=True)
    assert sorted(dry.cleaned) == sorted(names)
    assert all(_exists(name) for name in names)
    result = sma.cleanup()
    assert sorted(result.cleaned) == sorted(names)
    assert result.skipped == [survivor.name]
    assert not any(_exists(name) for name in names)


def test_block_held_by_another_process_outlives_its_creator(child: Callable[[], Child]) -> None:
    """A child that maps a block keeps it after the creator's SIGKILL; once it dies, it goes."""
    creator, holder = child(), child()
    name = creator.ask("create array")["name"]
    holder.ask(f"attach {name}")
    creator.kill()
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use, info.creator_alive) == ("live", True, False)
    result = sma.cleanup()
    assert (result.cleaned, result.skipped) == ([], [name])
    assert "in use" in result.reasons[name]
    holder.kill()
    _present_or_skip(name)
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use) == ("orphan", False)
    assert sma.cleanup().cleaned == [name]
    assert not _exists(name)


def test_the_last_holder_to_exit_unlinks(child: Callable[[], Child]) -> None:
    """A holder that exits normally after the creator died unlinks the block on its way out."""
    creator, holder = child(), child()
    name = creator.ask("create array")["name"]
    holder.ask(f"attach {name}")
    creator.kill()
    assert _exists(name)
    holder.exit()
    assert not _exists(name)


def test_in_flight_handle_is_kept_for_the_grace_then_cleaned(
    child: Callable[[], Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickled handle of a dead creator's array keeps the block for the grace, then it goes."""
    monkeypatch.delenv(_lifetime.GRACE_ENV, raising=False)
    creator = child()
    name = creator.ask("create array")["name"]
    creator.ask("pickle")
    creator.kill()
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use, info.creator_alive) == ("live", False, False)
    result = sma.cleanup()
    assert result.skipped == [name]
    assert "in flight" in result.reasons[name]
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0")  # the grace is over
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use) == ("orphan", False)
    assert sma.cleanup().cleaned == [name]
    assert not _exists(name)


def test_an_unpickled_handle_holds_and_owns_the_block(
    child: Callable[[], Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unpickling a dead creator's handle holds the block (kept with no grace) and owns it."""
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0")
    creator = child()
    name = creator.ask("create array")["name"]
    pickled = bytes.fromhex(creator.ask("pickle")["pickle"])
    array = pickle.loads(pickled)
    try:
        creator.kill()
        assert array.as_array().tolist() == list(range(10))
        (info,) = sma.list_blocks()
        assert (info.state, info.in_use) == ("live", True)
        assert sma.cleanup().skipped == [name]
    finally:
        array.close()
    assert not _exists(name)  # its new owner let go explicitly


# -- format v1: the pid rule -----------------------------------------------------------


def _v1_header(creator: tuple[int, int]) -> bytes:
    from _header_tools import with_field

    raw = (FIXTURES / "header_v1_codec.bin").read_bytes()
    raw = bytes(with_field(raw, "creator_pid", creator[0]))
    return bytes(with_field(raw, "creator_start", creator[1]))


def test_v1_block_of_a_running_creator_is_kept(write_block: WriteBlock) -> None:
    """A format v1 block (no locks) nobody maps is kept while its creator's pid runs."""
    name = write_block(_v1_header(current_identity()), shield=False)
    (info,) = sma.list_blocks()
    assert (info.kind, info.state, info.in_use, info.creator_alive) == (
        "codec",
        "live",
        False,
        True,
    )
    result = sma.cleanup()
    assert result.skipped == [name]
    assert "is running" in result.reasons[name]


def test_v1_block_of_a_dead_creator_is_cleaned(write_block: WriteBlock) -> None:
    """A format v1 block nobody maps whose creator has exited is an orphan and goes."""
    name = write_block(_v1_header(dead_identity()), shield=False)
    _present_or_skip(name)
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use, info.creator_alive) == ("orphan", False, False)
    result = sma.cleanup()
    assert result.cleaned == [name]
    assert "format v1" in result.reasons[name]


def test_v1_block_mapped_here_is_kept_although_its_creator_died(make_block: MakeBlock) -> None:
    """A v1 block this version maps holds its lock: kept, whatever the v1 pid rule says."""
    block = make_block(content=_v1_header(dead_identity()))
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use, info.creator_alive) == ("live", True, False)
    assert sma.cleanup().skipped == [block.name]


# -- unreadable headers ----------------------------------------------------------------


def test_unreadable_block_waits_for_the_grace_period(
    make_block: MakeBlock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable block is kept while recent, then removed once old and unused."""
    block = make_block(content=b"garbage")
    block.close()  # nobody maps it now
    result = sma.cleanup()
    assert result.skipped == [block.name]
    assert "may be being created" in result.reasons[block.name]
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use) == ("unreadable", False)
    monkeypatch.setattr(_reaper, "UNREADABLE_QUIET", 0.0)
    result = sma.cleanup()
    assert result.cleaned == [block.name]
    assert not _exists(block.name)


def test_unreadable_block_in_use_is_kept(
    make_block: MakeBlock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old unreadable block that some process still maps is never removed."""
    monkeypatch.setattr(_reaper, "UNREADABLE_QUIET", 0.0)
    block = make_block(content=b"garbage")  # still mapped by this process
    (info,) = sma.list_blocks()
    assert (info.state, info.in_use) == ("unreadable", True)
    result = sma.cleanup()
    assert result.skipped == [block.name]
    assert "a process holds it" in result.reasons[block.name]


@needs("process_table")
def test_unreadable_block_open_elsewhere_is_kept(
    write_block: WriteBlock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old unreadable block that a process has open (not mapped, no lock) is never removed."""
    monkeypatch.setattr(_reaper, "UNREADABLE_QUIET", 0.0)
    name = write_block(b"garbage", shield=False)
    fd = backend.open_block(name, create=False, writable=False)
    try:
        result = sma.cleanup()
        assert result.skipped == [name]
        assert "open or mapped" in result.reasons[name]
    finally:
        os.close(fd)
    assert sma.cleanup().cleaned == [name]


def test_torn_header_of_a_live_creator_is_kept(
    make_block: MakeBlock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header failing its checksum but naming a running creator (a rewrite) is kept."""
    monkeypatch.setattr(_reaper, "UNREADABLE_QUIET", 0.0)
    torn = bytearray(encode_header(BlockKind.CODEC))
    torn[60] ^= 0xFF  # inside data_offset: checksum now wrong
    block = make_block(content=bytes(torn))
    block.close()
    result = sma.cleanup()
    assert result.skipped == [block.name]
    assert f"running pid {os.getpid()}" in result.reasons[block.name]


# -- what cleanup never touches --------------------------------------------------------

OTHER_UID = 65534  # nobody


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a block to another user")
@pytest.mark.usefixtures("shielded")
def test_another_users_block_is_never_touched(write_block: WriteBlock) -> None:
    """Another uid's block that nobody maps, of a dead creator, is skipped and left in place."""
    name = write_block(_header(creator=dead_identity()), uid=OTHER_UID)
    (info,) = sma.list_blocks()
    assert (info.owner_uid, info.in_use) == (OTHER_UID, None)
    result = sma.cleanup()
    assert (result.cleaned, result.skipped) == ([], [name])
    assert f"uid {OTHER_UID}" in result.reasons[name]
    assert _exists(name)


def test_a_replaced_block_is_not_unlinked(
    write_block: WriteBlock, monkeypatch: pytest.MonkeyPatch, shielded: None
) -> None:
    """If a judged orphan is replaced by a new block of the same name, the new one survives."""
    name = write_block(_header())
    real_judge = _reaper._judge_open
    replacement: list[SharedBlock] = []

    def judge_then_replace(*args: Any, **kwargs: Any) -> _reaper.Judgement:
        judgement = real_judge(*args, **kwargs)
        remove_block(name)
        replacement.append(SharedBlock.create(4096, name=name))
        return judgement

    monkeypatch.setattr(_reaper, "_judge_open", judge_then_replace)
    try:
        result = sma.cleanup()
        assert result.cleaned == []
        assert _exists(name)
    finally:
        monkeypatch.undo()  # closing a replacement reaps it: never through the patch again
        for block in replacement:
            block.close()
            block.unlink()


def test_unlink_failure_is_reported(
    write_block: WriteBlock, monkeypatch: pytest.MonkeyPatch, shielded: None
) -> None:
    """An unlink that raises puts the block in ``failed`` with the reason; nothing else stops."""
    first, second = write_block(_header()), write_block(_header())
    with monkeypatch.context() as patch:
        refuse_unlink(patch, first)
        result = sma.cleanup()
    assert (result.cleaned, result.failed) == ([second], [first])
    assert "Operation not permitted" in result.reasons[first]
    assert _exists(first)


# -- odd entries named like blocks (API.md section 5, v2) ------------------------------


@needs("block_files")
def test_odd_entries_are_listed_and_skipped_never_followed(
    write_block: WriteBlock, make_block: MakeBlock, scope: set[str], shielded: None
) -> None:
    """Symlinks (to a block, dangling, looping), FIFOs and directories: listed, skipped, kept."""
    target = make_block()
    tag = new_name()[len(PREFIX) :]
    entries = {
        f"{PREFIX}link_{tag}": "a symbolic link",
        f"{PREFIX}dangling_{tag}": "a symbolic link",
        f"{PREFIX}loop_{tag}": "a symbolic link",
        f"{PREFIX}fifo_{tag}": "a FIFO",
        f"{PREFIX}dir_{tag}": "a directory",
    }
    paths = {name: os.path.join(SHM, name) for name in entries}
    os.symlink(target.name, paths[f"{PREFIX}link_{tag}"])
    os.symlink(f"{PREFIX}nothing_{tag}", paths[f"{PREFIX}dangling_{tag}"])
    os.symlink(f"{PREFIX}loop_{tag}", paths[f"{PREFIX}loop_{tag}"])
    os.mkfifo(paths[f"{PREFIX}fifo_{tag}"], 0o600)
    os.mkdir(paths[f"{PREFIX}dir_{tag}"], 0o700)
    scope.update(entries)
    try:
        infos = _infos()
        for name, what in entries.items():
            assert (infos[name].kind, infos[name].state) == ("unknown", "unreadable")
            assert (infos[name].error or "").startswith(what), infos[name]
        result = sma.cleanup()
        assert sorted(result.skipped) == sorted([*entries, target.name])
        assert result.cleaned == result.failed == []
        for name, what in entries.items():
            assert result.reasons[name].startswith(what)
            assert os.path.lexists(paths[name])
        assert _exists(target.name)
    finally:
        for name, path in paths.items():
            (os.rmdir if entries[name] == "a directory" else os.unlink)(path)


@needs("block_files")
def test_undecodable_names_are_listed_and_judged(write_block: WriteBlock, shielded: None) -> None:
    """Names that are not UTF-8 (and encoded surrogates) are listed and cleaned like any block."""
    tag = new_name()[len(PREFIX) :].encode()
    orphan = write_block(_header(), name=b"sma_\xff" + tag)
    surrogate = write_block(b"garbage", name=b"sma_\xed\xa0\x80" + tag, shield=False)
    infos = _infos()
    assert (infos[orphan].kind, infos[orphan].state) == ("codec", "orphan")
    assert (infos[surrogate].kind, infos[surrogate].state) == ("unknown", "unreadable")
    info, header = _registry.describe_block(orphan)
    assert header is not None
    assert info.name == orphan
    result = sma.cleanup()
    assert (result.cleaned, result.skipped) == ([orphan], [surrogate])
    assert not _exists(orphan)
    assert _exists(surrogate)


def test_long_non_ascii_name_is_listed(write_block: WriteBlock, shielded: None) -> None:
    """A 254-byte name (125 two-byte characters; NAME_MAX is 255) is listed, described, cleaned."""
    name = PREFIX + "é" * 125
    write_block(_header(name=name), name=name)
    (info,) = sma.list_blocks()
    assert (info.name, info.state) == (name, "orphan")
    assert _registry.describe_block(name)[0].name == name
    assert sma.cleanup().cleaned == [name]


@pytest.mark.parametrize(
    "name",
    [PREFIX + "é" * 200, PREFIX + "\ud800", "a/b", ""],
    ids=["200 chars", "surrogate", "slash", "empty"],
)
def test_describe_block_rejects_impossible_names(name: str) -> None:
    """A name no file can have is a BlockNotFoundError, never an OSError or UnicodeError."""
    with pytest.raises(sma.BlockNotFoundError, match="not a valid shared-memory block name"):
        _registry.describe_block(name)


# -- cleanup after a real crash, every kind at once -------------------------------------


def _report_of(child: BaseProcess, queue: Queue[dict[str, Any]]) -> dict[str, Any]:
    """The child's report, failing fast (not after the timeout) if the child dies first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.1)
        except Empty:
            assert child.is_alive(), f"child died before reporting (exit {child.exitcode})"
    raise AssertionError("child did not report in time")


def _blocks_created_by(pid: int) -> set[str]:
    """Names of every block on the system whose header names ``pid`` as its creator."""
    found = set()
    for name in library_blocks():
        if name.startswith(PREFIX):
            try:
                info, _ = _registry.describe_block(name)
            except sma.BlockNotFoundError:
                continue
            if info.creator_pid == pid:
                found.add(info.name)
    return found


def test_cleanup_after_sigkill(scope: set[str]) -> None:
    """A SIGKILLed spawn child's arrays, codec blocks and dict go; ours survives and attaches."""
    from _children_registry import create_blocks_then_wait

    # Made first: a block-creating call reaps every orphan it sees, the child's included.
    survivor = sma.SharedArray.copy(None, np.arange(10))
    scope.add(survivor.name)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    dict_name = PREFIX + "crash_" + new_name()[len(PREFIX) :]
    child = context.Process(target=create_blocks_then_wait, args=(queue, dict_name))
    child.start()
    try:
        report = _report_of(child, queue)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(timeout=TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    orphans = _blocks_created_by(report["pid"])
    try:
        _present_or_skip(*report["arrays"], dict_name)
        assert len(orphans) >= len(report["arrays"]) + len(report["tokens"]) + 1
        scope.update(orphans)
        with survivor:
            dry = sma.cleanup(dry_run=True)
            assert set(dry.cleaned) == orphans
            assert all(_exists(name) for name in orphans)
            result = sma.cleanup()
            assert set(result.cleaned) == orphans
            assert result.skipped == [survivor.name]
            assert not any(_exists(name) for name in orphans)
            with sma.SharedArray.attach(survivor.name) as again:
                assert again.as_array().tolist() == list(range(10))
            with pytest.raises(sma.BlockNotFoundError):
                sma.SharedDict.attach(dict_name)
    finally:
        survivor.close()
        for name in orphans:
            unlink_block(name)


# -- v3: who maps a block, and how much of it is in memory -----------------------------------


@needs("process_table")
def test_mapped_by_lists_every_process_that_maps_the_block() -> None:
    """BlockInfo.mapped_by: this process and a child that attached, then this process alone."""
    with sma.SharedArray.copy(None, np.arange(1000.0)) as array:
        code = (
            "import sys; from shared_memory_array import SharedArray; "
            f"h = SharedArray.attach({array.name!r}); h.as_array(); "
            "print('attached', flush=True); sys.stdin.read()"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "attached"
            (info,) = [info for info in sma.list_blocks() if info.name == array.name]
            assert info.mapped_by == tuple(sorted((os.getpid(), child.pid)))
            assert info.resident is not None
            assert info.resident >= array.nbytes
            described, _ = _registry.describe_block(array.name)
            assert described.mapped_by == info.mapped_by
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(60)
            child.stdout.close()  # type: ignore[union-attr]
        (info,) = [info for info in sma.list_blocks() if info.name == array.name]
        assert info.mapped_by == (os.getpid(),)


_SAME_INODE_ELSEWHERE = r"""
import os, subprocess, sys
import numpy as np
import shared_memory_array as sma

MAP_SAME_INODE = '''
import mmap, os, sys
wanted = int(sys.argv[1])
for attempt in range(10_000):  # a fresh tmpfs numbers its files from the bottom, like ours
    path = f"/dev/shm/sma_elsewhere{attempt}"
    with open(path, "wb") as file:
        file.write(bytes(4096))
    if os.stat(path).st_ino == wanted:
        break
    os.unlink(path)
else:
    sys.exit("no file of inode %d" % wanted)
with open(path, "r+b") as file:
    mapping = mmap.mmap(file.fileno(), 4096)
print("mapped", flush=True)
sys.stdin.read()
'''

with sma.SharedArray.copy(None, np.arange(10.0)) as array:
    inode = os.stat(f"/dev/shm/{array.name}").st_ino
    other = subprocess.Popen(
        PRIVATE_SHM + [sys.executable, "-c", MAP_SAME_INODE, str(inode)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert other.stdout.readline().strip() == "mapped", "the other namespace did not map"
        (info,) = [info for info in sma.list_blocks() if info.name == array.name]
        print("mapped_by", info.mapped_by == (os.getpid(),), info.mapped_by, os.getpid())
    finally:
        other.stdin.close()
        other.wait(60)
"""


@needs("process_table")
def test_a_file_of_the_same_inode_in_another_mount_namespace_is_not_a_mapper() -> None:
    """mapped_by counts mappings of the block's own file, not of another tmpfs's same inode.

    Inside a private /dev/shm, a process in a second private /dev/shm maps a file
    whose inode number equals the block's (both tmpfs number their files from the
    bottom): its /proc maps line shows the same path and inode, on another device.
    """
    inner = private_shm_command(["placeholder"])[:-1]
    script = f"PRIVATE_SHM = {inner!r}\n" + _SAME_INODE_ELSEWHERE
    done = run_in_private_shm([sys.executable, "-c", script], timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["mapped_by", "True"], done.stdout
