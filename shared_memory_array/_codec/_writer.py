"""The writer: this process's codec blocks, live ones and released ones kept for reuse.

* ``release(token)`` -- from any process -- checks the generation and sets
  the payload state word to ``released`` (:mod:`._store`): the token is dead
  at once everywhere. The writer frees the block (unlinks it and drops its
  mapping) at once if it released it itself, else within
  :data:`COLLECT_INTERVAL` (a collector thread that runs only while this
  process has blocks to watch). A writer that is gone cannot: then the
  releasing reader unlinks the name itself. A finalizer (the by-value copy of
  a token that an engine delivered, :mod:`.._transport`) releases with
  :meth:`Writer.release_soon`, which never waits for the writer's lock.
* The one exception: the writer keeps released blocks to reuse for its own
  next writes (first touching fresh shared memory costs far more than copying
  into it), at most ``pool_bytes`` of them (``configure``; default an eighth of
  the shared-memory filesystem, at most 2 GiB;
  ``$SHARED_MEMORY_ARRAY_POOL_BYTES``; 0 turns reuse off) and
  :data:`POOL_MAX_BLOCKS`, and only while it keeps writing: the pool is emptied
  :data:`POOL_IDLE_SECONDS` after the last write. A pooled block is marked
  ``pooled`` in its lifetime state (``list_blocks`` shows it).
* A pooled block is reused only if its name still names it (nobody unlinked
  or replaced it) and only once the writer could take HOLD exclusively: proof
  that no other process maps it any more (the writer owns it and holds no
  HOLD of its own, see :mod:`.._lifetime`). It rewrites payload and header,
  with the generation bumped, while it holds HOLD. A reader holding an old
  token either finds the block held (rewrite in progress) or sees another
  generation: it raises :class:`~shared_memory_array.BlockNotFoundError`,
  never returns another object's bytes. A live view is never overwritten.
* New blocks are filled with positional writes into pages reserved at
  creation, so a one-shot write never faults the pages into the writer's
  mapping. A pooled block's mapping is populated off the hot path by
  :mod:`.._populate`; a write that takes it earlier maps the rest itself by read
  faults (16 pages each) before copying. Every later reuse copies into mapped
  pages at memcpy speed.
* Every outstanding token costs the writer one descriptor (on the portable
  backend, two). When none is left, :func:`~shared_memory_array.write` falls
  back to an inline token with a ``UserWarning``.

Threads
-------
The collector runs only while this process has written blocks to watch, and
stops by itself when it has none. Around a ``fork()`` the library stops it
(and the populate thread) first and restarts it in the parent once the fork
has returned, so no library thread is alive across a fork (the fork hub,
:mod:`.._process`); a write before then restarts it itself.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import threading
import time
import warnings
from typing import Final

from .. import _populate, _reaper
from .._block import GENERATED_NAME_EXAMPLE
from .._header import align
from .._platform import backend
from .._process import ForkPhase, at_fork, wait_thread_exit
from ._pickling import Pickled
from ._store import RELEASED, CodecBlock, plan
from ._tokens import format_shared

__all__ = ["POOL_BYTES_ENV", "POOL_IDLE_SECONDS", "POOL_MAX_BLOCKS", "Writer", "writer"]

POOL_MAX_BLOCKS: Final = 8
POOL_BYTES_ENV: Final = "SHARED_MEMORY_ARRAY_POOL_BYTES"
POOL_IDLE_SECONDS: Final = 2.0
"""The pool is emptied this long after the writer's last write."""
COLLECT_INTERVAL: Final = 0.5
"""How often the writer's collector frees blocks that other processes released."""
_MAX_REUSE_WASTE: Final = 2  # reuse a pooled block at most this many times too big


