"""Token: the string :func:`~shared_memory_array.write` returns, typed by what was written.

A token is an ordinary ``str`` at run time (it compares, hashes, prints,
serialises and crosses process boundaries as one). For a type checker it also
carries the type of the object written, so that ``read(write(x))`` has the
type of ``x``, the way ``ray.get(ObjectRef[R])`` gives ``R``.
"""

from __future__ import annotations

from typing import Any, Generic

from typing_extensions import TypeVar

__all__ = ["Token"]

_T_co = TypeVar("_T_co", covariant=True, default=Any)


class Token(str, Generic[_T_co]):
    """A ``str`` naming an object written by :func:`~shared_memory_array.write`.

    Generic in the written object's type: ``write(obj: T)`` returns
    ``Token[T]`` and ``read(Token[T])`` returns ``T``. Any ``str`` holding a
    token is accepted by :func:`~shared_memory_array.read` too (typed
    ``Any``), so tokens sent through queues, files or environment variables as
    plain strings still work.

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
