"""Process identity: a pid plus the process's start time.

A pid alone is not an identity: the kernel reuses pids. Each header records the
creator's pid *and* its start time (on Linux, field 22 of ``/proc/PID/stat``, in
clock ticks since boot), so a block whose creator died and whose pid now belongs
to another process is still recognised as orphaned. Where the start time cannot
be read (macOS, Windows) it is recorded as 0 and only the pid is compared.
"""

from __future__ import annotations

import functools
import os

__all__ = ["current_identity", "is_alive", "start_time"]

_PID_LIMIT = 2**31  # pid_t is a signed 32-bit integer


def _read_stat(pid: int) -> tuple[bytes, int] | None:
    """Return ``(state, start_time)`` from ``/proc/PID/stat``, ``None`` if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int:
    """Return the start time of process ``pid`` in clock ticks since boot, 0 if unknown."""
    stat = _read_stat(pid)
    return 0 if stat is None else stat[1]


@functools.lru_cache(maxsize=4)
def _identity_of(pid: int) -> tuple[int, int]:
    return pid, start_time(pid)


def current_identity() -> tuple[int, int]:
    """Return ``(pid, start_time)`` of the calling process (recomputed after a fork)."""
    return _identity_of(os.getpid())


def is_alive(pid: int, recorded_start: int) -> bool:
    """Tell whether the process that recorded ``(pid, recorded_start)`` still runs.

    A pid that exists but started at another time is a reused pid, and a zombie
    has exited: neither is alive. ``recorded_start == 0`` means the start time
    was unknown; then the pid decides.
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
    stat = _read_stat(pid)
    if stat is None:
        return True  # no /proc here (macOS, Windows): the pid decides
    state, started = stat
    if state in (b"Z", b"X"):
        return False  # a zombie has exited; only its parent has not reaped it yet
    return recorded_start == 0 or started == recorded_start
