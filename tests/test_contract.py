"""The lifetime contract (API.md section 0), tested once for every kind of block.

zarr's ``StoreTests`` pattern: each test takes a ``kind`` and uses only what
``_children_contract`` says about it (make, open, read, end, the names of its
blocks), so a guarantee is tested once for arrays, dicts, codec tokens and
``SharedData`` alike, and a new kind added to ``KINDS`` inherits every test.
The other process of a test is ``_children_contract.py`` run as a script.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _children_contract import (
    CHECKSUM,
    KINDS,
    PICKLED_HANDLES,
    block_names,
    checksum,
    end,
    make,
    open_ref,
)
from conftest import block_exists

from shared_memory_array import (
    BlockNotFoundError,
    SharedData,
    UntrustedBlockError,
    _codec,
    _lifetime,
    cleanup,
)
from shared_memory_array._codec._writer import POOL_BYTES_ENV
from shared_memory_array._platform import backend

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

CHILD = str(Path(__file__).with_name("_children_contract.py"))
TIMEOUT = 60


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each kind of block, with the codec's pool off (a released block is unlinked, not kept)."""
    _codec.configure(pool_bytes=0)
    try:
        yield request.param
    finally:
        _codec.configure(pool_bytes=None)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, POOL_BYTES_ENV: "0"},  # a released block is unlinked, not pooled
    )


def _line(child: subprocess.Popen[str]) -> str:
    """The child's next line (at most TIMEOUT seconds: a hung child fails the test)."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
    assert ready, "the child did not answer"
    return child.stdout.readline().strip()


def _ask(child: subprocess.Popen[str], command: str) -> str:
    assert child.stdin is not None
    child.stdin.write(command + "\n")
    child.stdin.flush()
    return _line(child)


def _finish(child: subprocess.Popen[str]) -> int:
    """Close the child's input (it exits normally) and return its exit status."""
    if child.stdin is not None:
        child.stdin.close()
    try:
        return child.wait(TIMEOUT)
    finally:
        if child.stdout is not None:
            child.stdout.close()


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(TIMEOUT)
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()


def _any_named(kind: str, ref: str) -> bool:
    return any(block_exists(name) for name in block_names(kind, ref))


def _let_go(obj: object) -> None:
    """Drop this process's hold of an opened object (and SharedData's per-process cache)."""
    close = getattr(obj, "close", None)
    if close is not None:
        close()
    SharedData.clear_cache()
    gc.collect()


def _set_mode(kind: str, ref: str, mode: int) -> None:
    for name in block_names(kind, ref):
        if block_exists(name):
            fd = backend.open_block(backend.system_name(name), create=False, writable=True)
            try:
                os.fchmod(fd, mode)
            finally:
                backend.close_descriptor(fd)


def test_an_explicit_end_frees_the_name_now_while_another_process_holds(kind: str) -> None:
    """The owner's end removes the name at once; the holder's views stay valid."""
    obj, ref = make(kind)
    holder = _start("hold", kind, ref)
    try:
        assert _line(holder) == "held"
        end(kind, obj)
        assert not _any_named(kind, ref)
        with pytest.raises(BlockNotFoundError):
            open_ref(kind, ref)
        assert float(_ask(holder, "read")) == CHECKSUM
    finally:
        assert _finish(holder) == 0


def test_a_killed_owner_never_pulls_the_rug_from_a_holder(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the owner: the block lives while held here, then goes."""
    maker = _start("make", kind)
    try:
        ref = _line(maker)
        opened = open_ref(kind, ref)
    finally:
        _kill(maker)
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0")  # no pickled handle may keep it: only us
    cleanup()
    assert _any_named(kind, ref)
    assert checksum(kind, opened) == CHECKSUM
    _let_go(opened)
    del opened
    gc.collect()
    cleanup()
    assert not _any_named(kind, ref)


def test_nothing_leaks_when_a_killed_owner_had_no_holder(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block nobody holds, whose creator was killed, is cleaned up."""
    maker = _start("make", kind)
    try:
        ref = _line(maker)
    finally:
        _kill(maker)
    assert _any_named(kind, ref)
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0")
    cleanup()
    assert not _any_named(kind, ref)
    with pytest.raises(BlockNotFoundError):
        open_ref(kind, ref)


def test_trust_is_judged_first(kind: str) -> None:
    """A block writable by others is refused with UntrustedBlockError, whatever the kind."""
    obj, ref = make(kind)
    try:
        _set_mode(kind, ref, 0o622)
        with pytest.raises(UntrustedBlockError):
            open_ref(kind, ref)
    finally:
        _set_mode(kind, ref, 0o600)
        end(kind, obj)


def test_the_handle_that_lands_after_the_owner_let_go_is_the_owner(kind: str) -> None:
    """A pickled handle keeps the block past its owner's collection; the lander owns it."""
    if kind not in PICKLED_HANDLES:
        pytest.skip(f"a {kind} passes a string, not a handle")
    obj, ref = make(kind)
    pickled = pickle.dumps(obj)
    del obj
    gc.collect()  # the owner lets go implicitly: the pickle in flight keeps the block
    assert _any_named(kind, ref)
    landed = pickle.loads(pickled)
    assert landed.owner is True
    assert checksum(kind, landed) == CHECKSUM
    landed.close()  # an explicit end of the owner
    assert not _any_named(kind, ref)


def test_a_close_keeps_the_name_for_a_handle_in_flight(kind: str) -> None:
    """v3: the owner's close() while a pickle is in flight keeps the name until it lands."""
    if kind not in PICKLED_HANDLES:
        pytest.skip(f"a {kind} passes a string, not a handle")
    obj, ref = make(kind)
    pickled = pickle.dumps(obj)
    obj.close()
    assert _any_named(kind, ref)
    landed = pickle.loads(pickled)
    assert checksum(kind, landed) == CHECKSUM
    landed.close()
    assert not _any_named(kind, ref)
