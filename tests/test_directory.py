"""Blocks in another memory filesystem: configure(directory=...), SHARED_MEMORY_ARRAY_DIR.

API.md v3 section 2: new blocks of every kind go to the configured directory;
every process that shares them must use the same setting, and a process with
another setting raises BlockNotFoundError rather than attaching a namesake.
Also here: a name is only ever removed while it names the handle's own block
(a reused name, a directory changed since).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import block_exists, needs

from shared_memory_array import (
    SharedArray,
    SharedDict,
    configure,
    list_blocks,
    read,
    release,
    write,
)
from shared_memory_array._codec._tokens import parse_shared
from shared_memory_array._platform import DIRECTORY_ENV, backend

pytestmark = [pytest.mark.usefixtures("no_leaked_blocks"), needs("block_files")]

TIMEOUT = 60


@pytest.fixture
def directory() -> Iterator[str]:
    """A fresh directory on the same memory filesystem as the default one, configured."""
    default = backend.directory
    assert default is not None
    path = tempfile.mkdtemp(prefix="configured-", dir=default)
    configure(directory=path)
    try:
        yield path
    finally:
        configure(directory=None)
        shutil.rmtree(path, ignore_errors=True)


def _child(code: str, *, env_directory: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != DIRECTORY_ENV}
    if env_directory is not None:
        env[DIRECTORY_ENV] = env_directory
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )


def test_every_kind_goes_to_the_configured_directory(directory: str) -> None:
    """An array, a dict (entry and data) and a codec block are files of the directory."""
    with (
        SharedArray.copy(None, np.arange(10.0)) as array,
        SharedDict.create(f"configured_{os.getpid()}", max_items=4) as shared,
    ):
        shared["k"] = 1
        token = write(np.arange(1000.0), threshold=0)
        names = [array.name, shared.block_name, parse_shared(str(token)).name]
        try:
            files = set(os.listdir(directory))
            assert set(names) <= files
            default = os.path.dirname(directory)  # the fixture made it there
            assert not set(names) & set(os.listdir(default))
            listed = {info.name for info in list_blocks()}
            assert set(names) <= listed
            assert float(read(token).sum()) == float(np.arange(1000.0).sum())
        finally:
            release(token)
    assert not set(os.listdir(directory)) & set(names[:2])


def test_configure_none_goes_back_to_the_default(directory: str) -> None:
    """configure(directory=None) (or configure()) puts the next block in the default place."""
    configure(directory=None)
    with SharedArray.copy(None, np.arange(3.0)) as array:
        assert array.name not in os.listdir(directory)
        assert block_exists(array.name)


def test_a_directory_that_does_not_exist_is_refused_and_nothing_changes(directory: str) -> None:
    """FileNotFoundError, and the setting in force stays."""
    with pytest.raises(FileNotFoundError):
        configure(directory=os.path.join(directory, "missing"))
    with SharedArray.copy(None, np.arange(3.0)) as array:
        assert array.name in os.listdir(directory)


def test_a_process_with_the_same_setting_attaches(directory: str) -> None:
    """A child with SHARED_MEMORY_ARRAY_DIR set to the directory unpickles and reads the handle."""
    with SharedArray.copy(None, np.arange(10.0)) as array:
        code = (
            "import pickle, sys; import numpy as np; "
            f"h = pickle.loads(bytes.fromhex({pickle.dumps(array).hex()!r})); "
            "print(float(np.asarray(h).sum()))"
        )
        done = _child(code, env_directory=directory)
        assert done.returncode == 0, done.stderr
        assert float(done.stdout) == 45.0


def test_a_process_with_another_setting_never_attaches_a_namesake(directory: str) -> None:
    """A namesake in the default place is not attached by a child that lacks the setting."""
    with SharedArray.copy(None, np.arange(10.0)) as array:
        pickled = pickle.dumps(array)
        configure(directory=None)
        with SharedArray.copy(None, np.zeros(10), name=array.name) as namesake:
            assert block_exists(namesake.name)  # the same name, in the default place
            code = (
                "import pickle; import numpy as np\n"
                "from shared_memory_array import BlockNotFoundError\n"
                f"h = pickle.loads(bytes.fromhex({pickled.hex()!r}))\n"
                "try:\n"
                "    np.asarray(h)\n"
                "except BlockNotFoundError as exc:\n"
                "    print('BlockNotFoundError', exc)\n"
            )
            done = _child(code, env_directory=None)
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith("BlockNotFoundError"), done.stdout
        configure(directory=directory)


def test_a_close_after_the_directory_changed_removes_the_blocks_own_name(directory: str) -> None:
    """The owner's close unlinks its block where it was made, never a namesake elsewhere."""
    array = SharedArray.copy(None, np.arange(4.0))
    made_in = Path(directory) / array.name
    configure(directory=None)
    with SharedArray.copy(None, np.ones(4), name=array.name) as namesake:
        array.close()
        assert not made_in.exists()
        assert block_exists(namesake.name)  # the default place's block is untouched
        assert float(namesake.as_array().sum()) == 4.0
    configure(directory=directory)


def test_an_old_handle_never_unlinks_a_newer_block_of_its_name() -> None:
    """After its name was removed and given to a new block, an owner's close leaves that one."""
    name = f"reused_{os.getpid()}"
    old = SharedArray.copy(None, np.arange(4.0), name=name)
    try:
        old.unlink()  # the name goes now; old keeps its mapping (and stays the owner)
        with SharedArray.copy(None, np.ones(4), name=name) as new:
            old.close()
            assert block_exists(name)
            with SharedArray.attach(name) as again:
                assert float(again.as_array().sum()) == 4.0
            assert new.owner
    finally:
        old.close()


def test_a_closed_handle_unlinks_only_its_own_block() -> None:
    """unlink() on a closed handle removes the name only while it is still its block's."""
    name = f"closed_{os.getpid()}"
    owner = SharedArray.copy(None, np.arange(4.0), name=name)
    try:
        other = SharedArray.attach(name)
        other.close()
        owner.unlink()
        with SharedArray.copy(None, np.ones(4), name=name):
            other.unlink()  # closed, and the name is another block's now
            assert block_exists(name)
            reader = SharedArray.attach(name)
            reader.close()
            reader.unlink()  # closed, and the name is still its block's: it goes
            assert not block_exists(name)
    finally:
        owner.close()
