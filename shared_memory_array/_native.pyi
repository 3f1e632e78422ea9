"""The accelerator's API (``_native.c``); the pure-Python twins are the reference (``_accel``)."""

from collections.abc import Callable
from typing import Final, Literal

STATUS_TABLE_FULL: Final[int]
STATUS_HEAP_FULL: Final[int]
STATUS_NO_EMPTY_SLOT: Final[int]
STATUS_CORRUPT: Final[int]
PTHREAD_MUTEX_BYTES: Final[int]

def heap_alloc(address: int, offset: int, size: int, nbytes: int, /) -> int: ...
def heap_free(address: int, offset: int, size: int, end_block: int, payload: int, /) -> int: ...
def heap_extend(address: int, offset: int, size: int, end_block: int, limit: int, /) -> int: ...
def mutex_init(address: int, /) -> None: ...
def mutex_lock(address: int, /) -> bool: ...
def mutex_consistent(address: int, /) -> None: ...
def mutex_unlock(address: int, /) -> None: ...
def futex_wait(address: int, expected: int, timeout: float | None, /) -> None: ...
def futex_wake(address: int, /) -> None: ...
def futex_add(address: int, delta: int, /) -> bool: ...
def kill_after_stores(count: int, /) -> None:
    """Tests only: SIGKILL this process at the ``count``-th shared word store from now."""

def open_held(
    path: str, writable: bool, header_bytes: int, /
) -> tuple[int, tuple[int | float, ...], bytes] | int: ...

class Core:
    """One mapped data block of a dict: its table and heap, and (bound) its dict's lock."""

    def __init__(
        self,
        pins: object,
        ctl: int,
        table0: int,
        table1: int,
        slots: int,
        hbuf: int,
        hbuf_len: int,
        max_items: int,
        fill_limit: int,
    ) -> None: ...
    def bind_lock(
        self,
        pins: object,
        mutex: int,
        generation_word: int,
        generation: int,
        notify: int,
        waiters: int,
        identity: Callable[[], tuple[int, int]],
        /,
    ) -> None: ...
    def probe(self, encoded: bytes, key_hash: int, /) -> tuple[int, int, int] | int: ...
    def entry_value(self, entry: int, /) -> tuple[int, int, int]: ...
    def put(
        self,
        encoded: bytes,
        key_hash: int,
        original: bytes,
        kind: int,
        data: bytes,
        journal: int,
        /,
    ) -> tuple[int, int] | int: ...
    def set_number(self, entry: int, kind: int, raw: bytes, /) -> bool: ...
    def unpublish(self, index: int, word: int, /) -> int: ...
    def get(
        self, encoded: bytes, key_hash: int, lock_free: bool, may_lock: bool, /
    ) -> tuple[int, int, bytes | None] | None: ...
    def store(
        self, encoded: bytes, key_hash: int, original: bytes, kind: int, data: bytes, /
    ) -> int | None: ...
    def remove(
        self, encoded: bytes, key_hash: int, want_value: bool, /
    ) -> tuple[int, int, bytes | None] | Literal[False] | None: ...
    def increment(
        self, encoded: bytes, key_hash: int, amount: int | float, /
    ) -> tuple[int, int | float] | None: ...
