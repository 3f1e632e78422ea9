"""The self-describing header at the start of every block of this library.

Any process can attach to a block by name alone because the block describes
itself. This docstring is the format's specification.

Format version 3
----------------
All integers little-endian. The fixed part is 88 bytes:

======  ====  ===============  ===================================================
offset  size  field            meaning
======  ====  ===============  ===================================================
0       8     magic            ``b"\\x93SMA\\r\\n\\x1a\\n"`` (PNG-style: catches text mangling)
8       2     version          format version, 3 (1 and 2 are still read)
10      2     kind             :class:`BlockKind`: 1 array, 2 codec, 3 dict, 4 dict data
12      2     flags            :class:`HeaderFlags` bits; unknown bits are rejected
14      2     ndim             number of dimensions, 0 to :data:`MAX_NDIM`
16      4     header_size      bytes of fixed + variable part, a multiple of 64
20      4     checksum         CRC-32 of the first ``header_size`` bytes, this field as 0
24      4     descr_len        bytes of the dtype description
28      4     extra_len        bytes of kind-specific metadata
32      4     creator_pid      pid of the creating process (explains; never decides liveness)
36      2     name_len         bytes of the block's name (v3; 0 in v1 and v2)
38      2     area_words       size of the lifetime area in 8-byte words (v3; 0 before)
40      8     creator_start    creator's start time (clock ticks since boot), 0 unknown
48      8     generation       bumped each time the block's content is rewritten in place
56      8     data_offset      start of the payload, a multiple of 64
64      8     nbytes           logical payload bytes; data_offset + nbytes <= block size
72      16    block_id         random bytes drawn at creation: which block, not which name
======  ====  ===============  ===================================================

The variable part follows at offset 88: ``ndim`` int64 shape entries, ``ndim``
int64 strides (bytes), the dtype as the UTF-8 ``repr`` of
``numpy.lib.format.dtype_to_descr(dtype)`` (``descr_len`` bytes; empty when the
kind has no dtype), ``extra_len`` bytes that the block's kind defines (see the
codec and dict modules), then the block's name as its user gave it (UTF-8,
``name_len`` bytes: where the system's name is a short stand-in for a long one,
the portable backend's, this is how ``list`` and ``attach`` know the real one).
Zero padding up to ``header_size``.

The **lifetime area** follows: ``8 * area_words`` bytes (:data:`AREA_SIZE`,
512) at offset ``header_size``, outside the checksum because processes change
it while the block is in use (under a lock; its layout is in
:mod:`._lifetime`), so ``data_offset >= header_size + 8 * area_words``.

Validation (:func:`parse_header`, the one parser every reader uses) checks, and
rejects with :class:`~shared_memory_array.LayoutError` quoting the bad value: the
magic; the version; the size cap (:data:`MAX_HEADER_SIZE`); the checksum; the
kind (when the caller expects one); unknown flags; the lifetime area's size;
that shape entries and strides are non-negative; that the dtype parses with
numpy's own helpers and holds no Python objects; that the name is UTF-8; and
that shape x strides, the payload, the header and the lifetime area all fit
inside the block. Nothing in a header is trusted before these checks, so random
bytes, truncation and hostile values cannot cause a crash, a huge allocation,
or a silent wrong answer.

Version history
---------------
1. The first: a 72-byte fixed part, no block id, no lifetime area. Still read
   (golden bytes in ``tests/fixtures``); such a block has no lifetime words, so
   the reaper falls back to its creator's pid for it.
2. ``block_id`` after the v1 fixed part; a 64-byte lifetime area after the
   header (a bare count of handles in flight).
3. The block's name in the header; the lifetime area's size in the header
   (512 bytes: a table of tickets of pickles in flight, the notify word);
   the ``PORTABLE`` flag.
"""

from __future__ import annotations

import ast
import enum
import functools
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.lib.format import descr_to_dtype, dtype_to_descr

from ._lifetime import AREA_SIZE as LIFETIME_AREA_SIZE
from ._platform import backend
from ._process import current_identity
from .errors import LayoutError

