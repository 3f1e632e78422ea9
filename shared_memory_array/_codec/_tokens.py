"""Tokens: what :func:`~shared_memory_array.write` returns, and their grammar.

A token is an ASCII string, ``SMA1:<mode>:<payload>``:

* ``SMA1:s:<block name>:<generation, hex>:<block id, 32 hex>:<shm identity, 16 hex>``
  -- shared; printable, under 100 characters. The block id (from the header)
  tells the block from another of the same name; the identity
  (:mod:`.._identity`) tells this host's shared memory from another's, so a
  token read elsewhere raises instead of reading a stranger.
* ``SMA1:i:<crc32, 8 hex><hex>`` -- inline pickle stream without out-of-band buffers.
* ``SMA1:f:<crc32, 8 hex><hex>`` -- inline *frame*: buffer table, stream and
  buffers (:func:`._pickling.inline_frame`).

Inline payloads carry the CRC-32 of their bytes, checked before anything is
unpickled: a damaged token is a :class:`~shared_memory_array.LayoutError`,
never bytes handed to numpy's or pickle's constructors (fuzzing found inputs
there that crash or hang the reader).

Inline payloads are hex, not base64: the token must be ASCII, and encoding plus
decoding a 10 KB pickle takes ~15 us with ``bytes.hex``/``bytes.fromhex`` (a
little less than ``binascii.hexlify`` + ``decode``, which copies once more)
on CPython 3.10, 3.11 and 3.13, against 27 us (3.10) to 40 us (3.11, 3.13)
with ``b2a_base64``/``a2b_base64``; numpy-, ``bytes.translate``- and
``unicode_escape``-based encodings measured no faster (the last 1.5x to 6x
slower). Hex is twice the input's size (base64 4/3), which only matters below
``threshold``.

:class:`Token` is the ``str`` subclass :func:`~shared_memory_array.write`
returns, typed by the object written.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Final, Generic

from typing_extensions import TypeVar

from .._block import GENERATED_NAME_PATTERN, PREFIX
from .._header import BLOCK_ID_SIZE
from .._identity import IDENTITY_LENGTH
from ..errors import LayoutError

__all__ = [
    "TOKEN_PREFIX",
    "SharedToken",
    "Token",
    "format_shared",
    "is_shared_token",
    "parse",
    "parse_shared",
    "seal",
    "unseal",
]

TOKEN_PREFIX: Final = "SMA1:"
MODE_SHARED: Final = "s"
MODE_INLINE: Final = "i"
MODE_FRAME: Final = "f"
_MODES: Final = frozenset((MODE_SHARED, MODE_INLINE, MODE_FRAME))
_SHARED_PREFIX: Final = f"{TOKEN_PREFIX}{MODE_SHARED}:"
_SHARED_TOKEN: Final = re.compile(
    re.escape(_SHARED_PREFIX)
    + f"({GENERATED_NAME_PATTERN}):([0-9a-f]{{1,16}}):([0-9a-f]{{{2 * BLOCK_ID_SIZE}}})"
    + f":([0-9a-f]{{{IDENTITY_LENGTH}}})"
)
_HEX_DIGITS: Final = frozenset("0123456789abcdef")

_T_co = TypeVar("_T_co", covariant=True, default=Any)


class Token(str, Generic[_T_co]):
    """A ``str`` naming an object written by :func:`~shared_memory_array.write`.

    Generic in the written object's type: ``write(obj: T)`` returns
    ``Token[T]`` and ``read(Token[T])`` returns ``T``, the way
    ``ray.get(ObjectRef[R])`` gives ``R``. At run time it is an ordinary
    ``str`` (it compares, hashes, prints and crosses process boundaries as
    one), and any ``str`` holding a token is accepted by
    :func:`~shared_memory_array.read` too (typed ``Any``), so tokens sent
    through queues, files or environment variables as plain strings still work.

    Examples
    --------
    >>> from shared_memory_array import read, write
    >>> token = write([1, 2, 3])
    >>> isinstance(token, str), read(token)
    (True, [1, 2, 3])
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[type[Token[Any]], tuple[str]]:
        """Pickle as a ``Token`` of the same text."""
        return (Token, (str(self),))


