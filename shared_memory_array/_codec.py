"""The pickle-5 codec: any picklable object across processes, numpy arrays zero-copy.

:func:`write` pickles an object once, with protocol 5 and a ``buffer_callback``,
so the data of numpy arrays (and of any :class:`pickle.PickleBuffer`) comes out
*out of band*, beside the pickle stream instead of inside it. Small results
travel inline in the token; large ones go into one shared-memory block, and
:func:`read` hands the out-of-band buffers to :func:`pickle.loads` as slices of
its mapping of that block, so arrays come back as views on shared memory.

Tokens
------
ASCII strings, ``SMA1:<mode>:<payload>``:

* ``SMA1:s:<block name>:<generation, hex>`` -- shared; printable, under 50 characters.
* ``SMA1:i:<hex>`` -- inline pickle stream without out-of-band buffers.
* ``SMA1:f:<hex>`` -- inline *frame*: buffer table, stream and buffers (below).

Inline payloads are hex, not base64: the token must be ASCII, and encoding plus
decoding a 10 KB pickle takes ~15 µs with ``binascii.hexlify``/``unhexlify``
on CPython 3.10, 3.11 and 3.13, against 27 µs (3.10) to 40 µs (3.11, 3.13)
with ``b2a_base64``/``a2b_base64``; numpy- and ``bytes.translate``-based
encodings measured no faster. Hex is twice the input's size (base64 4/3), which
only matters below ``threshold``. That ~1.5 ns per byte is why a 10 KB inline
round trip costs ~23 µs against ~0.8 µs for ``pickle.loads(pickle.dumps(obj))``:
an ASCII token cannot carry raw bytes.

Payload layout
--------------
A *buffer table* lists ``count`` (``<I``) followed by ``count + 1`` spans
(``<QQ`` offset, length): the pickle stream first, then each out-of-band buffer.
In a block the table is the header's ``extra`` and offsets count from the
payload start (``data_offset``); in an inline frame the table starts the frame
and offsets count from the frame start. Payload of a block::

    data_offset + 0    state word, 8 bytes: b"live\\0\\0\\0\\0" or b"released"
    data_offset + 64   pickle stream
    ...                each buffer, 64-byte aligned (16 in an inline frame)

Reading validates the table before touching anything (count at most
:data:`MAX_BUFFERS`, every span inside the payload and clear of the state word)
and raises :class:`~shared_memory_array.LayoutError` quoting the bad value.

What comes back as a view
-------------------------
numpy arrays (every layout and dtype except arrays of Python objects;
non-contiguous ones are made contiguous while pickling, so they come back
C-contiguous) and ``PickleBuffer`` objects (as a flat ``memoryview`` of their
bytes) are views on the block, read-only unless
``readonly=False``; the read-only mapping (``PROT_READ``) means
``arr.setflags(write=True)`` fails. Everything else -- ``bytes``, ``bytearray``
and ``str`` included -- is rebuilt by pickle, which copies it: CPython's pickler
always writes those in band. Their payloads are still copied only once on each
side: large ones reach the block straight from the object, without an
intermediate pickle string. Arrays of Python objects and ``ndarray`` subclasses
are pickled as numpy pickles them. Beyond :data:`MAX_BUFFERS` buffers, the rest
travel in band (as copies). Arrays are reduced by this module (to
``_rebuild_array``, a ``numpy.frombuffer`` view), not by numpy, which would
copy non-contiguous and datetime arrays in band.

Lifetime and reuse (steady state at memory speed)
-------------------------------------------------
First-touching fresh shared memory costs far more than copying into it, so a
process that writes repeatedly reuses the memory of its own released blocks:

* Every reader maps the block through its own open file, takes
  ``flock(LOCK_SH)`` on it and lets the mapping keep that descriptor
  (``pin_fd``): the shared lock lives exactly as long as any view of the block
  in that process, and the kernel drops it if the process dies.
* ``release(token)`` -- from any process -- checks the generation and sets the
  state word to ``released`` under a shared lock. Nothing else changes the
  payload of a live block.
* The writer keeps its own mapping and descriptor of each block it wrote. At
  its next write it moves released ones to a small pool (at most
  :data:`POOL_MAX_BLOCKS` blocks and :data:`POOL_MAX_BYTES` bytes: 2 GiB, or an
  eighth of /dev/shm if smaller; the rest are unlinked), and reuses one that is
  big enough, but at most twice too big, only after
  ``flock(LOCK_EX | LOCK_NB)`` succeeds on it: proof that no process maps it
  any more. It rewrites payload and header, with the generation bumped, under
  that lock. A reader holding an old token either fails to take its shared
  lock (rewrite in progress) or sees another generation: it raises
  :class:`~shared_memory_array.BlockNotFoundError`, never returns another
  object's bytes. A live view is never overwritten.
* New blocks are reserved with ``posix_fallocate`` and filled with ``pwrite``
  (pieces of 1 MiB and more), so a one-shot write never faults the pages into
  the writer's mapping: measured here for 1 GB, 0.52 s against 0.83 s for
  ``MAP_POPULATE`` + copy and 0.79 s for copying through a plain mapping. The
  first *reuse* of a block faults the writer's mapping in once (about what
  ``MAP_POPULATE`` would have cost at creation); every later reuse copies into
  mapped pages at memcpy speed (77 ms/GB here, against 172 ms for ``pwrite``).
* Without ``release`` a block lives until its writer exits (the block layer
  unlinks what a process created at interpreter exit; in multiprocessing
  children, which skip ``atexit``, a multiprocessing finalizer does it), never
  shorter because a reader exited. A writer killed by a signal (including
  workers of a ``Pool`` ended by ``terminate()``, as ``with Pool()`` does)
  leaves its blocks to ``cleanup()``.
* A released block is pooled or unlinked at once when the writer itself
  releases it, otherwise at the writer's next :func:`write` or at its exit.
  The writer keeps at most :data:`MAX_MAPPED_LIVE` unreleased blocks mapped
  (each holds a descriptor); older ones are unlinked only when the writer
  itself releases them, or exits.

Security: reading a token unpickles data, which can run code, exactly like
:func:`pickle.loads`. Blocks are created with mode 0600, so only the same user
can have written them; accept tokens only from processes you trust.
"""

from __future__ import annotations

import binascii
import mmap
import os
import pickle
import re
import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, overload

import numpy as np

from ._block import GENERATED_NAME_PATTERN, PREFIX, SharedBlock, pwrite_all
from ._header import FIXED_SIZE, BlockKind, Header, align, encode_header, parse_header
from ._token import Token
from .errors import BlockNotFoundError, LayoutError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so no reuse
    _HAVE_FLOCK = False
else:
    _HAVE_FLOCK = True

__all__ = ["read", "release", "write"]

TOKEN_PREFIX: Final = "SMA1:"
MAX_BUFFERS: Final = 50_000
POOL_MAX_BLOCKS: Final = 8


def _default_pool_bytes(shm_dir: str = "/dev/shm") -> int:
    """2 GiB, or an eighth of /dev/shm where that is smaller (containers often give 64 MB)."""
    try:
        fs = os.statvfs(shm_dir)
    except (OSError, AttributeError):  # no /dev/shm (macOS), no statvfs (Windows)
        return 2 << 30
    return min(2 << 30, fs.f_blocks * fs.f_frsize // 8)


POOL_MAX_BYTES: Final = _default_pool_bytes()
MAX_MAPPED_LIVE: Final = 64

_MODE_SHARED: Final = "s"
_MODE_INLINE: Final = "i"
_MODE_FRAME: Final = "f"
_SHARED_TOKEN: Final = re.compile(
    re.escape(TOKEN_PREFIX + _MODE_SHARED + ":") + f"({GENERATED_NAME_PATTERN}):([0-9a-f]{{1,16}})"
)
_BLOCK_ALIGNMENT: Final = 64
_FRAME_ALIGNMENT: Final = 16
_STATE_SIZE: Final = 64  # the state word, padded so the stream starts aligned
_LIVE: Final = b"live\0\0\0\0"
_RELEASED: Final = b"released"
_COUNT: Final = struct.Struct("<I")
_MAX_REUSE_WASTE: Final = 2  # reuse a pooled block at most this many times too big
_PWRITE_MIN: Final = 1 << 20  # smaller pieces are copied through the mapping
_HAVE_PWRITE = hasattr(os, "pwrite")


# -- pickling ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pickled:
    """One object pickled with protocol 5: the stream in pieces plus out-of-band buffers."""

    chunks: list[bytes | bytearray]
    buffers: list[memoryview]  # each C-contiguous, format "B"

    @property
    def stream_len(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def nbytes(self) -> int:
        return self.stream_len + sum(buffer.nbytes for buffer in self.buffers)


class _Sink:
    """A write-only file for the pickler; ``write`` is the list's ``append``."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[bytes | bytearray], object]) -> None:
        self.write = write


def _rebuild_array(
    buffer: memoryview, dtype: np.dtype[Any], shape: tuple[int, ...], fortran_order: bool
) -> np.ndarray[Any, Any]:
    """Unpickle an array as a view on its out-of-band ``buffer`` (the reader's mapping)."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # numpy's own reduce pickles non-contiguous and datetime arrays in band
        # (copies, rebuilt writable; datetimes lose their byte order): every
        # plain array goes out of band here, made contiguous first if needed.
        if type(obj) is not np.ndarray or obj.dtype.hasobject or obj.dtype.itemsize == 0:
            return NotImplemented
        fortran_order = obj.flags.f_contiguous and not obj.flags.c_contiguous
        if not (fortran_order or obj.flags.c_contiguous):
            obj = np.ascontiguousarray(obj)
        # As bytes: not every dtype (datetimes, some structs) can export a buffer itself.
        data = pickle.PickleBuffer(obj.ravel(order="K").view(np.uint8))
        return _rebuild_array, (data, obj.dtype, obj.shape, fortran_order)


def pickle_out_of_band(obj: object) -> _Pickled:
    """Pickle ``obj`` once with protocol 5, keeping up to :data:`MAX_BUFFERS` buffers apart.

    Large ``bytes``/``bytearray``/``str`` payloads arrive as their own chunks
    (the pickler hands them to ``write`` without copying them).
    """
    chunks: list[bytes | bytearray] = []
    buffers: list[memoryview] = []

    def keep_out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if len(buffers) >= MAX_BUFFERS:
            return True  # in band
        buffers.append(buffer.raw())
        return False

    _Pickler(_Sink(chunks.append), protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    return _Pickled(chunks, buffers)


# -- the buffer table ----------------------------------------------------------------


def _place(pickled: _Pickled, start: int, alignment: int) -> tuple[list[tuple[int, int]], int]:
    """Return the ``(offset, length)`` spans of stream and buffers, and the end offset."""
    spans = []
    position = start
    for length in (pickled.stream_len, *(buffer.nbytes for buffer in pickled.buffers)):
        position = align(position, alignment)
        spans.append((position, length))
        position += length
    return spans, position


def _table_size(buffer_count: int) -> int:
    return _COUNT.size + 16 * (buffer_count + 1)


def _encode_table(spans: list[tuple[int, int]]) -> bytes:
    flat = [value for span in spans for value in span]
    return _COUNT.pack(len(spans) - 1) + struct.pack(f"<{len(flat)}Q", *flat)


def _decode_table(
    table: bytes | bytearray, payload_size: int, reserved: int, where: str, *, exact: bool
) -> list[tuple[int, int]]:
    """Validate and decode a buffer table; every span must lie in ``[reserved, payload_size)``.

    ``exact``: the table must fill ``table`` (a header's ``extra``), not just start it.
    """
    if len(table) < _COUNT.size:
        raise LayoutError(f"{where}: buffer table of {len(table)} bytes is too short")
    (count,) = _COUNT.unpack_from(table)
    if count > MAX_BUFFERS:
        raise LayoutError(f"{where}: buffer count {count} exceeds the limit of {MAX_BUFFERS}")
    if len(table) < _table_size(count) or (exact and len(table) != _table_size(count)):
        raise LayoutError(
            f"{where}: buffer table of {len(table)} bytes does not match its count of "
            f"{count} buffers ({_table_size(count)} bytes)"
        )
    values = struct.unpack_from(f"<{2 * (count + 1)}Q", table, _COUNT.size)
    spans = list(zip(values[::2], values[1::2], strict=True))
    for index, (offset, length) in enumerate(spans):
        if offset < reserved or offset + length > payload_size:
            what = "pickle stream" if index == 0 else f"buffer {index - 1}"
            raise LayoutError(
                f"{where}: {what} at offset {offset} with {length} bytes lies outside "
                f"bytes {reserved}..{payload_size} of the payload"
            )
    return spans


def _fill(
    region: memoryview,
    pickled: _Pickled,
    spans: list[tuple[int, int]],
    *,
    fd: int = -1,
    fd_offset: int = 0,
) -> None:
    """Copy stream and buffers into ``region`` at ``spans`` (the only copy of the data).

    With a descriptor ``fd`` of the file behind ``region`` (whose byte
    ``fd_offset`` is ``region[0]``), large pieces go in by ``pwrite`` instead:
    into pages this process has not mapped yet that skips a page fault per page.
    """
    pieces: list[tuple[int, bytes | bytearray | memoryview]] = []
    position = spans[0][0]
    for chunk in pickled.chunks:
        pieces.append((position, chunk))
        position += len(chunk)
    for (offset, _), buffer in zip(spans[1:], pickled.buffers, strict=True):
        pieces.append((offset, buffer))
    for offset, piece in pieces:
        if fd >= 0 and _HAVE_PWRITE and len(piece) >= _PWRITE_MIN:
            pwrite_all(fd, memoryview(piece), fd_offset + offset)
        else:
            region[offset : offset + len(piece)] = piece


def _unpickle(payload: memoryview, spans: list[tuple[int, int]], where: str) -> object:
    """Rebuild the object from ``payload``; out-of-band buffers are slices of it (no copy)."""
    stream_offset, stream_len = spans[0]
    buffers = [payload[offset : offset + length] for offset, length in spans[1:]]
    try:
        return pickle.loads(payload[stream_offset : stream_offset + stream_len], buffers=buffers)
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise LayoutError(f"{where}: cannot unpickle the stored object: {exc}") from exc


# -- inline tokens -------------------------------------------------------------------


def _inline_token(pickled: _Pickled) -> str:
    if not pickled.buffers:
        stream = pickled.chunks[0] if len(pickled.chunks) == 1 else b"".join(pickled.chunks)
        return f"{TOKEN_PREFIX}{_MODE_INLINE}:{binascii.hexlify(stream).decode('ascii')}"
    spans, end = _place(pickled, _table_size(len(pickled.buffers)), _FRAME_ALIGNMENT)
    frame = bytearray(end)
    table = _encode_table(spans)
    frame[: len(table)] = table
    _fill(memoryview(frame), pickled, spans)
    return f"{TOKEN_PREFIX}{_MODE_FRAME}:{binascii.hexlify(frame).decode('ascii')}"


def _read_inline(mode: str, payload: str, readonly: bool) -> object:
    where = "inline token"
    try:
        data: bytes | bytearray = binascii.unhexlify(payload)
    except ValueError as exc:  # binascii.Error, or a non-ASCII str
        raise LayoutError(f"malformed inline token: {exc}") from None
    if mode == _MODE_INLINE:
        return _unpickle(memoryview(data), [(0, len(data))], where)
    if not readonly:
        data = bytearray(data)  # writable buffers for the arrays
    count = _COUNT.unpack_from(data)[0] if len(data) >= _COUNT.size else 0
    spans = _decode_table(data, len(data), _table_size(count), where, exact=False)
    return _unpickle(memoryview(data), spans, where)


# -- shared blocks -------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where everything goes in a codec block."""

    spans: list[tuple[int, int]]
    extra: bytes
    header_size: int
    payload_size: int

    @property
    def block_size(self) -> int:
        return self.header_size + self.payload_size


def _plan(pickled: _Pickled) -> _Layout:
    spans, payload_size = _place(pickled, _STATE_SIZE, _BLOCK_ALIGNMENT)
    extra = _encode_table(spans)
    return _Layout(spans, extra, align(FIXED_SIZE + len(extra)), payload_size)


def _store(
    block: SharedBlock, pickled: _Pickled, layout: _Layout, generation: int, *, fd: int = -1
) -> None:
    """Write payload, header and the ``live`` state word into ``block`` (``fd``: see _fill)."""
    header = encode_header(
        BlockKind.CODEC, nbytes=layout.payload_size, generation=generation, extra=layout.extra
    )
    buf = block.buf
    region = buf[len(header) : len(header) + layout.payload_size]
    _fill(region, pickled, layout.spans, fd=fd, fd_offset=len(header))
    buf[: len(header)] = header
    region[: len(_LIVE)] = _LIVE


def create_block(pickled: _Pickled, *, keep_fd: bool = False) -> SharedBlock:
    """Create a new codec block holding ``pickled`` (generation 0).

    The data goes in with ``pwrite`` into the pages ``posix_fallocate`` reserved,
    so this process never faults them into its mapping (measured on the
    reference machine, 1 GB: 0.52 s, against 0.83 s with ``MAP_POPULATE`` and a
    copy through the mapping). The caller owns the block (it is unlinked at exit
    unless unlinked before).

    Raises
    ------
    AllocationError
        Shared memory is full.
    """
    layout = _plan(pickled)
    size = align(layout.block_size, mmap.PAGESIZE)
    block = SharedBlock.create(size, keep_fd=True)
    try:
        _store(block, pickled, layout, 0, fd=block.fileno())
        if not keep_fd:
            block.close_fd()
    except BaseException:
        block.close()
        block.unlink()
        raise
    return block


def _state(buf: memoryview, header: Header) -> bytes:
    return bytes(buf[header.data_offset : header.data_offset + len(_LIVE)])


def _try_flock(fd: int, *, exclusive: bool) -> bool:
    """Take a shared or exclusive ``flock`` without waiting; ``False`` if another holds it."""
    if not _HAVE_FLOCK:  # pragma: no cover - Windows: readers proceed, writers never reuse
        return not exclusive
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _released_error(name: str, generation: int | None) -> BlockNotFoundError:
    which = "the object" if generation is None else f"the object of generation {generation}"
    return BlockNotFoundError(
        name, f"{which} in shared-memory block {name!r} was released (read after release)"
    )


def _open_locked(
    name: str, generation: int | None, *, readonly: bool
) -> tuple[SharedBlock, Header]:
    """Map block ``name`` with a shared lock pinned to the mapping; check its header and state.

    Raises
    ------
    BlockNotFoundError
        The block is gone, or its object (of ``generation``, when given) was released.
    LayoutError
        The block's header or state word is invalid.
    """
    block = SharedBlock.attach(name, readonly=readonly, keep_fd=True, pin_fd=True)
    try:
        if not _try_flock(block.fileno(), exclusive=False):
            # Only the writer takes the exclusive lock, and only to reuse a released block.
            raise _released_error(name, generation)
        block.close_fd()  # the mapping's own descriptor keeps the lock
        header = parse_header(block.buf, expected_kind=BlockKind.CODEC, name=name)
        if generation is not None and header.generation != generation:
            raise _released_error(name, generation)
        if header.nbytes < _STATE_SIZE:
            raise LayoutError(
                f"block {name!r}: codec payload of {header.nbytes} bytes is shorter than "
                f"its {_STATE_SIZE}-byte state area"
            )
        state = _state(block.buf, header)
        if state == _RELEASED:
            raise _released_error(name, generation)
        if state != _LIVE:
            raise LayoutError(f"block {name!r}: unknown codec state word {state!r}")
    except BaseException:
        block.close()
        raise
    return block, header


def read_block(name: str, *, generation: int | None = None, readonly: bool = True) -> object:
    """Rebuild the object in codec block ``name``; arrays are views on the block.

    ``generation`` is checked when given (tokens carry it; ``SharedData`` does not).

    Raises
    ------
    BlockNotFoundError
        The block is gone, or its object was released.
    LayoutError
        The block is not a valid codec block.
    """
    block, header = _open_locked(name, generation, readonly=readonly)
    try:
        where = f"block {name!r}"
        spans = _decode_table(header.extra, header.nbytes, _STATE_SIZE, where, exact=True)
        payload = block.buf[header.data_offset : header.data_offset + header.nbytes]
        return _unpickle(payload, spans, where)
    finally:
        # Unmapped (and unlocked) now if the object holds no view; else with its last view.
        block.close()


def _release_foreign(name: str, generation: int) -> None:
    """Mark generation ``generation`` of block ``name`` released (a block of another process)."""
    try:
        block, header = _open_locked(name, generation, readonly=False)
    except BlockNotFoundError:
        return  # gone, released or reused: nothing left to do
    try:
        block.buf[header.data_offset : header.data_offset + len(_RELEASED)] = _RELEASED
    finally:
        block.close()


# -- this process's blocks -----------------------------------------------------------


@dataclass
class _Written:
    """A block this process wrote: its handle (mapping, and a descriptor for flock) and state.

    Unmapped entries (beyond :data:`MAX_MAPPED_LIVE`) keep a closed handle, which still unlinks.
    """

    block: SharedBlock
    generation: int
    data_offset: int

    def state(self) -> bytes:
        return bytes(self.block.buf[self.data_offset : self.data_offset + len(_LIVE)])

    def discard(self) -> None:
        self.block.unlink()
        self.block.close()


class _Writer:
    """The codec blocks this process wrote: live ones, and released ones kept for reuse."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._live: dict[str, _Written] = {}  # oldest first
        self._unmapped: dict[str, _Written] = {}  # live, no longer kept mapped here
        self._pool: dict[str, _Written] = {}  # released, mapped, oldest first
        self._pool_bytes = 0

    def after_fork_in_child(self) -> None:
        """Forget the parent's blocks: a child must neither reuse nor unlink them."""
        self._lock = threading.Lock()
        for entry in (*self._live.values(), *self._pool.values()):
            entry.block.close()
        self._reset()

    def write(self, pickled: _Pickled) -> str:
        layout = _plan(pickled)
        with self._lock:
            self._collect_released()
            entry = self._take_from_pool(layout.block_size)
            if entry is None:
                block = create_block(pickled, keep_fd=_HAVE_FLOCK)
                entry = _Written(block, 0, layout.header_size)
            else:
                try:
                    _store(entry.block, pickled, layout, entry.generation + 1)
                except BaseException:
                    entry.discard()  # half rewritten: unlinked; closing it drops the lock
                    raise
                fcntl.flock(entry.block.fileno(), fcntl.LOCK_UN)
                entry.generation += 1
                entry.data_offset = layout.header_size
            name = entry.block.name
            self._live[name] = entry
            self._limit_mapped()
        return f"{TOKEN_PREFIX}{_MODE_SHARED}:{name}:{entry.generation:x}"

    def release(self, name: str, generation: int) -> bool:
        """Release a block written here; ``False`` if this process did not write it."""
        with self._lock:
            entry = self._live.get(name)
            if entry is not None:
                if entry.generation == generation:
                    buf = entry.block.buf
                    buf[entry.data_offset : entry.data_offset + len(_RELEASED)] = _RELEASED
                    del self._live[name]
                    self._add_to_pool(entry)
                return True
            unmapped = self._unmapped.get(name)
            if unmapped is not None:
                if unmapped.generation == generation:
                    del self._unmapped[name]
                    unmapped.discard()
                return True
            return name in self._pool  # a stale token of a pooled block: nothing to do

    def drop_all(self) -> None:
        """Unlink every block this process wrote and still tracks (tests; tokens then raise)."""
        with self._lock:
            for entry in (*self._live.values(), *self._unmapped.values(), *self._pool.values()):
                entry.discard()
            self._reset()

    def pooled_names(self) -> list[str]:
        """Names of the released blocks kept for reuse, oldest first."""
        with self._lock:
            return list(self._pool)

    def _collect_released(self) -> None:
        released = [name for name, entry in self._live.items() if entry.state() == _RELEASED]
        for name in released:
            self._add_to_pool(self._live.pop(name))

    def _add_to_pool(self, entry: _Written) -> None:
        size = entry.block.size
        if not _HAVE_FLOCK or size > POOL_MAX_BYTES:
            entry.discard()
            return
        while self._pool and (
            len(self._pool) >= POOL_MAX_BLOCKS or self._pool_bytes + size > POOL_MAX_BYTES
        ):
            self._drop_pooled(next(iter(self._pool))).discard()
        self._pool[entry.block.name] = entry
        self._pool_bytes += size

    def _drop_pooled(self, name: str) -> _Written:
        entry = self._pool.pop(name)
        self._pool_bytes -= entry.block.size
        return entry

    def _take_from_pool(self, needed: int) -> _Written | None:
        """Return a pooled block that fits ``needed`` bytes, exclusively locked, or ``None``."""
        fitting = [
            entry
            for entry in self._pool.values()
            if needed <= entry.block.size <= _MAX_REUSE_WASTE * needed + mmap.PAGESIZE
        ]
        for entry in sorted(fitting, key=lambda entry: entry.block.size):
            # Success proves no process maps the block any more (every reader holds LOCK_SH).
            if _try_flock(entry.block.fileno(), exclusive=True):
                return self._drop_pooled(entry.block.name)
        return None

    def _limit_mapped(self) -> None:
        while len(self._live) > MAX_MAPPED_LIVE:
            name = next(iter(self._live))
            entry = self._live.pop(name)
            entry.block.close()  # the handle still unlinks
            self._unmapped[name] = entry


_writer = _Writer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_writer.after_fork_in_child)


# -- public API ----------------------------------------------------------------------


def _parse_token(token: object) -> tuple[str, str]:
    """Split ``token`` into ``(mode, payload)``; TypeError or LayoutError if malformed."""
    if not isinstance(token, str):
        raise TypeError(f"a token must be a str, not {type(token).__name__}")
    head = len(TOKEN_PREFIX) + 2
    if not token.startswith(TOKEN_PREFIX) or len(token) < head or token[head - 1] != ":":
        raise LayoutError(
            f"{token[:60]!r} is not a shared_memory_array token "
            f"(expected '{TOKEN_PREFIX}<mode>:<payload>')"
        )
    mode = token[len(TOKEN_PREFIX)]
    if mode not in (_MODE_SHARED, _MODE_INLINE, _MODE_FRAME):
        raise LayoutError(f"token {token[:60]!r} has unknown mode {mode!r}")
    return mode, token[head:]


def _parse_shared_token(token: str) -> tuple[str, int]:
    match = _SHARED_TOKEN.fullmatch(token)
    if match is None:
        raise LayoutError(
            f"malformed shared-memory token {token[:80]!r} (expected "
            f"'{TOKEN_PREFIX}{_MODE_SHARED}:{PREFIX}<16 hex digits>:<generation in hex>')"
        )
    return match[1], int(match[2], 16)


_T = TypeVar("_T")


def write(obj: _T, *, threshold: int = 1_000_000) -> Token[_T]:
    """Serialise ``obj`` and return a token that any process of this user can read.

    Parameters
    ----------
    obj
        Any picklable object; numpy arrays in it are stored without pickling their data.
    threshold
        Objects whose pickle stream plus out-of-band buffers total fewer bytes
        travel inline in the token; others go into a shared-memory block.

    Returns
    -------
    Token
        A ``str`` subclass typed by ``obj``: an ASCII token,
        ``SMA1:<mode>:<payload>``; shared-memory tokens are printable and under
        256 characters.

    Raises
    ------
    pickle.PicklingError
        ``obj`` cannot be pickled (or the pickler's own error); no block is left behind.

    Warns
    -----
    UserWarning
        Shared memory could not be allocated; the object travels inline instead.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold must be an int, not {type(threshold).__name__}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    pickled = pickle_out_of_band(obj)
    if pickled.nbytes < threshold:
        return Token(_inline_token(pickled))
    try:
        return Token(_writer.write(pickled))
    except MemoryError as exc:  # AllocationError, or the mapping failed
        warnings.warn(
            f"shared memory unavailable ({exc}); sending {pickled.nbytes} bytes inline",
            UserWarning,
            stacklevel=2,
        )
        return Token(_inline_token(pickled))


@overload
def read(token: Token[_T], *, readonly: bool = True) -> _T: ...
@overload
def read(token: str, *, readonly: bool = True) -> Any: ...
def read(token: str, *, readonly: bool = True) -> Any:
    """Rebuild the object behind ``token``.

    Parameters
    ----------
    token
        A token returned by :func:`write` (in any process of this user).
    readonly
        Whether numpy arrays and buffers come back read-only (enforced by the
        mapping, so ``setflags(write=True)`` fails). With ``False`` they are
        writable views: writes reach the shared block.

    Raises
    ------
    TypeError
        ``token`` is not a str.
    LayoutError
        The token is malformed, or its block's header or contents are invalid.
    BlockNotFoundError
        The block is gone (released, or its writer exited).
    """
    mode, payload = _parse_token(token)
    if mode != _MODE_SHARED:
        return _read_inline(mode, payload, readonly)
    name, generation = _parse_shared_token(token)
    return read_block(name, generation=generation, readonly=readonly)


def release(token: str) -> None:
    """Free the block behind ``token`` now; reading the token afterwards raises.

    Any process holding the token may call it. Views already returned by
    :func:`read` stay valid (the memory is reused only once none is left).
    Releasing twice, an inline token, or a token whose block is gone does
    nothing.

    Raises
    ------
    TypeError
        ``token`` is not a str.
    LayoutError
        The token is malformed, or its block's header is invalid.
    """
    mode, _ = _parse_token(token)
    if mode != _MODE_SHARED:
        return
    name, generation = _parse_shared_token(token)
    if not _writer.release(name, generation):
        _release_foreign(name, generation)
