"""The header format: round trips, golden bytes of format v1, and rejection of bad headers."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _header_tools import reseal, with_field
from hypothesis import given
from hypothesis import strategies as st

from shared_memory_array import LayoutError
from shared_memory_array._header import (
    ALIGNMENT,
    FIXED_SIZE,
    MAGIC,
    BlockKind,
    HeaderFlags,
    encode_header,
    parse_header,
)
from shared_memory_array._platform import backend
from shared_memory_array.testing import dtypes, shapes

FIXTURES = Path(__file__).parent / "fixtures"


def _array_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    strides = tuple(int(s) for s in np.empty(shape, dtype=dtype).strides)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return encode_header(BlockKind.ARRAY, dtype=dtype, shape=shape, strides=strides, nbytes=nbytes)


def _block(header: bytes, nbytes: int) -> bytes:
    return header + bytes(nbytes)


@given(dtypes(), shapes())
def test_array_header_round_trips(dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    """Every dtype (structured included) and shape survives encode -> parse unchanged."""
    header = _array_header(dtype, shape)
    assert len(header) % ALIGNMENT == 0
    parsed = parse_header(_block(header, dtype.itemsize * int(np.prod(shape))))
    assert parsed.dtype == dtype
    assert parsed.shape == shape
    assert parsed.data_offset == len(header)
    assert parsed.kind is BlockKind.ARRAY
    assert parsed.creator_pid == os.getpid()


def test_golden_v1_array_header_still_reads() -> None:
    """A committed v1 header of an aligned structured F-order array decodes to its values."""
    raw = (FIXTURES / "header_v1_array_structured_f.bin").read_bytes()
    parsed = parse_header(raw, expected_kind=BlockKind.ARRAY)
    expected = np.dtype([("id", "<u4"), ("pos", "<f8", (3,)), ("tag", "S5")], align=True)
    assert parsed.dtype == expected
    assert parsed.dtype.itemsize == 40
    assert parsed.shape == (4, 2)
    assert parsed.strides == (40, 160)
    assert parsed.fortran_order
    assert parsed.generation == 3
    assert (parsed.creator_pid, parsed.creator_start) == (4242, 987654321)
    assert parsed.data_offset == 192
    assert raw[:8] == MAGIC


def test_golden_v1_codec_header_still_reads() -> None:
    """A committed v1 codec header decodes with its kind-specific extra bytes."""
    raw = (FIXTURES / "header_v1_codec.bin").read_bytes()
    parsed = parse_header(raw, expected_kind=BlockKind.CODEC)
    assert parsed.dtype is None
    assert parsed.extra == b"codec-extra"
    assert parsed.nbytes == 100


@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_are_rejected(data: bytes) -> None:
    """Arbitrary bytes never parse as a header."""
    with pytest.raises(LayoutError):
        parse_header(data)


def test_every_truncation_is_rejected() -> None:
    """A block cut anywhere inside its header or payload raises LayoutError."""
    full = _block(_array_header(np.dtype("f8"), (3, 5)), 120)
    for cut in range(len(full)):
        with pytest.raises(LayoutError):
            parse_header(full[:cut])
    assert parse_header(full).nbytes == 120


def test_flipped_bit_fails_the_checksum() -> None:
    """Changing any single header byte without resealing is caught by the CRC."""
    header = bytearray(_array_header(np.dtype("i4"), (2, 2)))
    header[FIXED_SIZE] ^= 0x01
    with pytest.raises(LayoutError, match="checksum"):
        parse_header(bytes(header) + bytes(16))


GOOD = _array_header(np.dtype("<i8"), (4,))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", 4, "version 4"),
        ("kind", 99, "unknown block kind 99"),
        ("flags", 0x80, "unknown header flags"),
        ("area_words", 1, "lifetime area of 8 bytes"),
        ("name_len", 5000, "name of 5000 bytes"),
        ("ndim", 65, "ndim 65"),
        ("header_size", 4096, "header_size 4096"),
        ("header_size", 65, "header_size 65"),
        ("descr_len", 1 << 20, "too long"),
        ("extra_len", 10_000, "header fields need"),
        ("data_offset", 100, "data_offset 100"),
        ("nbytes", 1 << 40, "exceeds"),
    ],
)
def test_resealed_hostile_field_is_rejected(field: str, value: int, message: str) -> None:
    """A header with one bad field and a valid checksum raises LayoutError naming the field."""
    with pytest.raises(LayoutError, match=message):
        parse_header(bytes(with_field(GOOD, field, value)) + bytes(32))


def test_shape_claiming_more_than_the_payload_is_rejected() -> None:
    """A shape whose elements do not fit in the payload raises LayoutError, nothing is mapped."""
    raw = bytearray(GOOD)
    struct.pack_into("<q", raw, FIXED_SIZE, 1 << 40)  # shape[0]
    with pytest.raises(LayoutError, match="addresses"):
        parse_header(bytes(reseal(raw)) + bytes(32))


def test_negative_dimension_is_rejected() -> None:
    """A negative shape entry raises LayoutError."""
    raw = bytearray(GOOD)
    struct.pack_into("<q", raw, FIXED_SIZE, -1)
    with pytest.raises(LayoutError, match="negative dimension"):
        parse_header(bytes(reseal(raw)) + bytes(32))


def test_object_dtype_is_never_mapped() -> None:
    """A header claiming an object dtype is refused: mapping pointers would crash."""
    raw = bytearray(GOOD)
    descr_at = FIXED_SIZE + 16
    assert raw[descr_at : descr_at + 5] == b"'<i8'"
    raw[descr_at : descr_at + 5] = b"'|O' "
    with pytest.raises(LayoutError, match="Python objects"):
        parse_header(bytes(reseal(raw)) + bytes(32))


def test_garbage_dtype_description_is_rejected() -> None:
    """An unparsable dtype description raises LayoutError quoting it."""
    raw = bytearray(GOOD)
    descr_at = FIXED_SIZE + 16
    raw[descr_at : descr_at + 5] = b"'<q9'"
    with pytest.raises(LayoutError, match="unreadable dtype"):
        parse_header(bytes(reseal(raw)) + bytes(32))


def test_wrong_kind_is_rejected_when_a_kind_is_expected() -> None:
    """Reading an array block as a dict block raises LayoutError naming both kinds."""
    with pytest.raises(LayoutError, match="'array', not 'dict'"):
        parse_header(GOOD + bytes(32), expected_kind=BlockKind.DICT)


def test_flags_round_trip() -> None:
    """The Fortran-order flag is stored and read back."""
    header = encode_header(
        BlockKind.ARRAY,
        dtype=np.dtype("u1"),
        shape=(2, 3),
        strides=(1, 2),
        nbytes=6,
        flags=HeaderFlags.READY | HeaderFlags.F_ORDER,
    )
    assert parse_header(header + bytes(6)).fortran_order


def test_golden_v2_array_header_reads() -> None:
    """A committed v2 header decodes with its block id and its lifetime area before the data."""
    raw = (FIXTURES / "header_v2_array_structured_f.bin").read_bytes()
    parsed = parse_header(raw, expected_kind=BlockKind.ARRAY)
    expected = np.dtype([("id", "<u4"), ("pos", "<f8", (3,)), ("tag", "S5")], align=True)
    assert parsed.version == 2
    assert parsed.dtype == expected
    assert parsed.shape == (4, 2)
    assert parsed.strides == (40, 160)
    assert parsed.fortran_order
    assert parsed.generation == 3
    assert (parsed.creator_pid, parsed.creator_start) == (4242, 987654321)
    assert parsed.block_id == bytes(range(16))
    assert parsed.lifetime_offset == parsed.header_size
    assert parsed.data_offset == parsed.header_size + 64
    assert raw[parsed.header_size : parsed.data_offset] == bytes(64)  # lifetime words, zero


def test_golden_v3_array_header_reads_and_is_what_this_version_writes() -> None:
    """A committed v3 header decodes with its name and 512-byte area, and encodes the same."""
    raw = (FIXTURES / "header_v3_array_structured_f.bin").read_bytes()
    parsed = parse_header(raw, expected_kind=BlockKind.ARRAY)
    expected = np.dtype([("id", "<u4"), ("pos", "<f8", (3,)), ("tag", "S5")], align=True)
    assert parsed.version == 3
    assert parsed.dtype == expected
    assert (parsed.shape, parsed.strides, parsed.fortran_order) == ((4, 2), (40, 160), True)
    assert parsed.generation == 3
    assert (parsed.creator_pid, parsed.creator_start) == (4242, 987654321)
    assert parsed.block_id == bytes(range(16))
    assert parsed.name == "golden_v3_array"
    assert parsed.area_size == 512
    assert parsed.data_offset == parsed.header_size + 512
    assert parsed.nbytes == 320
    again = encode_header(
        BlockKind.ARRAY,
        dtype=expected,
        shape=(4, 2),
        strides=(40, 160),
        nbytes=320,
        generation=3,
        name="golden_v3_array",
        creator=(4242, 987654321),
        block_id=bytes(range(16)),
        flags=HeaderFlags.READY | HeaderFlags.F_ORDER,
    )
    if not backend.lock_files:  # (the portable backend adds its PORTABLE flag)
        assert again == raw[: parsed.data_offset]  # the format has not drifted
