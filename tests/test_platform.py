"""The platform layer's portable backend (``_platform/_posix.py``), run on Linux directly.

Most tests instantiate :class:`PortableBackend` in this process, whatever
backend the suite runs under, with its lock files in a private directory of
the test (``SHARED_MEMORY_ARRAY_LOCK_DIR``). Where the promise is about other
processes (a SIGKILLed holder, a forked child, the public API end to end) real
processes run: subprocesses with a timeout, or ``os.fork``.
"""

from __future__ import annotations

import _posixshmem
import json
import mmap
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared_memory_array import UntrustedBlockError
from shared_memory_array._block import PREFIX, new_name
from shared_memory_array._platform import COUNTER, HOLD, OWNER, BlockLocks, _posix
from shared_memory_array._platform._posix import LOCK_DIR_ENV, PortableBackend

TIMEOUT = 60
HERE = Path(__file__).parent
LONG_NAME = PREFIX + "a-user-given-name-" + "x" * 78  # 100 characters

# A process that creates (and owns) or attaches (and holds) one block through the
# portable backend, says "ready", then waits for its stdin to close.
_HOLDER = textwrap.dedent(
    """
    import sys
    from shared_memory_array._platform import HOLD, _posix

    role, name = sys.argv[1], sys.argv[2]
    backend = _posix.PortableBackend()
    if role == "create":
        fd = backend.open_block(name, create=True, writable=True)
        backend.resize(fd, 4096)
        locks = backend.locks(fd, name, writable=True, created=True)
    else:
        fd = backend.open_block(name, create=False, writable=False)
        locks = backend.locks(fd, name, writable=False, created=False)
        assert locks.try_lock(HOLD, exclusive=False)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lock directory of this test's own (not made yet: the backend makes it)."""
    path = tmp_path / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(path))
    return path


@pytest.fixture
def portable(lock_dir: Path) -> Iterator[PortableBackend]:
    """A portable backend of this process, its blocks unlinked after the test."""
    backend = PortableBackend()
    yield backend
    for name in backend.list_names():
        backend.unlink(name)


def _create(backend: PortableBackend, name: str | None = None) -> tuple[str, BlockLocks]:
    """A 4 KiB block made and owned through ``backend``: its system name and its locks."""
    system = backend.system_name(name or new_name())
    fd = backend.open_block(system, create=True, writable=True)
    backend.resize(fd, 4096)
    return system, backend.locks(fd, system, writable=True, created=True)


def _probe(backend: PortableBackend, system: str) -> BlockLocks:
    """The locks of a fresh description of the block, holding nothing (as a reaper looks)."""
    fd = backend.open_block(system, create=False, writable=False)
    return backend.locks(fd, system, writable=False, created=False)


