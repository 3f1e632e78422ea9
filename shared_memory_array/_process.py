"""Which process this is, and what happens to the library's state at ``fork``.

The one home of both:

* :func:`this_pid`, the pid cached (glibc makes every ``getpid`` a system
  call) and refreshed in a forked child;
* :func:`current_identity`, the pid plus the process's start time, recorded in
  every header as the block's creator (a pid alone is reused by the kernel;
  the start time tells a reused pid from its first owner). It explains who made
  a block; it never decides a block's fate (the kernel's locks do, see
  :mod:`._lifetime`);
* :func:`is_alive`, for the explanations of ``list_blocks``;
* the **fork hub**: every module that keeps per-process state registers its
  fork callbacks here with a :class:`ForkPhase`, and one registration with
  ``os.register_at_fork`` runs them in a fixed, documented order.

Order at fork
-------------
``before`` callbacks run from the last phase to the first (threads are stopped
before the registries they use are locked); ``after_in_parent`` and
``after_in_child`` from the first to the last:

==========  =============================================================
phase       what (child side)
==========  =============================================================
PID         the pid cache and the creator identity are this child's
HOLDS       every mapping's lifetime locks get a description of their own
            (:mod:`._lifetime`); ownership does not fork
LOCKS       dict locks get descriptions of their own (portable backend), and
            locks the forking thread held are counted as inherited
WRITER      the codec writer forgets the parent's blocks (a child neither
            reuses nor unlinks them); its collector thread is not running
POPULATE    no populate job, no populate thread
==========  =============================================================

Before a fork the library stops its own threads (the codec's collector, the
populate thread) and restarts them in the parent afterwards, so no library
thread is alive across a ``fork()`` the library did not start (Python 3.12
warns about forking a multi-threaded process).
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable

from ._platform import backend

__all__ = [
    "ForkPhase",
    "at_fork",
    "current_identity",
    "is_alive",
    "this_pid",
    "wait_thread_exit",
]

_PID_LIMIT = 2**31  # pid_t is a signed 32-bit integer

_pid = os.getpid()
_identity: tuple[int, int] | None = None


def this_pid() -> int:
    """``os.getpid()``, cached, and refreshed in a forked child."""
    return _pid


def current_identity() -> tuple[int, int]:
    """``(pid, start time in clock ticks)`` of this process; start 0 where unknown."""
    global _identity
    identity = _identity
    if identity is None or identity[0] != _pid:
        identity = _identity = (_pid, backend.start_time(_pid))
    return identity


def is_alive(pid: int, recorded_start: int) -> bool:
    """Whether the process that recorded ``(pid, recorded_start)`` still runs.

    A pid that exists but started at another time is a reused pid, and a
    zombie has exited: neither is alive. ``recorded_start == 0`` means the
    start time was unknown; then the pid decides.
    """
    if not 0 < pid < _PID_LIMIT:
        return False  # a header field holds any 32-bit value; os.kill would overflow
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    state = backend.process_state(pid)
    if state is None:
        return True  # the system does not tell: the pid decides
    letter, started = state
    if letter in (b"Z", b"X"):
        return False  # a zombie has exited; only its parent has not reaped it yet
    return recorded_start == 0 or started == recorded_start


def wait_thread_exit(thread: threading.Thread, timeout: float = 5.0) -> None:
    """Join ``thread`` and wait until the system thread itself has exited.

    Python < 3.13 lets ``join`` return a moment before the system thread
    ends; a fork in that moment still counts it (and Python 3.12 warns).
    """
    thread.join(timeout)
    deadline = time.monotonic() + 0.2
    while not backend.thread_gone(thread.native_id) and time.monotonic() < deadline:
        time.sleep(0.0005)


class ForkPhase(enum.IntEnum):
    """Where a module's fork callbacks run (see the module docstring)."""

    PID = 0
    HOLDS = 1
    LOCKS = 2
    WRITER = 3
    POPULATE = 4


_Callback = Callable[[], None]
_hooks: list[tuple[ForkPhase, int, _Callback | None, _Callback | None, _Callback | None]] = []


def at_fork(
    phase: ForkPhase,
    *,
    before: _Callback | None = None,
    after_in_parent: _Callback | None = None,
    after_in_child: _Callback | None = None,
) -> None:
    """Run these callbacks around every ``fork`` of this process, in ``phase``'s place."""
    _hooks.append((phase, len(_hooks), before, after_in_parent, after_in_child))
    _hooks.sort(key=lambda hook: (hook[0], hook[1]))


def _before() -> None:
    for _, _, before, _, _ in reversed(_hooks):
        if before is not None:
            before()


def _after_in_parent() -> None:
    for _, _, _, parent, _ in _hooks:
        if parent is not None:
            parent()


def _after_in_child() -> None:
    for _, _, _, _, child in _hooks:
        if child is not None:
            child()


def _refresh_pid() -> None:
    global _pid, _identity
    _pid = os.getpid()
    _identity = None


at_fork(ForkPhase.PID, after_in_child=_refresh_pid)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )
