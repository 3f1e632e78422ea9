"""Canonical key encoding: keys that are equal in a Python dict get equal bytes.

The built-in ``hash()`` of ``str`` and ``bytes`` is salted per process
(``PYTHONHASHSEED``), so a table shared between processes cannot use it. Every
key is turned into canonical bytes instead; keys compare by those bytes and hash
by :func:`key_hash` of them, identically in every process and Python version.

Encoding (one type tag byte, then the body)
-------------------------------------------
============  ====  ============================================================
key           tag   body
============  ====  ============================================================
``None``      N     empty
int, bool     I     two's-complement little-endian, minimal length
float         F     IEEE 754 double, little-endian; an integral float encodes as
                    the int it equals, so ``1``, ``1.0`` and ``True`` are one key;
                    every NaN encodes as the one canonical NaN
str           S     UTF-8 (lone surrogates allowed)
bytes         B     the bytes
tuple         T     each element's encoding, prefixed by its length (uint32)
frozenset     Z     the elements' encodings, sorted, each prefixed by its length
other         P     ``pickle.dumps(key, protocol=4)``
============  ====  ============================================================

Subclasses of int, float, str, bytes, tuple and frozenset encode as their base
type, as they compare in a dict. Keys of other types are compared by their
pickle, so two such keys are one key exactly when they pickle identically.

:func:`encode_key` also says whether :func:`decode_key` gives back an object of
the very same types (``exact``); when not (a bool, an integral float, a
subclass), the dict stores the key's pickle too, so iteration returns the key
as it was first inserted, as a dict does.
"""

from __future__ import annotations

import math
import pickle
import struct
import zlib
from typing import Final

__all__ = ["decode_key", "encode_key", "key_hash"]

_LENGTH = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_CANONICAL_NAN: Final = b"F" + _DOUBLE.pack(math.nan)
_KEY_PICKLE_PROTOCOL: Final = 4
_MAX_DEPTH: Final = 100


def key_hash(encoded: bytes) -> int:
    """Return the 32-bit hash of canonical key bytes (CRC-32: fast, unsalted)."""
    return zlib.crc32(encoded)


def _encode_int(value: int) -> bytes:
    return b"I" + value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)


def _encode(key: object, depth: int) -> tuple[bytes, bool]:
    kind = type(key)
    # Exact types first: the common case costs one dict-free comparison.
    if kind is str:
        return b"S" + key.encode("utf-8", "surrogatepass"), True  # type: ignore[attr-defined]
    if kind is int:
        return _encode_int(key), True  # type: ignore[arg-type]
    if kind is bytes:
        return b"B" + key, True  # type: ignore[operator]
    if key is None:
        return b"N", True
    if depth > _MAX_DEPTH:
        raise ValueError(f"key nests deeper than {_MAX_DEPTH} levels")
    if isinstance(key, bool):
        return _encode_int(int(key)), False
    if isinstance(key, int):
        return _encode_int(int(key)), False
    if isinstance(key, float):
        number = float(key)
        if number.is_integer():
            return _encode_int(int(number)), False
        if math.isnan(number):
            return _CANONICAL_NAN, kind is float
        return b"F" + _DOUBLE.pack(number), kind is float
    if isinstance(key, str):
        return b"S" + str(key).encode("utf-8", "surrogatepass"), False
    if isinstance(key, bytes):
        return b"B" + bytes(key), False
    if isinstance(key, tuple):
        parts = [b"T"]
        exact = kind is tuple
        for item in key:
            encoded, item_exact = _encode(item, depth + 1)
            parts.append(_LENGTH.pack(len(encoded)))
            parts.append(encoded)
            exact = exact and item_exact
        return b"".join(parts), exact
    if isinstance(key, frozenset):
        encodings = []
        exact = kind is frozenset
        for item in key:
            encoded, item_exact = _encode(item, depth + 1)
            encodings.append(encoded)
            exact = exact and item_exact
        encodings.sort()
        return b"Z" + b"".join(_LENGTH.pack(len(e)) + e for e in encodings), exact
    hash(key)  # an unhashable key fails here with the usual TypeError
    return b"P" + pickle.dumps(key, protocol=_KEY_PICKLE_PROTOCOL), True


def encode_key(key: object) -> tuple[bytes, bool]:
    """Return ``(canonical bytes, exact)`` for ``key``.

    ``exact`` is true when :func:`decode_key` of the bytes returns an object of
    the same types as ``key`` (so the key need not be stored separately).

    Raises
    ------
    TypeError
        ``key`` is unhashable.
    pickle.PicklingError, AttributeError, TypeError
        A key of another type cannot be pickled.
    ValueError
        ``key`` nests tuples or frozensets more than 100 levels deep.
    """
    kind = type(key)
    if kind is str:  # the common case, without a second call
        return b"S" + key.encode("utf-8", "surrogatepass"), True  # type: ignore[attr-defined]
    return _encode(key, 0)


def _split(body: bytes, start: int) -> list[bytes]:
    items = []
    at = start
    while at < len(body):
        (length,) = _LENGTH.unpack_from(body, at)
        at += 4
        items.append(body[at : at + length])
        at += length
    return items


def decode_key(encoded: bytes) -> object:
    """Return the key that :func:`encode_key` turned into ``encoded``.

    Raises
    ------
    ValueError
        ``encoded`` is not a canonical key encoding.
    """
    tag = encoded[:1]
    if tag == b"S":
        return encoded[1:].decode("utf-8", "surrogatepass")
    if tag == b"I":
        return int.from_bytes(encoded[1:], "little", signed=True)
    if tag == b"B":
        return encoded[1:]
    if tag == b"N":
        return None
    if tag == b"F":
        return _DOUBLE.unpack(encoded[1:])[0]
    if tag == b"T":
        return tuple(decode_key(item) for item in _split(encoded, 1))
    if tag == b"Z":
        return frozenset(decode_key(item) for item in _split(encoded, 1))
    if tag == b"P":
        return pickle.loads(encoded[1:])
    raise ValueError(f"not a canonical key encoding (tag {tag!r})")
