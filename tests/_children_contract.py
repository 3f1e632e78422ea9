"""The kinds of block of the lifetime contract suite (``test_contract.py``), and its child.

Each kind is made, opened, read and ended the way its users do: a
``SharedArray``, a ``SharedDict``, a codec token (``write``/``read``/``release``)
and a ``SharedData`` broadcast. Run as a script it is the other process of a
test, driven by lines on stdin::

    python _children_contract.py make KIND       prints the reference, then serves
    python _children_contract.py hold KIND REF   opens REF, prints "held", then serves

Serving: ``read`` prints the checksum of the data, ``end`` ends the object
explicitly and prints ``ended``; end of input exits normally.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Final

import numpy as np

import shared_memory_array as sma
from shared_memory_array._codec._tokens import parse_shared
from shared_memory_array._platform import PREFIX, backend

KINDS: Final = ("array", "dict", "codec", "shared_data")
PICKLED_HANDLES: Final = ("array", "dict")
"""Kinds whose handles pickle (the others pass a name or a token, a plain string)."""
DATA: Final = np.arange(100_000, dtype=np.float64)
CHECKSUM: Final = float(DATA.sum())
_counter = itertools.count()


def make(kind: str) -> tuple[Any, str]:
    """A new object of ``kind`` holding :data:`DATA`, owned here, and its reference."""
    if kind == "array":
        array = sma.SharedArray.copy(None, DATA)
        return array, array.name
    if kind == "dict":
        name = f"contract_{os.getpid()}_{next(_counter)}"
        shared: sma.SharedDict[str, Any] = sma.SharedDict.create(name, max_items=8)
        shared["data"] = DATA
        return shared, name
    if kind == "codec":
        token = sma.write(DATA, threshold=0)
        return token, str(token)
    if kind == "shared_data":
        broadcast = sma.SharedData(DATA).__enter__()
        return broadcast, broadcast.name
    raise ValueError(kind)


def open_ref(kind: str, ref: str) -> Any:
    """Open (attach, read, load) the object ``ref`` of ``kind``: this process holds it then."""
    if kind == "array":
        return sma.SharedArray.attach(ref)
    if kind == "dict":
        return sma.SharedDict.attach(ref)
    if kind == "codec":
        return sma.read(ref)
    if kind == "shared_data":
        return sma.SharedData.load(ref)
    raise ValueError(kind)


def checksum(kind: str, obj: Any) -> float:
    """The sum of the data ``obj`` (made or opened) holds."""
    if kind == "dict":
        return float(obj["data"].sum())
    if kind == "codec" and isinstance(obj, str):
        return float(sma.read(obj).sum())
    if kind == "shared_data" and isinstance(obj, sma.SharedData):
        return float(sma.SharedData.load(obj.name).sum())
    return float(np.asarray(obj).sum())


def end(kind: str, obj: Any) -> None:
    """The explicit end of ``kind``'s owner: close, release, leaving ``with``."""
    if kind in ("array", "dict"):
        obj.close()
    elif kind == "codec":
        sma.release(obj)
    elif kind == "shared_data":
        obj.__exit__(None, None, None)
    else:
        raise ValueError(kind)


def block_names(kind: str, ref: str) -> list[str]:
    """The names of every block the object ``ref`` uses (a dict's data blocks too)."""
    if kind == "codec":
        return [parse_shared(ref).name]
    if kind == "dict":  # its data blocks: <entry>~<tag>~<generation>, whatever the tag
        entry = ref if ref.startswith(PREFIX) else PREFIX + ref
        data_prefix = backend.system_name(entry) + "~"
        return [entry, *(name for name in backend.list_names() if name.startswith(data_prefix))]
    return [ref]


def _serve(kind: str, obj: Any) -> None:
    for line in sys.stdin:
        command = line.strip()
        if command == "read":
            print(checksum(kind, obj), flush=True)
        elif command == "end":
            end(kind, obj)
            print("ended", flush=True)


def main() -> None:
    role, kind = sys.argv[1], sys.argv[2]
    if role == "make":
        obj, ref = make(kind)
        print(ref, flush=True)
    else:
        obj = open_ref(kind, sys.argv[3])
        checksum(kind, obj)  # the data is really mapped and read
        print("held", flush=True)
    _serve(kind, obj)


if __name__ == "__main__":
    main()