@dataclass(frozen=True)
class SharedToken:
    """The fields of a shared-memory token."""

    name: str
    generation: int
    block_id: bytes
    identity: str


def is_shared_token(obj: object) -> bool:
    """Whether ``obj`` is a token that names a shared-memory block (not an inline one)."""
    return isinstance(obj, str) and obj.startswith(_SHARED_PREFIX)


def parse(token: object) -> tuple[str, str]:
    """Split ``token`` into ``(mode, payload)``.

    Raises
    ------
    TypeError
        ``token`` is not a str.
    LayoutError
        It is not a token of this library, or of an unknown mode.
    """
    if not isinstance(token, str):
        raise TypeError(f"a token must be a str, not {type(token).__name__}")
    head = len(TOKEN_PREFIX) + 2
    if not token.startswith(TOKEN_PREFIX) or len(token) < head or token[head - 1] != ":":
        raise LayoutError(
            f"{token[:60]!r} is not a shared_memory_array token "
            f"(expected '{TOKEN_PREFIX}<mode>:<payload>')"
        )
    mode = token[len(TOKEN_PREFIX)]
    if mode not in _MODES:
        raise LayoutError(f"token {token[:60]!r} has unknown mode {mode!r}")
    return mode, token[head:]


def format_shared(name: str, generation: int, block_id: bytes, identity: str) -> str:
    """The token of generation ``generation`` of codec block ``name``."""
    return f"{_SHARED_PREFIX}{name}:{generation:x}:{block_id.hex()}:{identity}"


def parse_shared(token: str) -> SharedToken:
    """The fields of a shared-memory token; LayoutError if it is malformed."""
    match = _SHARED_TOKEN.fullmatch(token)
    if match is None:
        raise LayoutError(
            f"malformed shared-memory token {token[:80]!r} (expected "
            f"'{_SHARED_PREFIX}{PREFIX}<16 hex digits>:<generation in hex>:"
            "<block id, 32 hex digits>:<shm identity, 16 hex digits>')"
        )
    return SharedToken(match[1], int(match[2], 16), bytes.fromhex(match[3]), match[4])


def seal(framed: bool, data: bytes | bytearray) -> str:
    """The inline token of ``data``: ``SMA1:<i or f>:<crc32, 8 hex digits><data as hex>``."""
    # bytes.hex() makes the str directly: one pass fewer than hexlify + decode.
    mode = MODE_FRAME if framed else MODE_INLINE
    return f"{TOKEN_PREFIX}{mode}:{zlib.crc32(data):08x}{data.hex()}"


def unseal(payload: str) -> bytes:
    """The bytes of an inline payload, checked against its CRC-32 before anyone unpickles them.

    Raises
    ------
    LayoutError
        The payload is not hex, truncated, or its checksum does not match.
    """
    stored_text = payload[:8]
    if len(stored_text) < 8 or not _HEX_DIGITS.issuperset(stored_text):
        raise LayoutError("malformed inline token: no checksum")
    body = payload[8:]
    if len(body) % 2:
        raise LayoutError(
            f"inline token is truncated: its payload has an odd number of hex digits "
            f"({len(body)}); was the token cut short?"
        )
    try:
        data = bytes.fromhex(body)
    except ValueError:  # a non-hex or non-ASCII character
        bad = next((c for c in body if c not in _HEX_DIGITS), "?")
        raise LayoutError(f"malformed inline token: {bad!r} is not a lowercase hex digit") from None
    if len(data) * 2 != len(body):  # fromhex skips whitespace: a token never holds any
        raise LayoutError("malformed inline token: whitespace in the payload")
    stored, actual = int(stored_text, 16), zlib.crc32(data)
    if actual != stored:
        raise LayoutError(
            f"inline token is damaged: checksum {actual:08x} does not match the stored "
            f"{stored:08x} (truncated or altered)"
        )
    return data
