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
    ClosedError,
    ManagedSharedMemoryArray,
    SharedArray,
    SharedData,
    SharedDict,
    SharedDictLock,
    SharedMemoryArray,
    Token,
    ZeroCopyDict,
    cleanup,
    list_blocks,
    read,
    release,
    write,
)


def check_arrays(name: str) -> None:
    sa = SharedArray.allocate(None, (2, 3), "float32")
    assert_type(sa, SharedArray[Any])  # a dtype string: the scalar type is not known
    assert_type(SharedMemoryArray.copy(None, np.zeros(3)), SharedArray[np.float64])
    assert_type(SharedArray.attach(name), SharedArray[Any])
    assert_type(SharedArray.attach(name, (3,), np.float32), SharedArray[np.float32])
    assert_type(SharedArray.attach_unsafe(name), SharedArray[Any])
    assert_type(sa.as_array(), NDArray[Any])
    assert_type(sa.shape, tuple[int, ...])
    assert_type(sa.strides, tuple[int, ...])
    assert_type(sa.dtype, np.dtype[Any])
    assert_type(sa.nbytes, int)
    assert_type(sa.owner, bool)
    assert_type(sa.name, str)
    with sa.managed() as managed:
        assert_type(managed, SharedArray[Any])
    with sa as entered:
        assert_type(entered, SharedArray[Any])
    sa.close()


def check_array_generics(x32: NDArray[np.float32], xi8: NDArray[np.int8]) -> None:
    # copy / allocate_like keep the source's scalar type, with the manager or without it
    s32 = SharedArray.copy(x32)
    assert_type(s32, SharedArray[np.float32])
    assert_type(SharedArray.copy(None, x32), SharedArray[np.float32])
    assert_type(SharedArray.copy_unsafe(x32), SharedArray[np.float32])
    assert_type(SharedArray.copy([1, 2, 3]), SharedArray[Any])  # any array-like
    assert_type(SharedArray.copy(s32), SharedArray[np.float32])  # a SharedArray is one
    assert_type(SharedArray.allocate_like(xi8), SharedArray[np.int8])
    assert_type(SharedArray.allocate_like(None, xi8), SharedArray[np.int8])
    assert_type(SharedArray.allocate_like_unsafe(xi8), SharedArray[np.int8])
    # allocate: a scalar type or a dtype object types the result; a string does not
    assert_type(SharedArray.allocate((10, 10), np.float32), SharedArray[np.float32])
    assert_type(SharedArray.allocate(shape=(10, 10), dtype=np.int8), SharedArray[np.int8])
    assert_type(SharedArray.allocate(None, 4, np.dtype(np.int8)), SharedArray[np.int8])
    assert_type(SharedArray.allocate((10, 10)), SharedArray[np.float64])  # numpy's default
    assert_type(SharedArray.allocate((10, 10), "f8"), SharedArray[Any])
    assert_type(SharedArray.allocate_unsafe((10,), np.float32), SharedArray[np.float32])
    # the view and the numpy protocol carry the scalar type
    assert_type(s32.as_array(), NDArray[np.float32])
    assert_type(np.asarray(s32), NDArray[np.float32])
    assert_type(s32.dtype, np.dtype[np.float32])
    assert_type(len(s32), int)
    s32[0] = 1.0
    wide: SharedArray[np.floating[Any]] = s32  # covariant, like ndarray
    # a mismatch is caught (the ignore would be reported unused if it were not an error)
    wrong: NDArray[np.float64] = s32.as_array()  # type: ignore[assignment]
    wrong_handle: SharedArray[np.int8] = s32  # type: ignore[assignment]
    # managed() forwards the handle's type
    managed = s32.managed()
    assert_type(managed, ManagedSharedMemoryArray[np.float32])
    with managed as inner:
        assert_type(inner, SharedArray[np.float32])
        assert_type(inner.as_array(), NDArray[np.float32])
    del wide, wrong, wrong_handle


def check_ndarray_like(x32: NDArray[np.float32]) -> None:
    # (v3) the handle behaves like its view: copy on the class builds, on an instance copies
    s32 = SharedArray.copy(x32)
    assert_type(SharedArray.copy(x32), SharedArray[np.float32])
    assert_type(s32.copy(), NDArray[np.float32])
    assert_type(s32.copy(order="F"), NDArray[np.float32])
    s32.copy(x32)  # type: ignore[arg-type]  # an instance's copy() takes no array
    # ndarray attributes and methods: typed where the scalar type carries, Any otherwise
    assert_type(s32.T, NDArray[np.float32])
    assert_type(s32.reshape(3, 2), NDArray[np.float32])
    assert_type(s32.ravel(), NDArray[np.float32])
    assert_type(s32.astype(np.int8), NDArray[Any])
    assert_type(s32.itemsize, int)
    assert_type(s32.ndim, int)
    assert_type(s32.size, int)
    assert_type(s32.sum(), Any)
    assert_type(s32.mean(axis=0), Any)
    assert_type(s32.tolist(), Any)
    s32.no_such_method()  # type: ignore[attr-defined]  # typos are still caught
    # operators (element-wise, comparisons too), in place, conversions
    assert_type(s32 + 1, Any)
    assert_type(2 * s32, Any)
    assert_type(s32 @ s32, Any)
    assert_type(s32 == s32, Any)
    assert_type(s32 < 1, Any)
    s32 += 1
    assert_type(s32, SharedArray[np.float32])
    assert_type(bool(s32), bool)
    assert_type(float(s32), float)
    # numpy functions take the handle; np.asarray keeps the scalar type
    assert_type(np.asarray(s32), NDArray[np.float32])
    np.sqrt(s32)
    np.concatenate([s32, s32])
    # shared-memory-array's sa.shm
    assert_type(s32.shm.name, str)
    assert_type(s32.shm.size, int)
    assert_type(s32.shm.buf, memoryview)
    # the managed wrapper forwards all of it
    managed = s32.managed()
    assert_type(managed.T, NDArray[np.float32])
    assert_type(managed + 1, Any)
    assert_type(managed.sum(), Any)


def check_errors() -> None:
    assert_type(ClosedError("closed"), ClosedError)
    closed: ValueError = ClosedError("a ValueError too")
    del closed


def check_codec(obj: object, weights: dict[str, NDArray[np.float32]]) -> None:
    token = write(obj, threshold=10)
    assert_type(token, Token[object])
    assert_type(read(token, readonly=False), object)
    assert_type(release(token), None)
    typed = write(weights)
    assert_type(typed, Token[dict[str, NDArray[np.float32]]])
    assert_type(read(typed), dict[str, NDArray[np.float32]])
    assert_type(read(typed)["a"], NDArray[np.float32])
    plain: str = typed  # a Token is a str
    assert_type(read(plain), Any)  # a plain str: the type is not known
    with SharedData(obj) as sd:
        assert_type(sd, SharedData)
        assert_type(sd.name, str)
        assert_type(sd.size, int)
    assert_type(SharedData.load("x"), Any)


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
