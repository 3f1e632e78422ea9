"""Functions run in child processes by test_reliability (importable under spawn)."""

from __future__ import annotations

import pickle
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from shared_memory_array import SharedArray, SharedArrayError


def _use(handle: SharedArray) -> float | str:
    """The sum of the handle's data, or the name of the error its first use raised."""
    try:
        return float(handle.as_array().sum())
    except SharedArrayError as exc:
        return type(exc).__name__


def sum_of(handle: SharedArray, queue: Queue[Any]) -> None:
    """A spawn child's target: the handle arrives while the child bootstraps."""
    queue.put(_use(handle))


def sum_after(payload: bytes, queue: Queue[Any], gate: Event) -> None:
    """Unpickle ``payload`` once ``gate`` is set, then report its first use."""
    gate.wait(60)
    queue.put(_use(pickle.loads(payload)))


def owns(name: str) -> bool:
    """A worker task: whether a handle attached here reports owning block ``name``."""
    with SharedArray.attach(name) as handle:
        return handle.owner
