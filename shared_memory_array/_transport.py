"""By-handle and by-value forms of the library's handles, shared by the engine adapters.

A *handle* (a :class:`SharedArray`, a :class:`SharedDict`, a shared-memory
token) names a block in the sender's /dev/shm. A receiver that sees the same
/dev/shm gets it *by handle*: its ordinary pickle (the name; the receiver
attaches). Any other receiver gets it *by value*: the reduce tuples below carry
the data itself, numpy data as pickle-5 out-of-band buffers (the engine sends
them as its own frames, with no copy on the sender), and rebuild an object of
the same kind in the receiver's own /dev/shm, owned by the receiver:

* a :class:`SharedArray` becomes a new ``SharedArray`` (same shape, dtype and
  memory order) that the receiver owns: it is unlinked when the receiver
  closes it or drops it;
* a :class:`SharedDict` becomes a new ``SharedDict`` named ``<name>-<8 hex>``
  with the same items, ``max_items`` and heap size, owned by the receiver;
* a shared-memory token becomes a new token of the receiver's, written with
  :func:`write`: a :class:`ReceivedToken`, whose block is released when the
  token object is garbage collected (when the task that received it is done
  with it). A task cannot release it itself: it cannot tell such a copy from
  the sender's own token, which it must not release. The copy's block lives
  as long as the object (``str(token)`` made from it names a block that goes
  with the object); arrays already read from it stay valid after.

Writes to a by-value copy stay on the receiver's side.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _codec
from ._array import SharedArray
from ._block import PREFIX
from ._codec import Token, is_shared_token
from ._dict import SharedDict

__all__ = [
    "HANDLE_TYPES",
    "ReceivedToken",
    "by_handle",
    "by_value",
    "is_shared_token",
]


class ReceivedToken(Token[Any]):
    """The token of a by-value copy this process received: the copy goes with this object.

    Made by :func:`_token_from_value` only. It reads, compares and pickles as
    the :class:`Token` it is (pickled, it becomes a plain ``Token`` that does
    not release anything); garbage collected, it releases its block (through
    the writer's lock-free queue: a finalizer may run anywhere).
    """

    # Not slotted: the finalizer needs a weak reference.


# The codec returns tokens of a str subclass (API.md section 2); a plain str
# cannot be told from any other string by type, so only a Token is adapted.
# Engines look their reducers up by exact type: a ReceivedToken is listed too.
HANDLE_TYPES: tuple[type[Any], ...] = (SharedArray, SharedDict, Token, ReceivedToken)


def by_handle(obj: Any) -> Any:
    """The object's own reduce tuple: the receiver attaches by name."""
    if isinstance(obj, Token):
        return (Token, (str(obj),))
    return obj.__reduce_ex__(5)


def by_value(obj: Any) -> Any:
    """A reduce tuple that carries the data and rebuilds it in the receiver's /dev/shm."""
    if isinstance(obj, SharedArray):
        return (_array_from_value, (obj.as_array(),))
    if isinstance(obj, SharedDict):
        stats = obj.stats()
        with obj.lock():
            items = list(obj.items())
        return (
            _dict_from_value,
            (obj.name, int(stats["max_items"]), int(stats["heap_size"]), items),
        )
    if is_shared_token(obj):
        return (_token_from_value, (_codec.read(obj),))
    return by_handle(obj)  # an inline token carries its value already


def _array_from_value(array: NDArray[Any]) -> SharedArray:
    return SharedArray.copy(None, np.asarray(array))


def _dict_from_value(
    name: str, max_items: int, heap_size: int, items: list[tuple[Any, Any]]
) -> SharedDict:
    base = name.removeprefix(PREFIX)[:180]
    copy = SharedDict.create(f"{base}-{uuid.uuid4().hex[:8]}", max_items, heap_size)
    try:
        copy.update(items)
    except BaseException:
        copy.close()
        raise
    return copy


def _token_from_value(obj: object) -> str:
    token = _codec.write(obj)
    if not is_shared_token(token):
        return token  # inline: nothing to release
    received = ReceivedToken(token)
    finalizer = weakref.finalize(received, _codec.release_soon, str(token))
    finalizer.atexit = False  # at exit the block goes with its writer anyway
    return received
