"""Functions run in child processes by the lifetime tests (importable under spawn)."""

from __future__ import annotations

import os
import signal
import sys
import time
from multiprocessing.queues import Queue
from typing import Any

import numpy as np

from shared_memory_array import SharedArray, read, release, write


def make_array(index: int) -> SharedArray:
    """A worker's result: allocate a SharedArray, fill it with ``index``, return it."""
    result = SharedArray.allocate(None, (256,), "f8")
    result.as_array()[:] = index
    return result


def own_and_wait(queue: Queue[Any]) -> None:
    """Create an array, report its name, then wait until killed (the owner of the tests)."""
    owned = SharedArray.copy(None, np.arange(1000, dtype=np.int64))
    queue.put(owned.name)
    time.sleep(120)  # killed long before
    owned.close()


def write_tokens_and_wait(queue: Queue[Any], count: int, nbytes: int) -> None:
    """Write ``count`` tokens of ``nbytes`` each, send them, and stay alive as their writer."""
    tokens = [write(np.full(nbytes // 8, i, dtype=np.int64), threshold=0) for i in range(count)]
    queue.put(tokens)
    time.sleep(120)  # terminated by the test


def write_token(index: int) -> str:
    """A Pool task: write a 64 KiB array, return its token."""
    return write(np.full(8192, index, dtype=np.int64), threshold=0)


def pool_script() -> None:  # pragma: no cover - run as a script by the tests
    """``with Pool()`` three times, tokens read and released inside; print every block name."""
    from multiprocessing import get_context

    names = []
    for _ in range(3):
        with get_context("spawn").Pool(2) as pool:
            tokens = pool.map(write_token, range(6))
            for index, token in enumerate(tokens):
                assert int(np.asarray(read(token))[0]) == index
                release(token)
                names.append(token.split(":")[2])
    print(" ".join(names))


def pickle_and_exit(path: str) -> None:  # pragma: no cover - run as a script by the tests
    """Create an array, pickle its handle to ``path`` (a handle in flight), exit at once."""
    import pickle

    owner = SharedArray.copy(None, np.arange(10))
    with open(path, "wb") as out:
        pickle.dump(owner, out)
    print(owner.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1] == "pool":
        pool_script()
    else:
        pickle_and_exit(sys.argv[2])


def dict_owner_and_wait(queue: Queue[Any], name: str) -> None:
    """Create a dict, put a value in, report, then wait until killed."""
    from shared_memory_array import SharedDict

    owned = SharedDict.create(name, max_items=16, heap_size=1 << 16)
    owned["answer"] = 42
    queue.put(name)
    time.sleep(120)
    owned.close()
