"""Canonical keys: equal keys are one key, in every process (issue 17 items 9 and 10).

``_dict/_keys.py`` encodes keys; these tests pin the encodings of subclasses of
the built-in key types, and the refusal of keys whose class cannot be found again.
"""

from __future__ import annotations

import dataclasses
import enum
import multiprocessing
import os
from collections.abc import Iterator

import pytest

from shared_memory_array import SharedDict
from shared_memory_array._dict._keys import decode_key, encode_key

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

TIMEOUT = 60
_counter = iter(range(1 << 30))


class Color(str, enum.Enum):
    """A str mix-in Enum: ``Color.RED == "red"`` in a dict, though ``str(Color.RED)`` is not."""

    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Ratio(float, enum.Enum):
    HALF = 0.5


class Loud(str):
    """A str subclass whose __str__ lies: the key is its value, not its __str__."""

    def __str__(self) -> str:
        return self.upper()


class Odd(int):
    """An int subclass whose __int__ and __index__ lie."""

    def __int__(self) -> int:
        return 999

    def __index__(self) -> int:
        return 999


class Backwards(tuple):  # type: ignore[type-arg]
    """A tuple subclass whose iteration lies."""

    def __iter__(self) -> Iterator[object]:
        return iter(list(tuple.__iter__(self))[::-1])


@pytest.fixture
def shared() -> Iterator[SharedDict]:
    with SharedDict.create(f"keys_{os.getpid()}_{next(_counter)}", max_items=32) as d:
        yield d


def test_a_str_mixin_enum_member_is_its_string(shared: SharedDict) -> None:
    """d[Color.RED] and d["red"] are one entry, as in a dict; "Color.RED" is another key."""
    plain: dict[object, int] = {Color.RED: 1, "red": 2}
    shared[Color.RED] = 1
    shared["red"] = 2
    assert len(shared) == len(plain) == 1
    assert shared[Color.RED] == plain[Color.RED] == 2
    assert "Color.RED" not in shared
    assert list(shared) == list(plain) == [Color.RED]  # the key as first inserted
    assert type(next(iter(shared))) is Color


def test_int_and_float_enums_and_subclasses_are_their_values(shared: SharedDict) -> None:
    """IntEnum, float Enum, bool and int subclasses compare by value, as in a dict."""
    shared[Level.LOW] = "low"
    shared[1] = "one"
    shared[True] = "true"
    shared[Ratio.HALF] = "half"
    assert len(shared) == 2
    assert shared[Level.LOW] == shared[1] == "true"
    assert shared[0.5] == "half"


def test_a_subclass_cannot_change_its_key_by_overriding_dunders() -> None:
    """__str__, __int__, __index__ and __iter__ of a subclass do not change its encoding."""
    assert encode_key(Loud("abc"))[0] == encode_key("abc")[0]
    assert encode_key(Odd(5))[0] == encode_key(5)[0]
    assert encode_key(Backwards((1, 2)))[0] == encode_key((1, 2))[0]
    assert decode_key(encode_key(Color.GREEN)[0]) == "green"


def _local_enum() -> object:
    class Local(enum.Enum):
        A = 1

    return Local.A


def _local_dataclass() -> object:
    @dataclasses.dataclass(frozen=True)
    class Local:
        x: int

    return Local(1)


@pytest.mark.parametrize("make", [_local_enum, _local_dataclass])
def test_a_key_whose_class_cannot_be_found_again_is_refused(
    shared: SharedDict, make: object
) -> None:
    """A key of a class defined in a function raises TypeError; the dict stays usable."""
    shared["ok"] = 1
    key = make()  # type: ignore[operator]
    with pytest.raises(TypeError, match="cannot be found again"):
        shared[key] = 2
    assert list(shared) == ["ok"]
    assert dict(shared.items()) == {"ok": 1}


def _iterate(name: str) -> list[object]:
    with SharedDict.attach(name) as shared:
        return list(shared)


def test_enum_keys_iterate_in_another_process(shared: SharedDict) -> None:
    """Keys of module-level Enums read back in a spawn child."""
    shared[Color.GREEN] = 1
    shared[Level.HIGH] = 2
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        keys = pool.apply(_iterate, (shared.name,))
    assert set(keys) == {Color.GREEN, Level.HIGH}
