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
complex       C     real and imaginary part as two doubles (``-0.0`` as ``0.0``,
                    NaN canonical); with a zero imaginary part, as its real part
str           S     UTF-8 (lone surrogates allowed)
bytes         B     the bytes
tuple         T     each element's encoding, prefixed by its length (uint32)
frozenset     Z     the elements' encodings, sorted, each prefixed by its length
Enum member   E     the class (length-prefixed module, length-prefixed qualified
                    name), then ``.`` + the member's name, or ``#`` + the value's
                    int encoding for a ``Flag``
dataclass     D     the class as for E, then the T encoding of the fields that
                    take part in ``==`` (frozen dataclasses with ``eq=True``)
============  ====  ============================================================

Subclasses of int, float, complex, str, bytes, tuple (named tuples) and
frozenset encode as their base type's value, as they compare in a dict: an
``IntEnum`` member is its int, and a ``class Color(str, Enum)`` member is its
string (never its ``__str__``, which an Enum changes). The value is read through
the base type itself, so a subclass's own ``__str__``, ``__int__`` or
``__iter__`` cannot change a key. A numpy scalar encodes as the Python scalar its ``item()``
gives (``np.int64(1)`` is ``1``; ``np.float32(0.1)`` is the double it holds).
Every other key raises ``TypeError`` naming its type: a key compared by its
pickle would not be portable (a frozenset's pickle depends on the hash seed).
So does an Enum member or a dataclass whose class cannot be found again by
its module and qualified name (one defined inside a function): every process
must be able to turn the stored key back into that class's object.

:func:`encode_key` also says whether :func:`decode_key` gives back an object of
the very same types (``exact``); when not (a bool, an integral float, a
subclass), the dict stores the key's pickle too, so iteration returns the key
as it was first inserted, as a dict does.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import math
import struct
import zlib
from typing import Any, Final

import numpy as np

__all__ = ["decode_key", "encode_key", "key_hash"]

_LENGTH = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_CANONICAL_NAN: Final = b"F" + _DOUBLE.pack(math.nan)
_MAX_DEPTH: Final = 100


def key_hash(encoded: bytes) -> int:
    """Return the 32-bit hash of canonical key bytes (CRC-32: fast, unsalted)."""
    return zlib.crc32(encoded)


_PYTHON_SCALARS: Final = (bool, int, float, complex, str, bytes)


def _encode_int(value: int) -> bytes:
    return b"I" + value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)


def _encode_float(number: float, exact: bool) -> tuple[bytes, bool]:
    if number.is_integer():
        return _encode_int(int(number)), False
    if math.isnan(number):
        return _CANONICAL_NAN, exact
    return b"F" + _DOUBLE.pack(number), exact


def _part(number: float) -> bytes:
    """A canonical double for one part of a complex number."""
    if math.isnan(number):
        return _DOUBLE.pack(math.nan)
    return _DOUBLE.pack(number + 0.0)  # -0.0 + 0.0 is 0.0


def _type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _class_path(kind: type) -> bytes:
    # A spawned process runs the parent's main module as __mp_main__: the same classes.
    module = "__main__" if kind.__module__ == "__mp_main__" else kind.__module__
    parts = [module.encode(), kind.__qualname__.encode()]
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


_COMPLEX_REAL: Final[Any] = complex.real
_COMPLEX_IMAG: Final[Any] = complex.imag


@functools.lru_cache(maxsize=512)
def _findable(kind: type) -> bool:
    """Whether ``kind`` is found again by importing its module and walking its qualified name."""
    if "<locals>" in kind.__qualname__:
        return False
    module = "__main__" if kind.__module__ == "__mp_main__" else kind.__module__
    try:
        found: Any = importlib.import_module(module)
        for part in kind.__qualname__.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError):
        return False
    return found is kind


def _check_findable(kind: type) -> None:
    if not _findable(kind):
        raise TypeError(
            f"SharedDict keys of class {_type_name(kind)} cannot be stored: the class cannot be "
            f"found again by its module and qualified name (is it defined inside a "
            f"function?), so no process could read the key back"
        )


def _is_value_dataclass(key: object) -> bool:
    """Whether ``key`` is a frozen dataclass instance compared by its fields."""
    params = getattr(type(key), "__dataclass_params__", None)
    return params is not None and params.frozen and params.eq and dataclasses.is_dataclass(key)


