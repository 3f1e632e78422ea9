"""Prefault the writer's mapping of pooled codec blocks, off the hot path.

A new codec block is filled with ``pwrite`` (:mod:`._codec`), so its writer's
mapping has no page-table entries yet. Reusing it copies through that
mapping, and the first such copy used to take one page fault per 4 KiB page:
for 1 GB about 262k faults, ~380 ms against ~71 ms for every later reuse.
A block that enters the writer's pool is expected to be reused, so a
background thread maps its pages in (:func:`submit`) while it waits there.

How pages are mapped in
-----------------------
:func:`prefault` never changes a byte of the block: it only installs
page-table entries for pages the block already has (``posix_fallocate``
reserved them all).

* ``madvise(MADV_POPULATE_READ)`` then ``madvise(MADV_POPULATE_WRITE)``
  (Linux >= 5.14, through the platform layer), per chunk of :data:`CHUNK`
  bytes, with the GIL released during each call. The read pass goes first because read
  faults of a file mapping map up to 16 neighbouring pages at once
  ("fault-around"); on tmpfs those entries are already writable, so the write
  pass then only walks them (measured here for 1 GB: read 0.2 s + write
  0.05-0.15 s, against 0.4-0.6 s for the write pass alone). The write pass
  makes sure of the result where the kernel maps read faults read-only.
  Populating fails with an error code, never ``SIGBUS``, if the file was
  truncated under us.
* Where the kernel refuses (``EINVAL``: older than 5.14, or no ``madvise``
  through ``ctypes``), one byte of every page is *read* instead (numpy, a
  strided view): the same read faults, with the GIL held; the later copy may
  still take write faults where read faults map pages read-only.

Reading and populating are both safe beside a concurrent copy into the same
pages, so nothing waits: a write that takes a block still being populated
cancels the job (:meth:`Job.cancel`) and proceeds; the thread stops at the end
of its current chunk. That write maps what the thread had not reached itself,
by reading (``prefault(..., by_reading=True)``: no per-page walk in the
kernel, about 0.1 s per GB here) before it copies: 16 pages per fault instead
of one (measured here, 1 GB written right after its release: 0.27 s against
0.72 s without any of this; 0.18-0.2 s in steady state).

The job holds a view of the mapping while it runs, so a block discarded
meanwhile stays mapped until that chunk ends (its ``close()`` defers the unmap
to the last view, see :mod:`._block`), and is unmapped by the thread as it
lets the view go.

One thread per process serves every job in turn and exits when none is
left: no thread runs once the pool is empty. Before a ``fork()`` the thread is
stopped at the end of its current chunk (its job goes back to the front of the
queue) and restarted in the parent once the fork has returned, so no library thread is alive
across a fork; a forked child starts with no job and no thread.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import mmap
import threading
from typing import Final

import numpy as np

from ._platform import backend
from ._process import ForkPhase, at_fork, wait_thread_exit

__all__ = ["CHUNK", "MIN_BYTES", "Job", "idle", "prefault", "submit", "wait_idle"]

CHUNK: Final = 32 << 20
"""Bytes populated per call: how far the thread runs after a job is cancelled."""
MIN_BYTES: Final = 1 << 20
"""Smaller unmapped remainders are left to the writer (no thread woken for them)."""
THREAD_NAME: Final = "shared_memory_array-populate"


# Cleared the first time the kernel answers EINVAL: from then on, the read fallback.
_madvise_works = backend.can_populate


def _address(view: memoryview) -> int | None:
    """The address of ``view``'s first byte; ``None`` for a read-only view."""
    try:
        # The temporary ctypes object exports the view only for this line; the
        # caller's view keeps the mapping alive for as long as it uses the address.
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError, BufferError):
        return None


def _advise(address: int, length: int) -> int:
    """Populate ``length`` bytes at ``address`` (read, then write pass); 0 or an errno."""
    return backend.populate(address, length)


def _read_pages(view: memoryview, start: int, stop: int) -> None:
    """Read one byte of every page of ``view[start:stop]`` (the fallback: read faults)."""
    pages = np.frombuffer(view[start:stop], np.uint8)[:: mmap.PAGESIZE]
    pages.max(initial=0)


def prefault(
    view: memoryview, start: int = 0, stop: int | None = None, *, by_reading: bool = False
) -> bool:
    """Map pages ``[start, stop)`` of ``view`` into this process's page tables.

    Never changes a byte (see the module docstring). ``view`` must start on a
    page boundary (a whole mapping does) and stay alive during the call.

    Parameters
    ----------
    by_reading
        Read one byte of every page instead of asking the kernel: about twice
        as fast (no per-page walk), but with the GIL held; for a caller about
        to copy into these pages itself.

    Returns
    -------
    bool
        ``False`` if the kernel could not populate the range (for instance the
        file behind it is shorter than the mapping): nothing is mapped then,
        and touching those pages would raise ``SIGBUS``.
    """
    global _madvise_works
    stop = len(view) if stop is None else min(stop, len(view))
    start -= start % mmap.PAGESIZE
    if start >= stop:
        return True
    if _madvise_works and not by_reading:
        address = _address(view)
        if address is not None:
            error = _advise(address + start, stop - start)
            if error != errno.EINVAL:
                return error == 0
            _madvise_works = False
    if not _fits_file(view, stop):
        return False
    _read_pages(view, start, stop)
    return True


