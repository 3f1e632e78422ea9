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

Threads at fork
---------------
Before a fork the library stops its own threads (the codec's collector, the
populate thread), so no library thread is alive across a ``fork()`` the
library did not start: Python 3.12+ warns ("This process is multi-threaded,
use of fork() may lead to deadlocks in the child") when one is. They are
restarted in the parent by ``resume_in_parent`` callbacks, which run *after*
the fork has returned, never inside it: Python 3.13 counts the threads alive
once the ``after_in_parent`` callbacks have run (CPython issue gh-137109), so a
thread restarted there is counted. After a fork from the main thread the hub
asks the interpreter to run them at its next bytecode (``Py_AddPendingCall``,
scheduled by the last ``after_in_parent`` callback without running a bytecode
itself), which comes after ``fork()`` returned, in the code that called it.
Where it cannot (not CPython; a fork from another thread, which was
multi-threaded anyway), they run at once. A library call that needs a thread
before then starts it itself (the writer's next write or release, the next
populate job).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
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


class _Hook:
    __slots__ = ("after_in_child", "after_in_parent", "before", "order", "phase", "resume")

    def __init__(
        self,
        phase: ForkPhase,
        order: int,
        before: _Callback | None,
        after_in_parent: _Callback | None,
        after_in_child: _Callback | None,
        resume: _Callback | None,
    ) -> None:
        self.phase, self.order = phase, order
        self.before, self.after_in_parent, self.after_in_child = (
            before,
            after_in_parent,
            after_in_child,
        )
        self.resume = resume


_hooks: list[_Hook] = []


def at_fork(
    phase: ForkPhase,
    *,
    before: _Callback | None = None,
    after_in_parent: _Callback | None = None,
    after_in_child: _Callback | None = None,
    resume_in_parent: _Callback | None = None,
) -> None:
    """Run these callbacks around every ``fork`` of this process, in ``phase``'s place.

    ``resume_in_parent`` restarts what ``before`` stopped (a thread): it runs in
    the parent once the fork has returned, not inside it (see the module docstring).
    """
    _hooks.append(
        _Hook(phase, len(_hooks), before, after_in_parent, after_in_child, resume_in_parent)
    )
    _hooks.sort(key=lambda hook: (hook.phase, hook.order))


# Held from the first `before` callback of a fork to its last `after` one: resume
# callbacks (which start threads) never run while a fork is under way.
_fork_lock = threading.Lock()
# The pid whose resume callbacks are due (0: none). A child forked before they ran
# inherits the pending call, not the duty: the pid tells.
_resume_due = 0


def _before() -> None:
    global _scheduler_registered
    _fork_lock.acquire()
    if _schedule_resume is not None and not _scheduler_registered:
        # Registered now, at the first fork, it is the last `after_in_parent` callback
        # (a list copied after the `before` callbacks ran), after those that modules
        # imported after this one registered (logging's, a user's): Python code they
        # run would run a pending call already scheduled.
        _scheduler_registered = True
        os.register_at_fork(after_in_parent=_schedule_resume)
    for hook in reversed(_hooks):
        if hook.before is not None:
            hook.before()


def _after_in_parent() -> None:
    global _resume_due
    try:
        for hook in _hooks:
            if hook.after_in_parent is not None:
                hook.after_in_parent()
        _resume_due = _pid
    finally:
        _fork_lock.release()
    if _schedule_resume is None or threading.current_thread() is not threading.main_thread():
        # Cannot defer (Python 3.13 may then count the threads). From another thread,
        # the fork was multi-threaded anyway, and the pending call would run at any
        # bytecode of the main thread, maybe one inside a lock that starting a thread
        # takes (threading's own): now, then.
        _resume()


def _after_in_child() -> None:
    global _fork_lock, _resume_due
    _fork_lock = threading.Lock()
    _resume_due = 0
    for hook in _hooks:
        if hook.after_in_child is not None:
            hook.after_in_child()


def _resume() -> None:
    """Run the resume callbacks of the last fork, once, in the process that forked.

    May run at any bytecode of the main thread (a pending call): the callbacks
    never wait for a lock (one its interrupted code may hold), and skip what
    they cannot do now; a fork under way runs them again after it.
    """
    global _resume_due
    if _resume_due != _pid or not _fork_lock.acquire(blocking=False):
        return
    try:
        _resume_due = 0
        for hook in _hooks:
            if hook.resume is not None:
                with contextlib.suppress(Exception):  # a thread that cannot start now starts later
                    hook.resume()
    finally:
        _fork_lock.release()


def _load_add_pending_call() -> Callable[..., int] | None:
    """``Py_AddPendingCall``: the interpreter runs a function at the main thread's next bytecode."""
    try:
        function = ctypes.pythonapi.Py_AddPendingCall
    except (AttributeError, OSError):  # not CPython, or its symbols are not exported
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return, unused-ignore]


def _resume_from_pending_call(_: object) -> int:
    # A pending call that returns -1 raises in whatever code the main thread runs: never.
    with contextlib.suppress(Exception):
        _resume()
    return 0


_pending_resume = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(_resume_from_pending_call)
_add_pending_call = _load_add_pending_call()
# The last `after_in_parent` callback: schedules the pending call without running a
# bytecode (a partial of a C function), since the interpreter runs pending calls at
# the next bytecode it checks, which must come after the fork returned.
_schedule_resume = (
    None
    if _add_pending_call is None
    else functools.partial(_add_pending_call, _pending_resume, None)
)
_scheduler_registered = False


def _refresh_pid() -> None:
    global _pid, _identity
    _pid = os.getpid()
    _identity = None


at_fork(ForkPhase.PID, after_in_child=_refresh_pid)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )
