"""Waiting for shared state to change: a generation word every process can bump and wait on.

Every block of format v3 has, in its lifetime area (:mod:`._lifetime`), a 32-bit
``notify`` word and a 32-bit ``waiters`` word. :class:`Signal` is their use:
``SharedArray.notify``/``wait`` bump and wait on an array block's word,
``SharedDict.wait_for`` waits on the dict's entry block's word, which every
change of the dict bumps while anyone waits (just after the dict's lock is
released: a waiter woken while it is held would sleep again on it at once).

No lost wake-up
---------------
A waiter reads the generation, checks its condition, then sleeps *on the value
it read*: where the platform has futexes (Linux) ``FUTEX_WAIT`` compares the
word and sleeps in one step, so a bump in between makes it return at once. A
bump is ``FUTEX_WAKE_OP``: the kernel adds 1 and wakes every sleeper in one
system call (atomic with any other process's bump). A waiter killed while it
sleeps holds nothing: nobody else notices.

Where there is no futex (the portable backend), a waiter polls the word with a
bounded back-off: from :data:`MIN_POLL_INTERVAL` doubling to
:data:`MAX_POLL_INTERVAL`, so a change is seen within 10 ms at worst; a bump
takes the block's COUNTER lock for its read-modify-write.

asyncio
-------
:meth:`Signal.wait_async` sleeps in a short-lived thread of its own (never the
event loop's, never a pool's), which ends with the wait: a cancelled wait
wakes it (or it notices within :data:`ASYNC_SLICE`), so no library thread is
left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from ctypes import addressof, c_char
from typing import Final

from ._lifetime import CounterLock
from ._platform import BlockLocks, backend
from .errors import ClosedError

__all__ = ["ASYNC_SLICE", "MAX_POLL_INTERVAL", "MIN_POLL_INTERVAL", "Signal", "deadline_of"]

MIN_POLL_INTERVAL: Final = 1e-4
MAX_POLL_INTERVAL: Final = 0.01
ASYNC_SLICE: Final = 0.5
"""Longest sleep of an asyncio waiter's thread between looks at its cancellation."""


def deadline_of(timeout: float | None) -> float | None:
    """The monotonic deadline of a timeout in seconds (``None``: no deadline)."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class Signal:
    """The ``notify`` and ``waiters`` words of one block, and waiting on them.

    Parameters
    ----------
    view
        A writable *shared* view of the block (its lifetime area included).
    notify_offset, waiters_offset
        Where the two 32-bit words are in ``view``.
    locks
        The block's locks (COUNTER serialises bumps where there is no futex).
    """

    __slots__ = ("_address", "_locks", "_notify", "_waiters", "_waiters_address")

    def __init__(
        self, view: memoryview, notify_offset: int, waiters_offset: int, locks: BlockLocks
    ) -> None:
        self._notify = view[notify_offset : notify_offset + 4].cast("I")
        self._waiters = view[waiters_offset : waiters_offset + 4].cast("I")
        base = addressof(c_char.from_buffer(view))
        self._address = base + notify_offset
        self._waiters_address = base + waiters_offset
        self._locks = locks

    @property
    def notify_address(self) -> int:
        """The address of the ``notify`` word (valid while the caller keeps the block mapped)."""
        return self._address

    @property
    def waiters_address(self) -> int:
        """The address of the ``waiters`` word (as :attr:`notify_address`)."""
        return self._waiters_address

    def release(self) -> None:
        """Drop the views (so the block can be unmapped)."""
        self._notify.release()
        self._waiters.release()

    def load(self) -> int:
        """The generation now (ClosedError once the handle let go of the block)."""
        try:
            return int(self._notify[0])
        except ValueError:  # released: another thread closed the handle meanwhile
            raise ClosedError("the handle was closed while it was notifying or waiting") from None

    def waiters(self) -> int:
        """How many waiters have said they wait (a hint: 0 means nobody to wake)."""
        return int(self._waiters[0])

    def bump(self) -> int:
        """Add 1 to the generation and wake every waiter; return the new generation.

        One atomic kernel operation where there are futexes; elsewhere a
        read-modify-write under COUNTER.
        """
        if not backend.futex_add(self._address, 1):
            with CounterLock(self._locks):
                self._notify[0] = (self._notify[0] + 1) & 0xFFFFFFFF
        return self.load()

    def add_waiter(self, delta: int) -> None:
        """Count a waiter in (``+1``) or out (``-1``): atomic, or under COUNTER."""
        if not backend.futex_add(self._waiters_address, delta):
            with CounterLock(self._locks):
                self._waiters[0] = max(0, self._waiters[0] + delta) & 0xFFFFFFFF

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count the caller among the waiters for the duration of the ``with``."""
        self.add_waiter(1)
        try:
            yield
        finally:
            self.add_waiter(-1)

    def wait(self, expected: int, deadline: float | None) -> int:
        """Sleep until the generation is not ``expected`` or the deadline passes; return it."""
        delay = MIN_POLL_INTERVAL
        while True:
            current = self.load()
            if current != expected:
                return current
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                return current
            if backend.has_futex:
                backend.futex_wait(self._address, expected, remaining)
            else:
                time.sleep(delay if remaining is None else min(delay, remaining))
                delay = min(2 * delay, MAX_POLL_INTERVAL)

    def wake(self) -> None:
        """Wake every sleeper without a new generation (they look again, and sleep again)."""
        if backend.has_futex:
            backend.futex_wake(self._address)

    async def wait_async(self, expected: int, deadline: float | None) -> int:
        """:meth:`wait` without blocking the event loop (a thread of its own sleeps)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        stop = threading.Event()

        def settle(result: int | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result if result is not None else expected)

        def run() -> None:
            result: int | None = None
            error: BaseException | None = None
            try:
                while not stop.is_set():
                    remaining = _remaining(deadline)
                    slice_end = time.monotonic() + ASYNC_SLICE
                    if remaining is not None:
                        slice_end = min(slice_end, time.monotonic() + remaining)
                    result = self.wait(expected, slice_end)
                    if result != expected or (remaining is not None and remaining <= ASYNC_SLICE):
                        break
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, result, error)

        thread = threading.Thread(target=run, name="shared_memory_array-wait", daemon=True)
        thread.start()
        try:
            return await future
        finally:
            stop.set()
            self.wake()
