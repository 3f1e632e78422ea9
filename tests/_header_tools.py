"""Helpers to forge headers in tests: mutate fields and recompute the checksum."""

from __future__ import annotations

import struct
import zlib

CHECKSUM_OFFSET = 20
FIELD_FORMATS = {
    "version": (8, "<H"),
    "kind": (10, "<H"),
    "flags": (12, "<H"),
    "ndim": (14, "<H"),
    "header_size": (16, "<I"),
    "descr_len": (24, "<I"),
    "extra_len": (28, "<I"),
    "creator_pid": (32, "<I"),
    "name_len": (36, "<H"),  # v3 (with area_words: the "reserved" word of v1 and v2)
    "area_words": (38, "<H"),
    "creator_start": (40, "<Q"),
    "generation": (48, "<Q"),
    "data_offset": (56, "<Q"),
    "nbytes": (64, "<Q"),
}


def reseal(raw: bytearray) -> bytearray:
    """Recompute the CRC of a header in place (so deeper validation is reached)."""
    (header_size,) = struct.unpack_from("<I", raw, 16)
    header_size = min(header_size, len(raw))
    struct.pack_into("<I", raw, CHECKSUM_OFFSET, 0)
    struct.pack_into("<I", raw, CHECKSUM_OFFSET, zlib.crc32(bytes(raw[:header_size])))
    return raw


def with_field(header: bytes, field: str, value: int) -> bytearray:
    """Return ``header`` with one fixed field set to ``value`` and the CRC recomputed."""
    offset, fmt = FIELD_FORMATS[field]
    raw = bytearray(header)
    struct.pack_into(fmt, raw, offset, value)
    return reseal(raw)