def default_pool_bytes() -> int:
    """2 GiB, or an eighth of the shared-memory filesystem where that is smaller."""
    limits = backend.limits()
    if limits.total is None:
        return 2 << 30
    return min(2 << 30, limits.total // 8)


def default_pool_limit() -> int:
    """``$SHARED_MEMORY_ARRAY_POOL_BYTES``, else :func:`default_pool_bytes`."""
    value = os.environ.get(POOL_BYTES_ENV)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            warnings.warn(
                f"ignoring {POOL_BYTES_ENV}={value!r}: not an integer", UserWarning, stacklevel=2
            )
    return default_pool_bytes()


class _Written:
    """A block this process wrote (its handle owns it) and how much of it is mapped in."""

    __slots__ = ("handle", "mapped")

    def __init__(self, handle: CodecBlock) -> None:
        self.handle = handle
        self.mapped = 0  # bytes from the start known to be in the writer's page tables

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def size(self) -> int:
        return self.handle._live_block().size

    @property
    def buf(self) -> memoryview:
        return self.handle._live_block().buf

    def discard(self) -> None:
        """Explicit end: the name goes now; the mapping with its last view."""
        self.handle.unlink()
        self.handle.close()


class Writer:
    """The codec blocks this process wrote: live ones, and released ones kept for reuse.

    A collector thread runs while there is anything to collect: every
    :data:`COLLECT_INTERVAL` seconds it frees (or pools) the blocks other
    processes released, and it empties the pool :data:`POOL_IDLE_SECONDS` after
    the last write.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._collector: threading.Thread | None = None
        self.pool_limit = default_pool_limit()
        self._populating: dict[str, _populate.Job] = {}
        self._reset()

    def _reset(self) -> None:
        self._live: dict[str, _Written] = {}  # oldest first
        # Releases asked for without the lock (release_soon), done under it by the collector.
        self._pending: collections.deque[tuple[str, int]] = collections.deque()
        self._pool: dict[str, _Written] = {}  # released, mapped, oldest first
        self._pool_bytes = 0
        self._last_write = 0.0
        for job in self._populating.values():
            job.cancel()
        # Pooled blocks whose mapping the populate thread maps in (see _populate).
        self._populating = {}

    def write(self, pickled: Pickled, identity: str) -> str:
        """Store ``pickled`` in a new or pooled block; return its shared-memory token."""
        layout = plan(pickled, GENERATED_NAME_EXAMPLE)
        with self._lock:
            self._collect_released()
            entry = self._take_from_pool(layout.block_size)
            if entry is None:
                entry = _Written(CodecBlock.create(pickled))
            else:
                handle = entry.handle
                try:
                    handle.store(pickled, layout, handle.generation + 1, by_descriptor=False)
                except BaseException:
                    entry.discard()  # half rewritten: unlinked; closing it drops the lock
                    raise
                finally:
                    with contextlib.suppress(OSError, ValueError):
                        handle._live_block().hold.unhold()  # readers may attach again
            handle = entry.handle
            self._live[entry.name] = entry
            self._last_write = time.monotonic()
            self._start_collector()
            return format_shared(entry.name, handle.generation, handle.block_id, identity)

    def release(self, name: str, generation: int) -> bool:
        """Release a block written here; ``False`` if this process did not write it."""
        with self._lock:
            released = self._release(name, generation)
            if self._live or self._pool:
                self._start_collector()  # already running, unless a fork stopped it
            return released

    def release_soon(self, name: str, generation: int) -> None:
        """:meth:`release` later, without taking the lock: for finalizers.

        The garbage collector may run a finalizer while this very thread holds the
        writer's lock (inside :meth:`write`, or in the collector), so a finalizer must
        never wait for it. The release is queued; the collector, which runs while this
        process has live blocks, or the next write, does it within
        :data:`COLLECT_INTERVAL`. A block this process did not write is ignored.
        """
        self._pending.append((name, generation))  # deque.append: atomic, no lock

    def drop_all(self) -> None:
        """Unlink every block this process wrote and still tracks (tests; tokens then raise)."""
        with self._lock:
            for entry in (*self._live.values(), *self._pool.values()):
                entry.discard()
            self._reset()

    def empty_pool(self) -> None:
        """Free every pooled block now (``configure``, exit)."""
        with self._lock:
            self._trim_pool(0)

    def set_pool_limit(self, limit: int) -> None:
        """Keep at most ``limit`` bytes of released blocks from now on."""
        with self._lock:
            self.pool_limit = limit
            self._trim_pool(limit)

    def pooled_names(self) -> list[str]:
        """Names of the released blocks kept for reuse, oldest first."""
        with self._lock:
            return list(self._pool)

    def live_names(self) -> list[str]:
        """Names of the blocks written here whose tokens are live, oldest first."""
        with self._lock:
            return list(self._live)

    # -- under self._lock --------------------------------------------------------------

    def _release(self, name: str, generation: int) -> bool:
        entry = self._live.get(name)
        if entry is not None:
            if entry.handle.generation == generation:
                entry.handle.mark(RELEASED)
                del self._live[name]
                self._add_to_pool(entry)
            return True
        return name in self._pool  # a stale token of a pooled block: nothing to do

    def _collect_released(self) -> None:
        while self._pending:
            self._release(*self._pending.popleft())
        released = [name for name, entry in self._live.items() if entry.handle.state() == RELEASED]
        for name in released:
            self._add_to_pool(self._live.pop(name))

    def _pooling(self) -> bool:
        """Whether released memory is kept: reuse on, and a write in the last idle period."""
        recent = time.monotonic() - self._last_write < POOL_IDLE_SECONDS
        return self.pool_limit > 0 and backend.kernel_holds and recent

    def _add_to_pool(self, entry: _Written) -> None:
        size = entry.size
        if not self._pooling() or size > self.pool_limit:
            entry.discard()
            return
        self._trim_pool(self.pool_limit - size, max_blocks=POOL_MAX_BLOCKS - 1)
        entry.handle.set_pooled(True)
        self._pool[entry.name] = entry
        self._pool_bytes += size
        if size - entry.mapped >= _populate.MIN_BYTES:
            # Off the hot path: the next write into this block then copies at memcpy
            # speed instead of taking a page fault per page of the writer's mapping.
            self._populating[entry.name] = _populate.submit(entry.buf, entry.mapped)

    def _trim_pool(self, max_bytes: int, *, max_blocks: int | None = None) -> None:
        while self._pool and (
            self._pool_bytes > max_bytes
            or (max_blocks is not None and len(self._pool) > max_blocks)
        ):
            self._drop_pooled(next(iter(self._pool))).discard()

    def _drop_pooled(self, name: str) -> _Written:
        entry = self._pool.pop(name)
        self._pool_bytes -= entry.size
        job = self._populating.pop(name, None)
        if job is not None:
            job.cancel()  # the thread stops after its current chunk; nobody waits for it
            entry.mapped = max(entry.mapped, job.populated)
        return entry

    def _take_from_pool(self, needed: int) -> _Written | None:
        """Return a pooled block that fits ``needed`` bytes, held exclusively, or ``None``."""
        fitting = [
            entry
            for entry in self._pool.values()
            if needed <= entry.size <= _MAX_REUSE_WASTE * needed + mmap.PAGESIZE
        ]
        for entry in sorted(fitting, key=lambda entry: entry.size):
            block = entry.handle._live_block()
            if not block.still_named():  # unlinked (or replaced) from outside: never hand out
                self._drop_pooled(entry.name).discard()
                continue
            # Succeeds only if no other description maps the block: no reader has a
            # view of it any more.
            if block.hold.readers_gone():
                entry = self._drop_pooled(entry.name)
                # Taken before the thread was done: the rest is mapped in here, by read
                # faults that map 16 pages each, instead of one fault per page in the copy.
                touched = min(entry.size, align(needed, mmap.PAGESIZE))
                if entry.mapped < touched and _populate.prefault(
                    entry.buf, entry.mapped, touched, by_reading=True
                ):
                    entry.mapped = touched
                return entry
        return None

    # -- the collector -----------------------------------------------------------------

    def _start_collector(self) -> None:
        if self._collector is None or not self._collector.is_alive():
            self._wake.clear()
            self._collector = threading.Thread(
                target=self._collect_forever, name="shared_memory_array-collector", daemon=True
            )
            self._collector.start()

    def _collect_forever(self) -> None:
        while not self._wake.wait(COLLECT_INTERVAL):
            with self._lock:
                with contextlib.suppress(Exception):  # never let the thread die on a bad block
                    self._collect_released()
                    if not self._pooling():
                        self._trim_pool(0)
                if not self._live and not self._pool:
                    self._collector = None
                    return

    def _stop_collector(self) -> None:
        """Stop the collector and wait until its thread has exited (before a fork)."""
        collector = self._collector
        if collector is None:
            return
        self._wake.set()
        wait_thread_exit(collector)
        self._collector = None

    def before_fork(self) -> None:
        """No library thread may be alive across a fork the library did not start."""
        self._stop_collector()

    def resume_after_fork(self) -> None:
        """Restart the collector if there is something to watch (once the fork returned).

        Never waits for the lock (see the fork hub): whoever holds it starts the
        collector itself when it needs one (:meth:`write`, :meth:`release`).
        """
        if self._lock.acquire(blocking=False):
            try:
                if self._live or self._pool:
                    self._start_collector()
            finally:
                self._lock.release()

    def after_fork_in_child(self) -> None:
        """Forget the parent's blocks: a child must neither reuse nor unlink them."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._collector = None
        for entry in (*self._live.values(), *self._pool.values()):
            with contextlib.suppress(Exception):
                entry.handle.close()  # not the owner here (ownership does not fork): no unlink
        self._reset()

    def shutdown(self) -> None:
        """At exit: stop the collector and free the pool (live blocks die with the process)."""
        self._wake.set()
        with contextlib.suppress(Exception):
            self.empty_pool()


writer = Writer()
at_fork(
    ForkPhase.WRITER,
    before=writer.before_fork,
    after_in_child=writer.after_fork_in_child,
    resume_in_parent=writer.resume_after_fork,
)
_reaper.exit_hook.before_exit.append(writer.shutdown)