class _Holder:
    """A subprocess that creates or attaches one block through the portable backend."""

    def __init__(self, role: str, name: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, role, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        assert ready, f"the {role} child did not answer in time"
        assert self.process.stdout.readline() == "ready\n"

    def kill(self) -> None:
        """SIGKILL: nothing of the child's own runs; only the kernel lets go for it."""
        self.process.kill()
        assert self.process.wait(timeout=TIMEOUT) == -signal.SIGKILL
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


# -- names -------------------------------------------------------------------------------


def test_a_long_user_name_maps_to_a_system_name_of_at_most_30_bytes() -> None:
    """Names over 30 bytes (macOS: 31 with the slash) map to ``sma_~`` and a hash; others stay."""
    backend = PortableBackend()
    system = backend.system_name(LONG_NAME)
    assert len(LONG_NAME) == 100
    assert len(system.encode()) <= 30
    assert system.startswith(PREFIX + "~")
    assert backend.system_name(LONG_NAME) == system  # the same in every process
    assert backend.system_name(LONG_NAME + "y") != system
    thirty = PREFIX + "z" * 26
    assert backend.system_name(thirty) == thirty
    assert backend.system_name(thirty + "z") != thirty + "z"
    multibyte = PREFIX + "é" * 14  # 18 characters, 32 bytes
    assert len(backend.system_name(multibyte).encode()) <= 30


def test_a_long_name_end_to_end_under_the_portable_backend(lock_dir: Path) -> None:
    """With SHARED_MEMORY_ARRAY_BACKEND=posix, attach, list and inspect take the user's name."""
    code = textwrap.dedent(
        """
        import json, subprocess, sys
        import numpy as np
        import shared_memory_array as sma
        from shared_memory_array._platform import backend

        name = sys.argv[1]
        out = {"backend": backend.name, "system": backend.system_name(name)}
        with sma.SharedArray.copy(np.arange(5), name=name) as array:
            out["name"] = array.name
            with sma.SharedArray.attach(name) as again:
                out["values"] = again.as_array().tolist()
                out["attached_name"] = again.name
            out["listed"] = [info.name for info in sma.list_blocks()]
            out["system_names"] = backend.list_names()
            out["described"] = sma._registry.describe_block(name)[0].name
            inspect = subprocess.run(
                [sys.executable, "-m", "shared_memory_array", "inspect", name, "--json"],
                capture_output=True, text=True, timeout=60, check=True,
            )
            out["inspected"] = json.loads(inspect.stdout)["name"]
        out["after"] = [info.name for info in sma.list_blocks()]
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "SHARED_MEMORY_ARRAY_BACKEND": "posix", LOCK_DIR_ENV: str(lock_dir)}
    ran = subprocess.run(
        [sys.executable, "-c", code, LONG_NAME],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
        cwd=HERE,
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["backend"] == "posix"
    assert len(out["system"].encode()) <= 30
    assert out["system_names"] == [out["system"]]
    assert out["name"] == out["attached_name"] == LONG_NAME
    assert out["values"] == [0, 1, 2, 3, 4]
    assert out["listed"] == [LONG_NAME]
    assert out["described"] == out["inspected"] == LONG_NAME
    assert out["after"] == []


# -- the private lock directory ------------------------------------------------------------


def test_lock_directories_are_made_private(portable: PortableBackend, lock_dir: Path) -> None:
    """The lock directory, its per-namespace root and each role's directory are 0700, ours."""
    root = Path(portable.lock_root())
    assert root.parent == lock_dir
    for path in (lock_dir, root, *(root / role for role in ("hold", "owner", "counter", "dict"))):
        info = path.lstat()
        assert stat.S_ISDIR(info.st_mode), path
        assert stat.S_IMODE(info.st_mode) == 0o700, path
        assert info.st_uid == os.geteuid(), path


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_lock_directory_others_can_enter_is_refused(lock_dir: Path, mode: int) -> None:
    """A lock directory that group or others may use is refused, never used nor loosened."""
    lock_dir.mkdir()
    lock_dir.chmod(mode)
    with pytest.raises(UntrustedBlockError, match="not a private directory"):
        PortableBackend().lock_root()
    assert stat.S_IMODE(lock_dir.stat().st_mode) == mode


def test_a_symlink_as_lock_directory_is_refused(lock_dir: Path, tmp_path: Path) -> None:
    """A symbolic link in the lock directory's place is refused, even to a private directory."""
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    lock_dir.symlink_to(target)
    with pytest.raises(UntrustedBlockError):
        PortableBackend().lock_root()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_another_users_lock_directory_is_refused(lock_dir: Path) -> None:
    """A 0700 lock directory of another user is refused (root is no exception)."""
    lock_dir.mkdir(mode=0o700)
    os.chown(lock_dir, 65534, 65534)
    with pytest.raises(UntrustedBlockError, match="uid 65534"):
        PortableBackend().lock_root()


# -- lock files and what they list ----------------------------------------------------------


def test_each_block_has_one_lock_file_per_role_and_the_hold_files_list_them(
    portable: PortableBackend,
) -> None:
    """Creating makes hold, owner, counter and dict files (0600); unlink removes them all."""
    system, locks = _create(portable)
    files = [Path(portable.lock_path(role, system)) for role in (HOLD, OWNER, COUNTER)]
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
    assert portable.list_names() == [system]
    assert portable.exists(system)
    locks.close()
    assert portable.unlink(system)
    assert not any(path.exists() for path in files)
    assert portable.list_names() == []


def test_a_stale_lock_file_whose_object_is_gone_is_removed_by_cleanup(
    portable: PortableBackend, lock_dir: Path
) -> None:
    """A crash between the object's unlink and its lock files': cleanup removes the files."""
    system, locks = _create(portable)
    locks.close()
    _posixshmem.shm_unlink("/" + system)  # the lock files stay: a stale listing entry
    assert portable.list_names() == [system]
    code = "import shared_memory_array as sma; r = sma.cleanup(); print(r.cleaned, r.failed)"
    env = {**os.environ, "SHARED_MEMORY_ARRAY_BACKEND": "posix", LOCK_DIR_ENV: str(lock_dir)}
    ran = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
        cwd=HERE,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["[]", "[]"]  # nothing to unlink: the block was gone
    assert portable.list_names() == []
    assert not Path(portable.lock_path(HOLD, system)).exists()


def test_a_creation_cut_short_is_repaired_a_fresh_one_is_waited_for(
    portable: PortableBackend,
) -> None:
    """Missing owner and counter files: 'being created' while the hold file is new, made later."""
    system, locks = _create(portable)
    locks.close()
    for role in (OWNER, COUNTER):
        os.unlink(portable.lock_path(role, system))
    with pytest.raises(FileNotFoundError, match="being created or removed"):
        _probe(portable, system)
    old = time.time() - 2 * _posix.ABANDONED_CREATION_SECONDS
    os.utime(portable.lock_path(HOLD, system), (old, old))
    probe = _probe(portable, system)  # its creator died: the files are made again, unlocked
    try:
        assert not probe.held_by_others(OWNER)
        assert probe.try_lock(HOLD, exclusive=True)
    finally:
        probe.close()


def test_still_named_sees_a_foreign_unlink(portable: PortableBackend) -> None:
    """An shm_unlink by another program leaves the lock files, but the name names nothing now."""
    system, locks = _create(portable)
    try:
        assert locks.still_named()
        _posixshmem.shm_unlink("/" + system)
        assert not locks.still_named()
    finally:
        locks.close()


def test_a_private_mapping_is_a_copy_that_others_never_see(portable: PortableBackend) -> None:
    """macOS refuses MAP_PRIVATE on shared memory: a private map is a copy, its writes stay."""
    _, locks = _create(portable)
    try:
        shared = portable.map(locks.fd, 4096, readonly=False, private=False, populate=False)
        shared[:4] = b"abcd"
        private = portable.map(locks.fd, 4096, readonly=False, private=True, populate=False)
        assert private[:4] == b"abcd"
        private[:4] = b"WXYZ"
        assert shared[:4] == b"abcd"
        shared[4:8] = b"efgh"
        assert private[4:8] == bytes(4)  # a copy made at mapping time
        private.close()
        shared.close()
    finally:
        locks.close()


# -- holds are flocks, dropped by the kernel with their process ----------------------------


def test_holds_outlive_their_creator_and_go_with_a_sigkilled_holder(
    portable: PortableBackend,
) -> None:
    """OWNER and HOLD are held by live processes only: a SIGKILL drops them, nothing else does."""
    name = new_name()
    children: list[_Holder] = []
    try:
        creator = _Holder("create", name)
        children.append(creator)
        probe = _probe(portable, name)
        assert probe.held_by_others(OWNER)
        assert not probe.held_by_others(HOLD)
        holder = _Holder("attach", name)
        children.append(holder)
        assert probe.held_by_others(HOLD)
        creator.kill()
        assert not probe.held_by_others(OWNER)  # the owner is gone ...
        assert probe.held_by_others(HOLD)  # ... the holder still holds: the block stays
        holder.kill()
        assert not probe.held_by_others(HOLD)
        assert probe.try_lock(HOLD, exclusive=True)  # nobody maps it: a reaper may unlink
        probe.close()
    finally:
        for child in children:
            if child.process.poll() is None:
                child.kill()


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_reopens_its_lock_files(portable: PortableBackend) -> None:
    """A child shares its parent's descriptions until it reopens them: then it owns nothing."""
    system, locks = _create(portable)  # this process owns the block (OWNER, exclusive)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                if not locks.try_lock(OWNER, exclusive=True):
                    code |= 1  # the inherited description: the parent's lock looked like ours
                if not locks.reopen_in_child():
                    code |= 2
                if locks.try_lock(OWNER, exclusive=True):
                    code |= 4  # a description of its own must conflict with the parent's
                if not locks.try_lock(HOLD, exclusive=False):
                    code |= 8
            except BaseException:
                code |= 16
            os._exit(code)
        assert _wait_child(pid) == 0
        probe = _probe(portable, system)
        try:
            assert probe.held_by_others(OWNER)  # the child's exit left the parent's lock alone
            assert not probe.held_by_others(HOLD)  # and its HOLD went with it
        finally:
            probe.close()
    finally:
        locks.close()


def _wait_child(pid: int) -> int:
    """The exit code of child ``pid``, failing after :data:`TIMEOUT` seconds."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} did not exit in time")
        time.sleep(0.01)


def test_mapping_a_block_never_needs_positional_io(portable: PortableBackend) -> None:
    """Reads go through a mapping (macOS cannot pread shared memory); writes report False."""
    _, locks = _create(portable)
    try:
        view = mmap.mmap(locks.fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view[100:105] = b"hello"
        view.close()
        assert portable.read_at(locks.fd, 5, 100) == b"hello"
        assert portable.read_at(locks.fd, 10, 4090) == bytes(6)  # cut at the end
        assert not portable.write_at(locks.fd, memoryview(b"x"), 0)
    finally:
        locks.close()
