"""The process layer (``_process``): the pid cache, the creator identity, the fork hub's order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared_memory_array import _process
from shared_memory_array._process import ForkPhase, at_fork, current_identity, is_alive, this_pid

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _fork_and_report(body: str) -> str:
    """Run ``body`` (which sets ``report``) in a script that forks; return what the child wrote."""
    script = f"""
import os, sys, warnings
warnings.simplefilter("ignore", DeprecationWarning)
from shared_memory_array import _process
from shared_memory_array._process import ForkPhase, at_fork
{body}
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write_end, child_report().encode())
    os._exit(0)
os.close(write_end)
os.waitpid(pid, 0)
sys.stdout.write(os.read(read_end, 4096).decode() + "|" + parent_report())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_callbacks_run_in_the_documented_order() -> None:
    """before: last phase first; after (parent and child): first phase first, whatever the
    order of registration."""
    body = """
seen = []
P = ForkPhase
for phase in (P.POPULATE, P.HOLDS, P.WRITER, P.PID, P.LOCKS):
    at_fork(
        phase,
        before=lambda p=phase: seen.append("b" + p.name),
        after_in_parent=lambda p=phase: seen.append("p" + p.name),
        after_in_child=lambda p=phase: seen.append("c" + p.name),
    )
def child_report():
    return ",".join(seen)
def parent_report():
    return ",".join(seen)
"""
    child, parent = _fork_and_report(body).split("|")
    phases = ["PID", "HOLDS", "LOCKS", "WRITER", "POPULATE"]
    before = ["b" + name for name in reversed(phases)]
    assert child.split(",") == before + ["c" + name for name in phases]
    assert parent.split(",") == before + ["p" + name for name in phases]


def test_the_pid_and_the_identity_are_the_childs_in_the_first_phase() -> None:
    """A callback of a later phase already sees the child's pid (PID runs first)."""
    body = """
seen = {}
at_fork(ForkPhase.HOLDS, after_in_child=lambda: seen.update(
    pid=_process.this_pid(), identity=_process.current_identity()[0], real=os.getpid()))
def child_report():
    return f"{seen['pid']} {seen['identity']} {seen['real']}"
def parent_report():
    return str(os.getpid())
"""
    child, parent = _fork_and_report(body).split("|")
    pid, identity_pid, real = child.split()
    assert pid == identity_pid == real
    assert pid != parent


def test_this_pid_and_identity_describe_this_process() -> None:
    """The cached pid is os.getpid(); the identity is alive, and a changed start time is not."""
    assert this_pid() == os.getpid()
    pid, start = current_identity()
    assert pid == os.getpid()
    assert is_alive(pid, start)
    if start:
        assert not is_alive(pid, start + 1)  # the same pid, another start: a reused pid


@pytest.mark.parametrize("pid", [0, -1, 2**31, 2**40])
def test_is_alive_refuses_impossible_pids(pid: int) -> None:
    """A header can hold any 32-bit value: impossible pids are dead, never an OverflowError."""
    assert not is_alive(pid, 0)


def test_registration_keeps_phases_sorted() -> None:
    """A hook registered late still runs in its phase's place (the hub sorts on register)."""
    hooks_before = list(_process._hooks)
    try:
        at_fork(ForkPhase.PID, after_in_child=lambda: None)
        phases = [hook.phase for hook in _process._hooks]
        assert phases == sorted(phases)
    finally:
        _process._hooks[:] = hooks_before