__all__ = [
    "ALIGNMENT",
    "AREA_SIZE",
    "BLOCK_ID_SIZE",
    "FIXED_SIZE",
    "MAGIC",
    "VERSION",
    "BlockKind",
    "Header",
    "HeaderFlags",
    "align",
    "descr_text",
    "encode_header",
    "encoded_identity",
    "header_size_for",
    "parse_header",
    "peek_creator",
]

MAGIC: Final = b"\x93SMA\r\n\x1a\n"
VERSION: Final = 3
_READABLE_VERSIONS: Final = (1, 2, 3)
ALIGNMENT: Final = 64
MAX_NDIM: Final = 64
MAX_HEADER_SIZE: Final = 1 << 20
MAX_DESCR_LEN: Final = 1 << 16

_FIXED = struct.Struct("<8sHHHHIIIIIIQQQQ")  # the part common to every version
_V1_FIXED_SIZE: Final = _FIXED.size  # 72
BLOCK_ID_SIZE: Final = 16
FIXED_SIZE: Final = _V1_FIXED_SIZE + BLOCK_ID_SIZE  # 88 since v2
AREA_SIZE: Final = LIFETIME_AREA_SIZE
_V2_AREA_SIZE: Final = 64
MAX_NAME_BYTES: Final = 1024
_CHECKSUM_OFFSET: Final = 20


class BlockKind(enum.IntEnum):
    """What a block holds; stored in the header."""

    ARRAY = 1
    CODEC = 2
    DICT = 3
    DICT_DATA = 4  # the table and heap of a dict, one generation of its growth


class HeaderFlags(enum.IntFlag):
    """Header flag bits."""

    NONE = 0
    F_ORDER = 1  # the payload is laid out in Fortran order
    # Set by every v1 writer. Readers need not test it: a header is written in one
    # piece after the block exists, and a block still being created has no magic yet.
    READY = 2
    # Made by the portable backend: its lifetime locks are lock files, not OFD locks.
    PORTABLE = 4


_KNOWN_FLAGS: Final = int(HeaderFlags.F_ORDER | HeaderFlags.READY | HeaderFlags.PORTABLE)