def _unsupported(key: object) -> TypeError:
    return TypeError(
        f"SharedDict keys must be None, bool, int, float, complex, str, bytes, numpy "
        f"scalars, Enum members, or tuples, frozensets and frozen dataclasses of them; "
        f"not {_type_name(type(key))}"
    )


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
    # Subclasses: the base type's own value, never what the subclass makes of it.
    if isinstance(key, int):  # bool, IntEnum, IntFlag, any int subclass
        return _encode_int(int.__index__(key)), False
    if isinstance(key, float):
        return _encode_float(float.__float__(key), kind is float)
    if isinstance(key, complex):
        real, imag = _COMPLEX_REAL.__get__(key), _COMPLEX_IMAG.__get__(key)
        if imag == 0:
            return _encode_float(real, False)
        return b"C" + _part(real) + _part(imag), kind is complex
    if isinstance(key, str):  # a str subclass, a (str, Enum) member
        return b"S" + str.__str__(key).encode("utf-8", "surrogatepass"), False
    if isinstance(key, bytes):
        return b"B" + bytes(memoryview(key)), False
    if isinstance(key, tuple):
        parts = [b"T"]
        exact = kind is tuple
        for item in tuple.__iter__(key):
            encoded, item_exact = _encode(item, depth + 1)
            parts.append(_LENGTH.pack(len(encoded)))
            parts.append(encoded)
            exact = exact and item_exact
        return b"".join(parts), exact
    if isinstance(key, frozenset):
        encodings = []
        exact = kind is frozenset
        for item in frozenset.__iter__(key):
            encoded, item_exact = _encode(item, depth + 1)
            encodings.append(encoded)
            exact = exact and item_exact
        encodings.sort()
        return b"Z" + b"".join(_LENGTH.pack(len(e)) + e for e in encodings), exact
    if isinstance(key, enum.Enum):
        _check_findable(kind)
        if isinstance(key, enum.Flag):
            member = b"#" + _encode_int(int(key.value))
        else:
            member = b"." + key.name.encode()
        return b"E" + _class_path(kind) + member, True
    if isinstance(key, np.generic) and not isinstance(key, np.void):
        item = key.item()
        if type(item) in _PYTHON_SCALARS:
            return _encode(item, depth + 1)[0], False
    elif _is_value_dataclass(key):
        _check_findable(kind)
        fields = tuple(getattr(key, f.name) for f in dataclasses.fields(key) if f.compare)  # type: ignore[arg-type]
        return b"D" + _class_path(kind) + _encode(fields, depth + 1)[0], False
    raise _unsupported(key)


def encode_key(key: object) -> tuple[bytes, bool]:
    """Return ``(canonical bytes, exact)`` for ``key``.

    ``exact`` is true when :func:`decode_key` of the bytes returns an object of
    the same types as ``key`` (so the key need not be stored separately).

    Raises
    ------
    TypeError
        ``key`` (or a part of it) is not of a kind listed in the module
        docstring; the message names its type.
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


def _class_at(encoded: bytes, start: int) -> tuple[Any, int]:
    """The class whose path starts at ``encoded[start]``, and where the path ends."""
    names = []
    at = start
    for _ in range(2):
        (length,) = _LENGTH.unpack_from(encoded, at)
        names.append(encoded[at + 4 : at + 4 + length].decode())
        at += 4 + length
    found: Any = importlib.import_module(names[0])
    for part in names[1].split("."):
        found = getattr(found, part)
    return found, at


def decode_key(encoded: bytes) -> object:
    """Return a key equal to the one :func:`encode_key` turned into ``encoded``.

    It is the very key (same types) when ``encode_key`` said ``exact``. A
    dataclass key comes back with its compared fields only.

    Raises
    ------
    ValueError
        ``encoded`` is not a canonical key encoding.
    ImportError, AttributeError
        The class of an Enum or dataclass key cannot be imported here.
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
    if tag == b"C":
        return complex(*struct.unpack("<2d", encoded[1:17]))
    if tag == b"E":
        kind, at = _class_at(encoded, 1)
        if encoded[at : at + 1] == b"#":
            return kind(decode_key(encoded[at + 1 :]))
        return kind[encoded[at + 1 :].decode()]
    if tag == b"D":
        kind, at = _class_at(encoded, 1)
        values = decode_key(encoded[at:])
        key = object.__new__(kind)
        compared = [f.name for f in dataclasses.fields(kind) if f.compare]
        for name, value in zip(compared, values, strict=True):  # type: ignore[call-overload]
            object.__setattr__(key, name, value)
        return key
    raise ValueError(f"not a canonical key encoding (tag {tag!r})")
