"""Child-process code for the codec tests: importable under spawn, and runnable as a script.

Script use (``python _children_codec.py COMMAND [ARG]``), so the parent can check stderr:

* ``read TOKEN`` -- read the token, print ``<type name> <sum of the data>``;
* ``write N`` -- write ``np.arange(N, dtype="f8")`` to shared memory, print the
  token, exit without releasing it;
* ``release TOKEN`` -- release the token.
"""

from __future__ import annotations

import sys
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

import numpy as np

import shared_memory_array as sma


def checksum(obj: object) -> float:
    """Sum of the data in an array, bytes-like object or a dict/list of them."""
    if isinstance(obj, dict):
        return sum(checksum(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(checksum(value) for value in obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return float(sum(bytes(obj)))
    return float(np.asarray(obj, dtype="f8").sum())


def read_checksum(token: str) -> float:
    """Read ``token`` in this process and return the checksum of what came back."""
    return checksum(sma.read(token))


def read_and_release(token: str) -> float:
    """Read ``token``, release it from this (non-writing) process, return the checksum."""
    value = checksum(sma.read(token))
    sma.release(token)
    return value


def hold_view(token: str, results: Queue[float], done: Event) -> None:
    """Read ``token`` and keep the array until ``done``; report its checksum before and after."""
    array = sma.read(token)
    results.put(checksum(array))
    done.wait(60)
    results.put(checksum(array))


def write_one_block(results: Queue[str]) -> None:
    """Write an array to shared memory, report the token, exit without releasing it."""
    results.put(sma.write(np.arange(100, dtype="f8"), threshold=0))


def load_shared_data(name: str) -> tuple[float, bool, bool]:
    """``SharedData.load`` twice: checksum, whether the cache returned the same object, writable."""
    first = sma.SharedData.load(name)
    second = sma.SharedData.load(name)
    return checksum(first), first is second, bool(np.asarray(first).flags.writeable)


def main(argv: list[str]) -> None:
    """Run one script command (see the module docstring)."""
    command, argument = argv[0], argv[1]
    if command == "read":
        obj = sma.read(argument)
        print(type(obj).__name__, checksum(obj))
    elif command == "write":
        print(sma.write(np.arange(int(argument), dtype="f8"), threshold=0))
    elif command == "release":
        sma.release(argument)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
