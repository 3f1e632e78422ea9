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

* ``SMA1:s:<block name>:<generation, hex>:<block id, 32 hex>:<shm identity, 16 hex>``
  -- shared; printable, under 100 characters. The block id (from the header)
  tells the block from another of the same name; the identity (:mod:`._identity`)
  tells this host's /dev/shm from another's, so a token read elsewhere raises
  instead of reading a stranger.
* ``SMA1:i:<crc32, 8 hex><hex>`` -- inline pickle stream without out-of-band buffers.
* ``SMA1:f:<crc32, 8 hex><hex>`` -- inline *frame*: buffer table, stream and buffers
  (below).

Inline payloads carry the CRC-32 of their bytes, checked before anything is
unpickled: a damaged token is a :class:`~shared_memory_array.LayoutError`,
never bytes handed to numpy's or pickle's constructors (fuzzing found inputs
there that crash or hang the reader).

Inline payloads are hex, not base64: the token must be ASCII, and encoding plus
decoding a 10 KB pickle takes ~15 µs with ``bytes.hex``/``bytes.fromhex`` (a
little less than ``binascii.hexlify`` + ``decode``, which copies once more)
on CPython 3.10, 3.11 and 3.13, against 27 µs (3.10) to 40 µs (3.11, 3.13)
with ``b2a_base64``/``a2b_base64``; numpy-, ``bytes.translate``- and
``unicode_escape``-based encodings measured no faster (the last 1.5x to 6x
slower). Hex is twice the input's size (base64 4/3), which only matters below
``threshold``. That ~1.5 ns per byte is why a 10 KB inline
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
The block rule of API.md section 0 (:mod:`._lifetime`, :mod:`._reaper`), with
the codec's policy on top:

* The writer holds each block it wrote (HOLD) and owns it (OWNER) until the
  token is released. Readers hold it while any view of it lives. A token is
  readable only while its writer owns the block: once the writer exits (or is
  killed) reading it raises :class:`~shared_memory_array.BlockNotFoundError`,
  while views already handed out stay valid.
* ``release(token)`` -- from any process -- checks the generation and sets the
  state word to ``released``: the token is dead at once everywhere. The writer
  frees the block (unlinks it and drops its mapping) at once if it released it
  itself, else within :data:`COLLECT_INTERVAL` (a collector thread that runs
  only while this process has blocks to watch). A writer that is gone cannot:
  then the releasing reader unlinks the name itself.
* The one exception: the writer keeps released blocks to reuse for its own
  next writes (first touching fresh shared memory costs far more than copying
  into it), at most ``pool_bytes`` of them (:func:`configure`; default an eighth
  of /dev/shm, at most 2 GiB; ``$SHARED_MEMORY_ARRAY_POOL_BYTES``; 0 turns reuse
  off) and :data:`POOL_MAX_BLOCKS`, and only while it keeps writing: the pool
  is emptied :data:`POOL_IDLE_SECONDS` after the last write. A pooled block is
  marked ``pooled`` in its lifetime words (``list_blocks`` shows it).
* A pooled block is reused only if its name still names it (nobody unlinked
  or replaced it) and only after the writer's HOLD upgrades to exclusive: proof
  that no other process maps it any more. It rewrites payload and header, with
  the generation bumped, under that lock. A reader holding an old token either
  finds it held (rewrite in progress) or sees another generation: it raises
  :class:`~shared_memory_array.BlockNotFoundError`, never returns another
  object's bytes. A live view is never overwritten.
* New blocks are reserved with ``posix_fallocate`` and filled with ``pwrite``
  (pieces of 1 MiB and more), so a one-shot write never faults the pages into
  the writer's mapping: measured here for 1 GB, 0.52 s against 0.83 s for
  ``MAP_POPULATE`` + copy and 0.79 s for copying through a plain mapping. A
  pooled block's mapping is populated off the hot path by :mod:`._populate` (a
  thread, ``MADV_POPULATE_READ`` then ``WRITE``, the GIL released); a write that
  takes it earlier maps the rest itself by read faults (16 pages each) before
  copying. Every later reuse copies into mapped pages at memcpy speed.
* Every outstanding token costs the writer one descriptor (two on Python <
  3.13, whose ``mmap`` duplicates it). When none is left, :func:`write` falls
  back to an inline token with a ``UserWarning``.

Security: reading a token unpickles data, which can run code, exactly like
:func:`pickle.loads`. Blocks are created with mode 0600, so only the same user
can have written them; accept tokens only from processes you trust.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import re
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, overload

