"""Pickling with protocol 5, and the buffer table that lays an object out in bytes.

:func:`pickle_out_of_band` pickles an object once with a ``buffer_callback``,
so the data of numpy arrays (and of any :class:`pickle.PickleBuffer`) comes out
*out of band*, beside the pickle stream instead of inside it;
:func:`unpickle` hands the out-of-band buffers back to :func:`pickle.loads` as
slices of the bytes they were stored in (a reader's mapping: views, no copy).

The buffer table
----------------
A *buffer table* lists ``count`` (``<I``) followed by ``count + 1`` spans
(``<QQ`` offset, length): the pickle stream first, then each out-of-band buffer.
In a codec block the table is the header's ``extra`` and offsets count from
the payload start (see :mod:`._store`); in an inline frame the table starts the
frame and offsets count from the frame start. :func:`decode_table` validates a
table before anything is touched (count at most :data:`MAX_BUFFERS`, every span
inside the payload and clear of what precedes it) and raises
:class:`~shared_memory_array.LayoutError` quoting the bad value.

What comes back as a view
-------------------------
numpy arrays (every layout and dtype except arrays of Python objects;
non-contiguous ones are made contiguous while pickling, so they come back
C-contiguous) and ``PickleBuffer`` objects (as a flat ``memoryview`` of their
bytes) are views on the bytes they were stored in. Everything else --
``bytes``, ``bytearray`` and ``str`` included -- is rebuilt by pickle, which
copies it: CPython's pickler always writes those in band. Their payloads are
still copied only once on each side: large ones reach the block straight from
the object, without an intermediate pickle string. Arrays of Python objects
and ``ndarray`` subclasses are pickled as numpy pickles them. Beyond
:data:`MAX_BUFFERS` buffers, the rest travel in band (as copies). Arrays are
reduced here (to :func:`_rebuild_array`, a ``numpy.frombuffer`` view), not by
numpy, which would copy non-contiguous and datetime arrays in band.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from .._header import align
from .._platform import backend
from ..errors import LayoutError

__all__ = [
    "FRAME_ALIGNMENT",
    "MAX_BUFFERS",
    "Pickled",
    "decode_table",
    "encode_table",
    "fill",
    "inline_frame",
    "pickle_out_of_band",
    "place",
    "read_frame",
    "table_size",
    "unpickle",
]

MAX_BUFFERS: Final = 50_000
FRAME_ALIGNMENT: Final = 16
_COUNT: Final = struct.Struct("<I")
_PWRITE_MIN: Final = 1 << 20  # smaller pieces are copied through the mapping


@dataclass(frozen=True)
class Pickled:
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


def pickle_out_of_band(obj: object) -> Pickled:
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
    return Pickled(chunks, buffers)


# -- the buffer table ----------------------------------------------------------------


def place(pickled: Pickled, start: int, alignment: int) -> tuple[list[tuple[int, int]], int]:
    """Return the ``(offset, length)`` spans of stream and buffers, and the end offset."""
    spans = []
    position = start
    for length in (pickled.stream_len, *(buffer.nbytes for buffer in pickled.buffers)):
        position = align(position, alignment)
        spans.append((position, length))
        position += length
    return spans, position


def table_size(buffer_count: int) -> int:
    return _COUNT.size + 16 * (buffer_count + 1)


def encode_table(spans: list[tuple[int, int]]) -> bytes:
    flat = [value for span in spans for value in span]
    return _COUNT.pack(len(spans) - 1) + struct.pack(f"<{len(flat)}Q", *flat)


def decode_table(
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
    if len(table) < table_size(count) or (exact and len(table) != table_size(count)):
        raise LayoutError(
            f"{where}: buffer table of {len(table)} bytes does not match its count of "
            f"{count} buffers ({table_size(count)} bytes)"
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


def fill(
    region: memoryview,
    pickled: Pickled,
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
        large = fd >= 0 and len(piece) >= _PWRITE_MIN
        if large and backend.write_at(fd, memoryview(piece).cast("B"), fd_offset + offset):
            continue
        region[offset : offset + len(piece)] = piece


def unpickle(payload: memoryview, spans: list[tuple[int, int]], where: str) -> object:
    """Rebuild the object from ``payload``; out-of-band buffers are slices of it (no copy)."""
    stream_offset, stream_len = spans[0]
    buffers = [payload[offset : offset + length] for offset, length in spans[1:]]
    try:
        return pickle.loads(payload[stream_offset : stream_offset + stream_len], buffers=buffers)
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise LayoutError(f"{where}: cannot unpickle the stored object: {exc}") from exc


# -- inline frames -------------------------------------------------------------------


def inline_frame(pickled: Pickled) -> tuple[bool, bytes | bytearray]:
    """The bytes of an inline token: ``(framed, data)``.

    Without out-of-band buffers the data is the pickle stream itself
    (``framed`` false); else a frame: the buffer table, the stream and the
    buffers, 16-byte aligned.
    """
    if not pickled.buffers:
        chunks = pickled.chunks
        return False, chunks[0] if len(chunks) == 1 else b"".join(chunks)
    spans, end = place(pickled, table_size(len(pickled.buffers)), FRAME_ALIGNMENT)
    frame = bytearray(end)
    table = encode_table(spans)
    frame[: len(table)] = table
    fill(memoryview(frame), pickled, spans)
    return True, frame


def read_frame(framed: bool, data: bytes, readonly: bool) -> object:
    """Rebuild the object of an inline token's (checked) bytes."""
    where = "inline token"
    if not framed:
        return unpickle(memoryview(data), [(0, len(data))], where)
    buffer: bytes | bytearray = data if readonly else bytearray(data)  # writable arrays
    count = _COUNT.unpack_from(buffer)[0] if len(buffer) >= _COUNT.size else 0
    spans = decode_table(buffer, len(buffer), table_size(count), where, exact=False)
    return unpickle(memoryview(buffer), spans, where)