def align(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


@dataclass(frozen=True, slots=True, eq=False)
class Header:
    """A decoded block header (see the module docstring for the layout).

    Attributes mirror the fields of the format. ``dtype`` is ``None`` for kinds
    that store no array layout; ``name`` is ``""`` for v1 and v2 blocks.
    Compared and hashed by identity: the parser hands out one object per
    distinct header (a cache), which callers may key their own caches by,
    cheaply.
    """

    kind: BlockKind
    flags: HeaderFlags
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype | None
    data_offset: int
    nbytes: int
    creator_pid: int
    creator_start: int
    generation: int = 0
    extra: bytes = b""
    header_size: int = 0
    version: int = VERSION
    block_id: bytes = b""
    name: str = ""
    area_size: int = AREA_SIZE

    @property
    def lifetime_offset(self) -> int | None:
        """Offset of the lifetime area (v2, v3), ``None`` for a v1 block that has none."""
        return self.header_size if self.version >= 2 else None

    @property
    def fortran_order(self) -> bool:
        """Whether the payload is in Fortran (column-major) order."""
        return bool(self.flags & HeaderFlags.F_ORDER)

    @property
    def portable(self) -> bool:
        """Whether the block was made by the portable backend (lock files, not OFD locks)."""
        return bool(self.flags & HeaderFlags.PORTABLE)


def encode_header(
    kind: BlockKind,
    *,
    dtype: np.dtype | None = None,
    shape: tuple[int, ...] = (),
    strides: tuple[int, ...] = (),
    nbytes: int = 0,
    flags: HeaderFlags = HeaderFlags.READY,
    generation: int = 0,
    extra: bytes = b"",
    name: str = "",
    creator: tuple[int, int] | None = None,
    block_id: bytes | None = None,
) -> bytes:
    """Return header and zeroed lifetime area (length = ``data_offset``, a multiple of 64).

    The payload starts right after the returned bytes. The caller is trusted:
    writers pass values they built themselves (readers go through
    :func:`parse_header`). ``block_id`` is drawn at random when not given.
    """
    descr = b"" if dtype is None else descr_text(dtype)
    encoded_name = name.encode("utf-8", "surrogateescape")
    variable = struct.pack(f"<{len(shape)}q{len(strides)}q", *shape, *strides)
    header_size = align(FIXED_SIZE + len(variable) + len(descr) + len(extra) + len(encoded_name))
    data_offset = header_size + AREA_SIZE
    if backend.lock_files:
        flags |= HeaderFlags.PORTABLE
    pid, start = current_identity() if creator is None else creator
    if block_id is None:
        block_id = os.urandom(BLOCK_ID_SIZE)
    fixed = _FIXED.pack(
        MAGIC,
        VERSION,
        int(kind),
        int(flags),
        len(shape),
        header_size,
        0,
        len(descr),
        len(extra),
        pid,
        len(encoded_name) | (AREA_SIZE // 8) << 16,
        start,
        generation,
        data_offset,
        nbytes,
    )
    raw = bytearray(data_offset)
    body = fixed + block_id + variable + descr + extra + encoded_name
    raw[: len(body)] = body
    struct.pack_into("<I", raw, _CHECKSUM_OFFSET, zlib.crc32(memoryview(raw)[:header_size]))
    return bytes(raw)


def encoded_identity(raw: bytes) -> tuple[bytes, int]:
    """``(block_id, lifetime_offset)`` of a header :func:`encode_header` just returned."""
    (header_size,) = struct.unpack_from("<I", raw, 16)
    return bytes(raw[_V1_FIXED_SIZE:FIXED_SIZE]), header_size


def header_size_for(
    *, ndim: int = 0, descr_len: int = 0, extra_len: int = 0, name: str = ""
) -> int:
    """Bytes :func:`encode_header` returns for these field sizes (header + lifetime area)."""
    name_len = len(name.encode("utf-8", "surrogateescape"))
    return align(FIXED_SIZE + 16 * ndim + descr_len + extra_len + name_len) + AREA_SIZE


@functools.lru_cache(maxsize=256)
def descr_text(dtype: np.dtype) -> bytes:
    """The header's description of ``dtype`` (cached: dtypes are immutable)."""
    return repr(dtype_to_descr(dtype)).encode("utf-8")


def peek_creator(buf: memoryview | bytes) -> tuple[int, int] | None:
    """Return the unvalidated ``(creator_pid, creator_start)`` if ``buf`` starts with the magic.

    For ``cleanup`` only, to stay away from a block whose header a live creator
    may be rewriting; never trust it for reading (use :func:`parse_header`).
    """
    if len(buf) < _V1_FIXED_SIZE or bytes(buf[:8]) != MAGIC:
        return None
    fields = _FIXED.unpack_from(buf, 0)
    return fields[9], fields[11]


_parsed: dict[bytes, Header] = {}
_PARSED_MAX: Final = 512
_HEADER_SIZE_AT: Final = struct.Struct("<I")


def parse_header(
    buf: memoryview | bytes,
    *,
    expected_kind: BlockKind | None = None,
    name: str = "<block>",
    verify_checksum: bool = True,
    block_size: int | None = None,
) -> Header:
    """Decode and validate the header at the start of ``buf`` (the whole block).

    Headers whose exact bytes passed every check before (CRC included) come
    from a per-process cache; the checks that depend on the block's size and
    on ``expected_kind`` are made again on every call.

    Parameters
    ----------
    buf
        The block's bytes; ``len(buf)`` is taken as the block size unless
        ``block_size`` is given, when ``buf`` may be the block's first bytes only
        (read with ``pread``, so the mapping is not touched): a header longer
        than ``buf`` is then rejected as truncated.
    expected_kind
        Reject blocks of any other kind.
    name
        Used in error messages.
    verify_checksum
        Skip the CRC only on trusted fast paths (bounds are always checked).
    block_size
        The block's size, when ``buf`` holds only its start.

    Raises
    ------
    LayoutError
        Anything is wrong; the message names the field and the bad value.
    """
    size = len(buf) if block_size is None else block_size
    if len(buf) >= _V1_FIXED_SIZE:
        (header_size,) = _HEADER_SIZE_AT.unpack_from(buf, 16)
        if header_size <= min(size, len(buf), MAX_HEADER_SIZE):
            raw = bytes(buf[:header_size])
            header = _parsed.get(raw)
            if header is not None:
                _check_fits(header, size, f"block {name!r}")
                _check_kind(header.kind, expected_kind, f"block {name!r}")
                return header
            header = _parse_uncached(
                buf, size, expected_kind=expected_kind, name=name, verify_checksum=verify_checksum
            )
            if verify_checksum:
                if len(_parsed) >= _PARSED_MAX:
                    _parsed.clear()
                _parsed[raw] = header
            return header
    return _parse_uncached(
        buf, size, expected_kind=expected_kind, name=name, verify_checksum=verify_checksum
    )


def _check_kind(kind: BlockKind, expected_kind: BlockKind | None, where: str) -> None:
    if expected_kind is not None and kind != expected_kind:
        raise LayoutError(
            f"{where} holds a block of kind {kind.name.lower()!r}, "
            f"not {expected_kind.name.lower()!r}"
        )


def _check_fits(header: Header, size: int, where: str) -> None:
    """The checks that depend on the block's size (a cached header may meet a shrunk block)."""
    if header.header_size > size:
        raise LayoutError(
            f"{where}: header_size {header.header_size} is invalid for a {size}-byte block"
        )
    if header.data_offset + header.nbytes > size:
        raise LayoutError(
            f"{where}: payload of {header.nbytes} bytes at offset {header.data_offset} exceeds "
            f"the {size}-byte block (truncated or shrunk?)"
        )


def _parse_uncached(
    buf: memoryview | bytes,
    size: int,
    *,
    expected_kind: BlockKind | None,
    name: str,
    verify_checksum: bool,
) -> Header:
    """:func:`parse_header` itself, every check made on the bytes (no cache)."""
    where = f"block {name!r}"
    if min(size, len(buf)) < _V1_FIXED_SIZE:
        raise LayoutError(
            f"{where} is {size} bytes, too short for a header ({_V1_FIXED_SIZE} bytes at least)"
        )
    (
        magic,
        version,
        kind_value,
        flags_value,
        ndim,
        header_size,
        checksum,
        descr_len,
        extra_len,
        pid,
        lengths,
        start,
        generation,
        data_offset,
        nbytes,
    ) = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise LayoutError(f"{where} has no shared_memory_array header (magic {magic!r})")
    if version not in _READABLE_VERSIONS:
        raise LayoutError(
            f"{where} has header format version {version}; this library reads 1, 2 and 3"
        )
    fixed_size = _V1_FIXED_SIZE if version == 1 else FIXED_SIZE
    if not fixed_size <= header_size <= min(size, MAX_HEADER_SIZE) or header_size % ALIGNMENT:
        raise LayoutError(f"{where}: header_size {header_size} is invalid for a {size}-byte block")
    if header_size > len(buf):  # only with block_size: the caller read too little
        raise LayoutError(f"{where}: header of {header_size} bytes is truncated to {len(buf)}")
    if verify_checksum:
        raw = bytearray(buf[:header_size])
        raw[_CHECKSUM_OFFSET : _CHECKSUM_OFFSET + 4] = b"\0\0\0\0"
        actual = zlib.crc32(raw)
        if actual != checksum:
            raise LayoutError(
                f"{where}: header checksum mismatch (stored {checksum:#010x}, "
                f"computed {actual:#010x}); the header is corrupt"
            )
    try:
        kind = BlockKind(kind_value)
    except ValueError:
        raise LayoutError(f"{where}: unknown block kind {kind_value}") from None
    _check_kind(kind, expected_kind, where)
    if flags_value & ~_KNOWN_FLAGS:
        raise LayoutError(f"{where}: unknown header flags {flags_value:#x}")
    if version < 3:
        if lengths:
            raise LayoutError(f"{where}: reserved header field is {lengths}, expected 0")
        name_len = 0
        area_size = _V2_AREA_SIZE if version == 2 else 0
    else:
        name_len, area_size = lengths & 0xFFFF, 8 * (lengths >> 16)
        if area_size != AREA_SIZE:
            raise LayoutError(
                f"{where}: lifetime area of {area_size} bytes (this library uses {AREA_SIZE})"
            )
        if name_len > MAX_NAME_BYTES:
            raise LayoutError(f"{where}: name of {name_len} bytes is too long")
    if ndim > MAX_NDIM:
        raise LayoutError(f"{where}: ndim {ndim} exceeds {MAX_NDIM}")
    if descr_len > MAX_DESCR_LEN:
        raise LayoutError(f"{where}: dtype description of {descr_len} bytes is too long")
    variable_end = fixed_size + 16 * ndim + descr_len + extra_len + name_len
    if variable_end > header_size:
        raise LayoutError(
            f"{where}: header fields need {variable_end} bytes but header_size is {header_size}"
        )
    if data_offset % ALIGNMENT or data_offset < header_size + area_size:
        raise LayoutError(f"{where}: data_offset {data_offset} is invalid")
    if data_offset + nbytes > size:
        _check_fits(
            Header(kind, HeaderFlags.NONE, (), (), None, data_offset, nbytes, 0, 0), size, where
        )
    dims = struct.unpack_from(f"<{2 * ndim}q", buf, fixed_size)
    shape, strides = tuple(dims[:ndim]), tuple(dims[ndim:])
    if any(d < 0 for d in shape):
        raise LayoutError(f"{where}: negative dimension in shape {shape}")
    if any(s < 0 for s in strides):
        raise LayoutError(f"{where}: negative stride in strides {strides}")
    descr_at = fixed_size + 16 * ndim
    dtype = _parse_dtype(bytes(buf[descr_at : descr_at + descr_len]), where) if descr_len else None
    if dtype is not None:
        _check_extent(shape, strides, dtype.itemsize, nbytes, where)
    elif ndim:
        raise LayoutError(f"{where}: a shape {shape} without a dtype")
    extra_at = descr_at + descr_len
    name_at = extra_at + extra_len
    try:
        block_name = bytes(buf[name_at : name_at + name_len]).decode("utf-8", "surrogateescape")
    except UnicodeDecodeError:  # pragma: no cover - surrogateescape decodes any bytes
        raise LayoutError(f"{where}: the name is not UTF-8") from None
    return Header(
        kind=kind,
        flags=HeaderFlags(flags_value),
        shape=shape,
        strides=strides,
        dtype=dtype,
        data_offset=data_offset,
        nbytes=nbytes,
        creator_pid=pid,
        creator_start=start,
        generation=generation,
        extra=bytes(buf[extra_at:name_at]),
        header_size=header_size,
        version=version,
        block_id=bytes(buf[_V1_FIXED_SIZE:FIXED_SIZE]) if version >= 2 else b"",
        name=block_name,
        area_size=area_size,
    )


def _parse_dtype(text: bytes, where: str) -> np.dtype:
    try:
        dtype = _dtype_from_descr(text)
    except (
        ValueError,
        SyntaxError,
        TypeError,
        KeyError,
        IndexError,
        RecursionError,
        MemoryError,
        UnicodeDecodeError,
        OverflowError,
        AttributeError,
    ) as exc:
        raise LayoutError(f"{where}: unreadable dtype description {text[:80]!r}: {exc}") from None
    if dtype.hasobject:
        raise LayoutError(f"{where}: dtype {dtype} holds Python objects; refusing to map it")
    return dtype


@functools.lru_cache(maxsize=256)
def _dtype_from_descr(text: bytes) -> np.dtype:
    # Cached: attach is on hot paths and dtypes are immutable; failures are not cached.
    return descr_to_dtype(ast.literal_eval(text.decode("utf-8")))


def _check_extent(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, nbytes: int, where: str
) -> None:
    """Check that every element addressed by shape × strides lies inside ``nbytes``."""
    if 0 in shape:
        return
    last = sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
    if last + itemsize > nbytes:
        raise LayoutError(
            f"{where}: shape {shape} with strides {strides} and itemsize {itemsize} "
            f"addresses {last + itemsize} bytes, but the payload is {nbytes} bytes"
        )
