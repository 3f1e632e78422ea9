"""Static typing checks of the public API: mypy (in CI) verifies each assert_type.

Not collected by pytest: these lines pin what users' type checkers infer, so a
change to an annotation that would break users' code fails ``mypy``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from numpy.typing import NDArray
from typing_extensions import assert_type

from shared_memory_array import (
    BlockInfo,
    CleanupResult,
    SharedArray,
    SharedData,
    SharedDict,
    SharedDictLock,
    SharedMemoryArray,
    ZeroCopyDict,
    cleanup,
    list_blocks,
    read,
    release,
    write,
)


def check_arrays(name: str) -> None:
    sa = SharedArray.allocate(None, (2, 3), "float32")
    assert_type(sa, SharedArray)
    assert_type(SharedMemoryArray.copy(None, np.zeros(3)), SharedArray)
    assert_type(SharedArray.attach(name), SharedArray)
    assert_type(SharedArray.attach_unsafe(name), SharedArray)
    assert_type(sa.as_array(), NDArray[Any])
    assert_type(sa.shape, tuple[int, ...])
    assert_type(sa.strides, tuple[int, ...])
    assert_type(sa.dtype, np.dtype[Any])
    assert_type(sa.nbytes, int)
    assert_type(sa.owner, bool)
    assert_type(sa.name, str)
    with sa.managed() as managed:
        assert_type(managed, SharedArray)
    with sa as entered:
        assert_type(entered, SharedArray)


def check_codec(obj: object) -> None:
    token = write(obj, threshold=10)
    assert_type(token, str)
    assert_type(read(token, readonly=False), object)
    assert_type(release(token), None)
    with SharedData(obj) as sd:
        assert_type(sd, SharedData)
        assert_type(sd.name, str)
        assert_type(sd.size, int)
    assert_type(SharedData.load("x"), object)


def check_dict() -> None:
    d = SharedDict.create("typing", max_items=10)
    assert_type(d, SharedDict)
    assert ZeroCopyDict is SharedDict
    mapping: MutableMapping[Any, Any] = d
    lock: AbstractContextManager[Any] = d.lock()
    assert_type(d.stats(), dict[str, Any])
    assert_type(d.lock(), SharedDictLock)
    assert_type(d.gc_stats(), dict[str, int | float])
    del mapping, lock


def check_registry() -> None:
    assert_type(list_blocks(), list[BlockInfo])
    result = cleanup(dry_run=True)
    assert_type(result, CleanupResult)
    assert_type(result.cleaned, list[str])
    assert_type(result.failed, list[str])
    assert_type(result.skipped, list[str])
    for info in list_blocks():
        assert_type(info.name, str)
        assert_type(info.creator_alive, bool | None)  # None: header unreadable