def _fits_file(view: memoryview, stop: int) -> bool:
    """Whether the file behind ``view`` (an ``mmap``) still has ``stop`` bytes (no SIGBUS)."""
    mapping = view.obj
    if isinstance(mapping, mmap.mmap):
        try:
            return mapping.size() >= stop
        except (OSError, ValueError):  # no descriptor kept (3.13, trackfd=False): cannot tell
            return True
    return True


class Job:
    """One block's mapping being populated by the thread.

    Attributes
    ----------
    populated : int
        Bytes from the start of the mapping known to be populated so far.
    done : bool
        Whether the thread has finished with this job (complete, cancelled or failed).
    """

    __slots__ = ("_view", "cancelled", "done", "populated", "size")

    def __init__(self, view: memoryview, start: int) -> None:
        self._view: memoryview | None = view
        self.size = len(view)
        self.populated = start
        self.cancelled = False
        self.done = False

    @property
    def complete(self) -> bool:
        """Whether the whole mapping is populated."""
        return self.populated >= self.size

    def cancel(self) -> None:
        """Stop at the end of the current chunk (never waits; idempotent)."""
        self.cancelled = True

    def _run(self) -> bool:
        """Populate until done, cancelled or paused; ``True`` if paused (run again later)."""
        view = self._view
        try:
            while view is not None and not self.cancelled and self.populated < self.size:
                if _paused:
                    return True
                stop = min(self.size, self.populated + CHUNK)
                if not prefault(view, self.populated, stop):
                    break
                self.populated = stop
        finally:
            if not _paused or self.cancelled or self.populated >= self.size:
                self._view = None
                if view is not None:
                    # Drops our hold on the mapping: a block discarded meanwhile is unmapped now.
                    with contextlib.suppress(BufferError):
                        view.release()
                self.done = True
        return False


_jobs: collections.deque[Job] = collections.deque()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def submit(view: memoryview, start: int = 0) -> Job:
    """Populate the mapping behind ``view`` (a writable view of all of it) in the background.

    Bytes before ``start`` are known to be populated already. The job keeps a
    view of the mapping until the thread is done with it.
    """
    global _thread
    job = Job(view[:], start)
    with _lock:
        _jobs.append(job)
        if _thread is None:
            _thread = threading.Thread(target=_serve, name=THREAD_NAME, daemon=True)
            _thread.start()
    return job


def _serve() -> None:
    global _thread
    while True:
        with _lock:
            if not _jobs or _paused:
                _thread = None
                return
            job = _jobs.popleft()
        paused = False
        with contextlib.suppress(Exception):  # a bad block never kills the thread
            paused = job._run()
        if paused:
            with _lock:
                _jobs.appendleft(job)
        else:
            job.done = True


def idle() -> bool:
    """Whether no populate thread runs in this process."""
    with _lock:
        return _thread is None


def wait_idle(timeout: float) -> bool:
    """Wait until the thread has served every job and exited; ``False`` on timeout."""
    with _lock:
        thread = _thread
    if thread is not None:
        thread.join(timeout)
    return idle()


_paused = False


def _before_fork() -> None:
    """Stop the thread at the end of its chunk; its job waits at the front of the queue."""
    global _paused
    with _lock:
        thread = _thread
        _paused = True
    if thread is not None:
        wait_thread_exit(thread)


def _after_fork_in_parent() -> None:
    global _paused
    with _lock:
        _paused = False  # a job submitted from now on starts the thread itself


def _resume_after_fork() -> None:
    """Serve the waiting jobs again (once the fork returned: see the fork hub).

    Never waits for the lock: whoever holds it is :func:`submit` (which starts
    the thread itself) or a look at :func:`idle`.
    """
    global _thread
    if not _lock.acquire(blocking=False):
        return
    try:
        if _jobs and _thread is None and not _paused:
            _thread = threading.Thread(target=_serve, name=THREAD_NAME, daemon=True)
            _thread.start()
    finally:
        _lock.release()


def _after_fork_in_child() -> None:
    global _lock, _thread, _paused
    _lock = threading.Lock()
    _thread = None
    _paused = False
    for job in _jobs:
        job.cancel()
    _jobs.clear()


at_fork(
    ForkPhase.POPULATE,
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
    resume_in_parent=_resume_after_fork,
)
