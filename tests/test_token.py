"""Token: write() returns a str subclass that behaves as the string it is (API.md section 2)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator

import numpy as np
import pytest

from shared_memory_array import Token, _codec, read, release, write


@pytest.fixture(autouse=True)
def _unlink_written_blocks(no_leaked_blocks: None) -> Iterator[None]:
    """Unlink the blocks this process wrote (live and pooled) before the leak check."""
    yield
    _codec.writer.drop_all()


@pytest.mark.parametrize("threshold", [0, 1 << 30], ids=["shared", "inline"])
def test_write_returns_a_token_that_is_a_str(threshold: int) -> None:
    """The token is a Token and a str, equal to and hashing as its text, with no __dict__."""
    token = write(np.arange(10), threshold=threshold)
    try:
        assert type(token) is Token
        assert isinstance(token, str)
        text = str(token)
        assert type(text) is str
        assert token == text
        assert hash(token) == hash(text)
        mapping: dict[str, int] = {token: 1}
        assert mapping[text] == 1
        assert not hasattr(token, "__dict__")  # __slots__ = (): as small as a str
        assert json.loads(json.dumps(token)) == text
    finally:
        release(token)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_token_pickles_as_itself(protocol: int) -> None:
    """A Token pickled with any protocol comes back a Token of the same text, and reads."""
    token = write({"a": np.ones(3)}, threshold=0)
    try:
        clone = pickle.loads(pickle.dumps(token, protocol=protocol))
        assert type(clone) is Token
        assert clone == token
        np.testing.assert_array_equal(read(clone)["a"], np.ones(3))
    finally:
        release(token)


def test_a_plain_str_of_a_token_reads_and_releases() -> None:
    """The token's text as a plain str (from a file, a queue, an environment) works everywhere."""
    token = write(b"x" * 100, threshold=0)
    text = str(token)
    assert read(text) == b"x" * 100
    release(text)
    with pytest.raises(KeyError):  # BlockNotFoundError
        read(token)