import numpy as np

from . import _lifetime, _populate, _reaper
from ._block import GENERATED_NAME_PATTERN, PREFIX, SharedBlock, pwrite_all
from ._header import (
    BLOCK_ID_SIZE,
    BlockKind,
    Header,
    align,
    encode_header,
    encoded_identity,
    header_size_for,
    parse_header,
)
from ._identity import IDENTITY_LENGTH, check_same_shm, shm_identity
from ._token import Token
from .errors import BlockNotFoundError, LayoutError

__all__ = ["configure", "read", "release", "write"]

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
POOL_BYTES_ENV: Final = "SHARED_MEMORY_ARRAY_POOL_BYTES"
POOL_IDLE_SECONDS: Final = 2.0
"""The pool is emptied this long after the writer's last write."""
COLLECT_INTERVAL: Final = 0.5
"""How often the writer's collector frees blocks that other processes released."""

_MODE_SHARED: Final = "s"
_MODE_INLINE: Final = "i"
_MODE_FRAME: Final = "f"
_SHARED_TOKEN: Final = re.compile(
    re.escape(TOKEN_PREFIX + _MODE_SHARED + ":")
    + f"({GENERATED_NAME_PATTERN}):([0-9a-f]{{1,16}}):([0-9a-f]{{{2 * BLOCK_ID_SIZE}}})"
    + f":([0-9a-f]{{{IDENTITY_LENGTH}}})"
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
        return _seal(_MODE_INLINE, stream)
    spans, end = _place(pickled, _table_size(len(pickled.buffers)), _FRAME_ALIGNMENT)
    frame = bytearray(end)
    table = _encode_table(spans)
    frame[: len(table)] = table
    _fill(memoryview(frame), pickled, spans)
    return _seal(_MODE_FRAME, frame)


def _seal(mode: str, data: bytes | bytearray) -> str:
    """``SMA1:<mode>:<crc32, 8 hex digits><data as hex>``."""
    # bytes.hex() makes the str directly: one pass fewer than hexlify + decode.
    return f"{TOKEN_PREFIX}{mode}:{zlib.crc32(data):08x}{data.hex()}"


_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def _unseal(payload: str) -> bytes:
    """The bytes of an inline payload, checked against its CRC-32 before anyone unpickles them.

    Raises
    ------
    LayoutError
        The payload is not hex, too short, or its checksum does not match.
    """
    stored_text = payload[:8]
    if len(stored_text) < 8 or not _HEX_DIGITS.issuperset(stored_text):
        raise LayoutError("malformed inline token: no checksum")
    body = payload[8:]
    try:
        data = bytes.fromhex(body)
    except ValueError as exc:  # a non-hex or non-ASCII character
        raise LayoutError(f"malformed inline token: {exc}") from None
    if len(data) * 2 != len(body):  # fromhex skips whitespace: a token never holds any
        raise LayoutError("malformed inline token: whitespace in the payload")
    stored, actual = int(stored_text, 16), zlib.crc32(data)
    if actual != stored:
        raise LayoutError(
            f"inline token is damaged: checksum {actual:08x} does not match the stored {stored:08x}"
        )
    return data


def _read_inline(mode: str, payload: str, readonly: bool) -> object:
    where = "inline token"
    data: bytes | bytearray = _unseal(payload)
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
    return _Layout(spans, extra, header_size_for(extra_len=len(extra)), payload_size)


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


def create_block(pickled: _Pickled) -> SharedBlock:
    """Create a new codec block holding ``pickled`` (generation 0), owned by this process.

    The data goes in with ``pwrite`` into the pages ``posix_fallocate`` reserved,
    so this process never faults them into its mapping (measured on the
    reference machine, 1 GB: 0.52 s, against 0.83 s with ``MAP_POPULATE`` and a
    copy through the mapping).

    Raises
    ------
    AllocationError
        Shared memory, an inode in /dev/shm or a file descriptor is not available.
    """
    layout = _plan(pickled)
    size = align(layout.block_size, mmap.PAGESIZE)
    block = SharedBlock.create(size)
    try:
        _store(block, pickled, layout, 0, fd=block.fileno())
    except BaseException:
        block.unlink()
        block.close()
        raise
    return block


def _state(buf: memoryview, header: Header) -> bytes:
    return bytes(buf[header.data_offset : header.data_offset + len(_LIVE)])


def _released_error(name: str, generation: int | None) -> BlockNotFoundError:
    which = "the object" if generation is None else f"the object of generation {generation}"
    return BlockNotFoundError(
        name, f"{which} in shared-memory block {name!r} was released (read after release)"
    )


def _open_checked(
    name: str,
    generation: int | None,
    *,
    readonly: bool,
    block_id: bytes | None = None,
    writer_must_live: bool = False,
) -> tuple[SharedBlock, Header]:
    """Map block ``name`` (holding it, see :mod:`._lifetime`); check its header and state.

    Raises
    ------
    BlockNotFoundError
        The block is gone, its object (of ``generation``, when given) was
        released, or (``writer_must_live``) its writer has exited.
    LayoutError
        The block's header or state word is invalid.
    """
    try:
        # A writer holds HOLD exclusively only while it rewrites a released block.
        block = SharedBlock.attach(name, readonly=readonly, wait=generation is None)
    except BlockNotFoundError as exc:
        if generation is not None and "busy" in str(exc):
            raise _released_error(name, generation) from None
        raise
    try:
        header = parse_header(block.buf, expected_kind=BlockKind.CODEC, name=name)
        if generation is not None and header.generation != generation:
            raise _released_error(name, generation)
        if block_id is not None and header.block_id != block_id:
            raise BlockNotFoundError(
                name, f"block {name!r} is not the block this token was made for"
            )
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
        if writer_must_live and not block.hold.owner_elsewhere():
            raise BlockNotFoundError(
                name, f"the writer of block {name!r} has exited: its tokens are dead"
            )
    except BaseException:
        block.close()
        raise
    return block, header


def read_block(
    name: str,
    *,
    generation: int | None = None,
    readonly: bool = True,
    block_id: bytes | None = None,
) -> object:
    """Rebuild the object in codec block ``name``; arrays are views on the block.

    ``generation`` is checked when given (tokens carry it, and then the writer
    must still run; ``SharedData`` passes none).

    Raises
    ------
    BlockNotFoundError
        The block is gone, or its object was released.
    LayoutError
        The block is not a valid codec block.
    """
    block, header = _open_checked(
        name,
        generation,
        readonly=readonly,
        block_id=block_id,
        writer_must_live=generation is not None,
    )
    try:
        where = f"block {name!r}"
        spans = _decode_table(header.extra, header.nbytes, _STATE_SIZE, where, exact=True)
        payload = block.buf[header.data_offset : header.data_offset + header.nbytes]
        return _unpickle(payload, spans, where)
    finally:
        # Unmapped (and no longer held) now if the object holds no view; else with its last view.
        block.close()


def _release_foreign(name: str, generation: int, block_id: bytes | None) -> None:
    """Mark generation ``generation`` of block ``name`` released (a block of another process).

    The writer notices within :data:`COLLECT_INTERVAL` and frees or pools it;
    a writer that has exited cannot, so then the name goes now.
    """
    try:
        block, header = _open_checked(name, generation, readonly=False, block_id=block_id)
    except BlockNotFoundError:
        return  # gone, released or reused: nothing left to do
    try:
        block.buf[header.data_offset : header.data_offset + len(_RELEASED)] = _RELEASED
        if not block.hold.owner_elsewhere():
            block.unlink()
    finally:
        block.close()


# -- this process's blocks -----------------------------------------------------------


def _default_pool_limit() -> int:
    value = os.environ.get(POOL_BYTES_ENV)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            warnings.warn(
                f"ignoring {POOL_BYTES_ENV}={value!r}: not an integer", UserWarning, stacklevel=2
            )
    return POOL_MAX_BYTES


@dataclass
class _Written:
    """A block this process wrote: its handle (mapping, descriptor, HOLD and OWNER) and state."""

    block: SharedBlock
    generation: int
    data_offset: int
    lifetime_offset: int
    mapped: int = 0  # bytes from the start known to be in the writer's page tables

    def state(self) -> bytes:
        return bytes(self.block.buf[self.data_offset : self.data_offset + len(_LIVE)])

    def mark(self, state: bytes) -> None:
        self.block.buf[self.data_offset : self.data_offset + len(state)] = state

    def set_pooled(self, pooled: bool) -> None:
        words = self.block.lifetime_words(self.lifetime_offset)
        if words is not None:
            words.set_state(_lifetime.STATE_POOLED if pooled else _lifetime.STATE_LIVE)

    def still_named(self) -> bool:
        """Whether the block's name still names this block (nobody unlinked or replaced it)."""
        hold = self.block.hold
        try:
            info = os.stat(os.path.join(_reaper.SHM_DIR, self.block.name))
        except FileNotFoundError:
            return False
        except OSError:
            return True  # no /dev/shm path here (macOS): cannot tell, trust it
        return (info.st_dev, info.st_ino) == (hold.dev, hold.ino)

    def discard(self) -> None:
        self.block.unlink()
        self.block.close()


class _Writer:
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
        self.pool_limit = _default_pool_limit()
        self._reset()

    def _reset(self) -> None:
        self._live: dict[str, _Written] = {}  # oldest first
        self._pool: dict[str, _Written] = {}  # released, mapped, oldest first
        self._pool_bytes = 0
        self._last_write = 0.0
        for job in getattr(self, "_populating", {}).values():
            job.cancel()
        # Pooled blocks whose mapping the populate thread maps in (see _populate).
        self._populating: dict[str, _populate.Job] = {}

    def after_fork_in_child(self) -> None:
        """Forget the parent's blocks: a child must neither reuse nor unlink them."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._collector = None
        for entry in (*self._live.values(), *self._pool.values()):
            entry.block.close()
        self._reset()

    def write(self, pickled: _Pickled, identity: str) -> str:
        layout = _plan(pickled)
        with self._lock:
            self._collect_released()
            entry = self._take_from_pool(layout.block_size)
            if entry is None:
                entry = _Written(create_block(pickled), 0, layout.header_size, 0)
            else:
                try:
                    _store(entry.block, pickled, layout, entry.generation + 1)
                except BaseException:
                    entry.discard()  # half rewritten: unlinked; closing it drops the lock
                    raise
                finally:
                    with contextlib.suppress(OSError, ValueError):
                        # Back from exclusive to shared: readers may attach again.
                        _lifetime.try_lock(entry.block.fileno(), _lifetime.HOLD, exclusive=False)
                entry.generation += 1
                entry.data_offset = layout.header_size
            # Both change with every rewrite: a new header has a new block id.
            block_id, entry.lifetime_offset = encoded_identity(
                bytes(entry.block.buf[: layout.header_size])
            )
            name = entry.block.name
            self._live[name] = entry
            self._last_write = time.monotonic()
            self._start_collector()
        return _shared_token(name, entry.generation, block_id, identity)

    def release(self, name: str, generation: int) -> bool:
        """Release a block written here; ``False`` if this process did not write it."""
        with self._lock:
            entry = self._live.get(name)
            if entry is not None:
                if entry.generation == generation:
                    entry.mark(_RELEASED)
                    del self._live[name]
                    self._add_to_pool(entry)
                return True
            return name in self._pool  # a stale token of a pooled block: nothing to do

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

    def pooled_names(self) -> list[str]:
        """Names of the released blocks kept for reuse, oldest first."""
        with self._lock:
            return list(self._pool)

    def live_names(self) -> list[str]:
        """Names of the blocks written here whose tokens are live, oldest first."""
        with self._lock:
            return list(self._live)

    # -- under self._lock --------------------------------------------------------------

    def _collect_released(self) -> None:
        released = [name for name, entry in self._live.items() if entry.state() == _RELEASED]
        for name in released:
            self._add_to_pool(self._live.pop(name))

    def _pooling(self) -> bool:
        """Whether released memory is kept: reuse on, and a write in the last idle period."""
        recent = time.monotonic() - self._last_write < POOL_IDLE_SECONDS
        return self.pool_limit > 0 and _lifetime.HAVE_OFD_LOCKS and recent

    def _add_to_pool(self, entry: _Written) -> None:
        size = entry.block.size
        if not self._pooling() or size > self.pool_limit:
            entry.discard()
            return
        self._trim_pool(self.pool_limit - size, max_blocks=POOL_MAX_BLOCKS - 1)
        entry.set_pooled(True)
        self._pool[entry.block.name] = entry
        self._pool_bytes += size
        if size - entry.mapped >= _populate.MIN_BYTES:
            # Off the hot path: the next write into this block then copies at memcpy
            # speed instead of taking a page fault per page of the writer's mapping.
            self._populating[entry.block.name] = _populate.submit(entry.block.buf, entry.mapped)

    def _trim_pool(self, max_bytes: int, *, max_blocks: int | None = None) -> None:
        while self._pool and (
            self._pool_bytes > max_bytes
            or (max_blocks is not None and len(self._pool) > max_blocks)
        ):
            self._drop_pooled(next(iter(self._pool))).discard()

    def _drop_pooled(self, name: str) -> _Written:
        entry = self._pool.pop(name)
        self._pool_bytes -= entry.block.size
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
            if needed <= entry.block.size <= _MAX_REUSE_WASTE * needed + mmap.PAGESIZE
        ]
        for entry in sorted(fitting, key=lambda entry: entry.block.size):
            if not entry.still_named():  # unlinked (or replaced) from outside: never hand out
                self._drop_pooled(entry.block.name).discard()
                continue
            # Upgrading this description's HOLD to exclusive succeeds only if no other
            # description maps the block: no reader has a view of it any more.
            if _lifetime.try_lock(entry.block.fileno(), _lifetime.HOLD, exclusive=True):
                entry = self._drop_pooled(entry.block.name)
                # Taken before the thread was done: the rest is mapped in here, by read
                # faults that map 16 pages each, instead of one fault per page in the copy.
                touched = min(entry.block.size, align(needed, mmap.PAGESIZE))
                if entry.mapped < touched and _populate.prefault(
                    entry.block.buf, entry.mapped, touched, by_reading=True
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

    def shutdown(self) -> None:
        """At exit: stop the collector and free the pool (live blocks die with the process)."""
        self._wake.set()
        with contextlib.suppress(Exception):
            self.empty_pool()


_writer = _Writer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_writer.after_fork_in_child)
_reaper.exit_hook.before_exit.append(_writer.shutdown)


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


@dataclass(frozen=True)
class _SharedToken:
    name: str
    generation: int
    block_id: bytes
    identity: str


def _shared_token(name: str, generation: int, block_id: bytes, identity: str) -> str:
    return f"{TOKEN_PREFIX}{_MODE_SHARED}:{name}:{generation:x}:{block_id.hex()}:{identity}"


def _parse_shared_token(token: str) -> _SharedToken:
    match = _SHARED_TOKEN.fullmatch(token)
    if match is None:
        raise LayoutError(
            f"malformed shared-memory token {token[:80]!r} (expected "
            f"'{TOKEN_PREFIX}{_MODE_SHARED}:{PREFIX}<16 hex digits>:<generation in hex>:"
            "<block id, 32 hex digits>:<shm identity, 16 hex digits>')"
        )
    return _SharedToken(match[1], int(match[2], 16), bytes.fromhex(match[3]), match[4])


def configure(*, pool_bytes: int | None = None) -> None:
    """Set how much released memory this process keeps for its own next writes.

    Parameters
    ----------
    pool_bytes
        At most this many bytes of released blocks stay mapped for reuse (they
        are freed 2 seconds after this process's last write anyway); ``0``
        turns reuse off and frees the pool now. ``None`` restores the default:
        ``$SHARED_MEMORY_ARRAY_POOL_BYTES``, else an eighth of /dev/shm, at most 2 GiB.

    Raises
    ------
    TypeError, ValueError
        ``pool_bytes`` is not a non-negative int.
    """
    if pool_bytes is None:
        limit = _default_pool_limit()
    else:
        if isinstance(pool_bytes, bool) or not isinstance(pool_bytes, int):
            raise TypeError(f"pool_bytes must be an int or None, not {type(pool_bytes).__name__}")
        if pool_bytes < 0:
            raise ValueError(f"pool_bytes must be >= 0, got {pool_bytes}")
        limit = pool_bytes
    with _writer._lock:
        _writer.pool_limit = limit
        _writer._trim_pool(limit)


_T = TypeVar("_T")


class _InlineSeen(threading.local):
    """The last inline token this thread made or read whole (so it is known to be valid)."""

    token: str | None = None


_inline_seen = _InlineSeen()


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
        inline = _inline_seen.token = Token(_inline_token(pickled))
        return inline
    try:
        return Token(_writer.write(pickled, shm_identity()))
    except MemoryError as exc:  # AllocationError: no memory, inode or descriptor left
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
        obj = _read_inline(mode, payload, readonly)
        _inline_seen.token = token  # checked whole: its release need not decode it again
        return obj
    shared = _parse_shared_token(token)
    check_same_shm(shared.name, shared.identity)
    return read_block(
        shared.name, generation=shared.generation, readonly=readonly, block_id=shared.block_id
    )


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
    mode, payload = _parse_token(token)
    if mode != _MODE_SHARED:
        # A malformed inline token raises as read() would; the common pattern
        # (write, read, release the same token) has it checked already.
        if _inline_seen.token is not token and _inline_seen.token != token:
            _unseal(payload)
        return
    shared = _parse_shared_token(token)
    check_same_shm(shared.name, shared.identity)
    if not _writer.release(shared.name, shared.generation):
        _release_foreign(shared.name, shared.generation, shared.block_id)
