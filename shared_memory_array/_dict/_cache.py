"""A handle's read cache: values read at one version of the dict, valid while it is unchanged.

Any change of the dict by any process bumps its ``version`` (:mod:`._journal`),
so a read served from here is never older than the last completed write. The
facade checks the version and looks a key up inline (its hottest path); what
is kept, and how, is decided here:

* only keys whose dict equality matches canonical-bytes equality
  (:data:`CACHEABLE_KEYS`: exact ``str``, ``int``, ``bytes``, ``float``,
  ``bool``, ``None``) are cached by the key object itself;
* immutable values (scalars, and tuples and frozensets of them) are cached as
  the objects; other values as their pickle (:class:`Pickled`), so every read
  of a mutable value gets a fresh object; values over :data:`MAX_VALUE` bytes
  are not cached;
* :data:`ABSENT` caches "no such key".
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ABSENT", "CACHEABLE_KEYS", "MAX_ITEMS", "MAX_VALUE", "Pickled", "remember"]

MAX_ITEMS: Final = 1 << 16
MAX_VALUE: Final = 4096
CACHEABLE_KEYS: Final = frozenset({str, int, bytes, float, bool, type(None)})
_IMMUTABLE_VALUES: Final = frozenset({str, int, bytes, float, bool, complex, type(None)})
_CONTAINERS: Final = frozenset({tuple, frozenset})
_MAX_NESTING: Final = 8
ABSENT: Final[Any] = object()  # cached "no such key"


class Pickled(bytes):
    """A cached value kept as its pickle: each read gets a fresh object."""


def _immutable(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is a tuple or frozenset made of immutable scalars, recursively.

    Such a value may be cached as the object itself: no reader can change it.
    Only the exact types count (a subclass may carry mutable attributes).
    """
    if type(value) in _IMMUTABLE_VALUES:
        return True
    if type(value) in _CONTAINERS and depth < _MAX_NESTING:
        return all(_immutable(item, depth + 1) for item in value)  # type: ignore[attr-defined]
    return False


def remember(cache: dict[object, object], key: object, value: object, data: bytes) -> None:
    """Cache ``key -> value`` (``data``: its pickle, or raw bytes for a raw number)."""
    if len(cache) >= MAX_ITEMS:
        cache.clear()
    if type(value) in _IMMUTABLE_VALUES or value is ABSENT:
        cache[key] = value
    elif len(data) > MAX_VALUE:
        cache.pop(key, None)
    elif type(value) in _CONTAINERS and _immutable(value):
        cache[key] = value  # a tuple of scalars: hits need not unpickle
    else:
        cache[key] = Pickled(data)
