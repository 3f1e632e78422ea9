"""The command line, run as users run it: ``python -m shared_memory_array ...`` in a subprocess.

A real (non-dry-run) cleanup goes through ``_children_registry.py cli-scoped``,
which limits the scan to this test's blocks so that other processes' orphans
on a shared machine are left alone; everything else runs the real module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import shared_memory_array as sma
from shared_memory_array import __main__ as cli
from shared_memory_array import _codec, _registry
from shared_memory_array._block import PREFIX, SharedBlock
from shared_memory_array._header import BlockKind, HeaderFlags, encode_header
from shared_memory_array._process import current_identity

TIMEOUT = 60
HELPER = Path(__file__).with_name("_children_registry.py")

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


def run_cli(*args: str, helper_scope: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter (scoped to ``helper_scope`` blocks if given)."""
    if helper_scope is None:
        command = [sys.executable, "-m", "shared_memory_array", *args]
    else:
        command = [sys.executable, str(HELPER), "cli-scoped", ",".join(helper_scope), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def assert_one_line_error(ran: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failed command: non-zero status, one line on stderr naming the problem, no traceback."""
    assert ran.returncode == 1
    assert len(ran.stderr.splitlines()) == 1, ran.stderr
    assert "Traceback" not in ran.stderr
    for fragment in fragments:
        assert fragment in ran.stderr


@pytest.fixture
def blocks() -> Iterator[list[SharedBlock]]:
    """Blocks a test creates; closed and unlinked afterwards."""
    made: list[SharedBlock] = []
    yield made
    for block in made:
        block.close()
        block.unlink()


def make_block(made: list[SharedBlock], content: bytes, size: int = 8192) -> SharedBlock:
    block = SharedBlock.create(max(size, len(content)))
    block.buf[: len(content)] = content
    made.append(block)
    return block


def array_header(creator: tuple[int, int] | None = None) -> bytes:
    return encode_header(
        BlockKind.ARRAY,
        dtype=np.dtype("<i2"),
        shape=(2, 3),
        strides=(2, 4),
        nbytes=12,
        flags=HeaderFlags.READY | HeaderFlags.F_ORDER,
        creator=creator,
    )


def dead_creator() -> tuple[int, int]:
    pid, start = current_identity()
    return pid, start + 1  # this pid, another start time: a reused pid


def line_of(output: str, name: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if line.startswith(name)]
    return line.split()


# -- help and usage --------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["list"], ["inspect"], ["cleanup"]])
def test_help_everywhere(command: list[str]) -> None:
    """``--help`` works on the program and on every command, exiting 0 with a usage line."""
    ran = run_cli(*command, "--help")
    assert ran.returncode == 0
    assert ran.stdout.startswith("usage: python -m shared_memory_array")
    assert ran.stderr == ""


@pytest.mark.parametrize(
    "args", [[], ["frobnicate"], ["inspect"], ["cleanup", "--quiet", "--verbose"]]
)
def test_bad_usage_exits_2_without_traceback(args: list[str]) -> None:
    """A missing or unknown command or argument is a usage error (status 2), never a traceback."""
    ran = run_cli(*args)
    assert ran.returncode == 2
    assert "usage:" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_console_script_points_at_main() -> None:
    """The installed ``shared-memory-array`` console script runs ``__main__.main``."""
    scripts = metadata.entry_points(group="console_scripts")
    (script,) = [ep for ep in scripts if ep.name == "shared-memory-array"]
    assert script.value == "shared_memory_array.__main__:main"
    assert script.load() is cli.main


# -- list ------------------------------------------------------------------------------


def test_list_prints_one_greppable_line_per_block(blocks: list[SharedBlock]) -> None:
    """``list`` prints a header, then name, kind, human size, creator pid and liveness per line."""
    good = make_block(blocks, array_header())
    dead = make_block(blocks, array_header(creator=dead_creator()), size=3 * 2**20)
    bad = make_block(blocks, b"garbage", size=100)
    ran = run_cli("list")
    assert ran.returncode == 0, ran.stderr
    pid = str(os.getpid())
    header = ran.stdout.splitlines()[0]
    assert header.split() == ["NAME", "KIND", "SIZE", "CREATOR", "ALIVE", "NOTE"]
    assert line_of(ran.stdout, good.name) == [good.name, "array", "8.0", "KiB", pid, "yes"]
    assert line_of(ran.stdout, dead.name)[1:6] == ["array", "3.0", "MiB", pid, "no"]
    bad_line = line_of(ran.stdout, bad.name)
    assert bad_line[1:6] == ["unknown", "100", "B", "-", "?"]
    assert "magic" in " ".join(bad_line[6:])


def test_hostile_names_and_fields_stay_on_one_line(blocks: list[SharedBlock]) -> None:
    """Control characters in a block's name or header text are escaped, never written raw."""
    evil_dtype = np.dtype([("a\nb\x1b[2J", "<i4")])
    header = encode_header(BlockKind.ARRAY, dtype=evil_dtype, shape=(1,), strides=(4,), nbytes=4)
    block = SharedBlock.create(4096, name=PREFIX + "evil\n\x1b[2J name")
    block.buf[: len(header)] = header
    blocks.append(block)
    for args in (["list"], ["inspect", block.name], ["cleanup", "--dry-run", "--verbose"]):
        ran = run_cli(*args)
        assert ran.returncode == 0, ran.stderr
        assert "\x1b" not in ran.stdout
        assert "evil\\n\\x1b[2J\\x20name" in ran.stdout
    ran = run_cli("inspect", block.name)
    fields = dict(line.split(None, 1) for line in ran.stdout.splitlines())
    assert fields["dtype"] == "[('a\\nb\\x1b[2J', '<i4')]"


# -- inspect ---------------------------------------------------------------------------


def test_inspect_decodes_the_header(blocks: list[SharedBlock]) -> None:
    """``inspect NAME`` prints every header field as ``field value``, one per line."""
    block = make_block(blocks, array_header())
    ran = run_cli("inspect", "/" + block.name)
    assert ran.returncode == 0, ran.stderr
    fields = dict(line.split(None, 1) for line in ran.stdout.splitlines())
    assert fields["name"] == block.name
    assert fields["kind"] == "array"
    assert fields["size"] == "8192 (8.0 KiB)"
    assert fields["shape"] == "(2, 3)"
    assert fields["strides"] == "(2, 4)"
    assert fields["dtype"] == "int16"
    assert fields["flags"] == "F_ORDER|READY"
    assert fields["creator_pid"] == str(os.getpid())
    assert fields["creator_alive"] == "yes"
    assert fields["version"] == "2"


def test_inspect_never_unpickles(tmp_path: Path) -> None:
    """Inspecting a codec block whose pickle would run code shows the header and runs nothing."""
    marker = tmp_path / "unpickled"
    mine = {info.name for info in sma.list_blocks() if info.creator_pid == os.getpid()}
    token = sma.write((_Tripwire(str(marker)), np.zeros(16)), threshold=0)
    try:
        (name,) = {
            info.name for info in sma.list_blocks() if info.creator_pid == os.getpid()
        } - mine
        ran = run_cli("inspect", name)
        assert ran.returncode == 0, ran.stderr
        assert "kind           codec" in ran.stdout
        assert not marker.exists()
    finally:
        sma.release(token)
        _codec._writer.drop_all()  # release pools the block for reuse; unlink it now


class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.path, "w")


def test_inspect_missing_block_is_one_line_error() -> None:
    """``inspect`` of a block that does not exist fails with one line naming it."""
    ran = run_cli("inspect", PREFIX + "no_such_block")
    assert_one_line_error(ran, "does not exist", PREFIX + "no_such_block")


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, array_header()[:100]])
def test_inspect_unreadable_block_is_one_line_error(
    blocks: list[SharedBlock], content: bytes
) -> None:
    """``inspect`` of a corrupt, truncated or empty block fails with the parser's reason."""
    block = make_block(blocks, content)
    if not content:
        os.truncate(os.path.join(_registry.SHM_DIR, block.name), 0)
    ran = run_cli("inspect", block.name)
    assert_one_line_error(ran, "cannot read the header", block.name)


def test_inspect_invalid_name_is_one_line_error() -> None:
    """A name that cannot name a block is reported, not raised."""
    ran = run_cli("inspect", "a/b")
    assert_one_line_error(ran, "not a valid shared-memory block name")


# -- cleanup ---------------------------------------------------------------------------


def test_cleanup_dry_run_reports_and_keeps(blocks: list[SharedBlock]) -> None:
    """``cleanup --dry-run`` says what it would clean (our dead block) and unlinks nothing."""
    dead = make_block(blocks, array_header(creator=dead_creator()))
    alive = make_block(blocks, array_header())
    ran = run_cli("cleanup", "--dry-run", "--verbose")
    assert ran.returncode == 0, ran.stderr
    assert f"would clean {dead.name}: creator pid {os.getpid()} has exited" in ran.stdout
    assert f"skipped {alive.name}: creator pid {os.getpid()} is running" in ran.stdout
    assert "would clean," in ran.stdout.splitlines()[-1]
    assert os.path.exists(os.path.join(_registry.SHM_DIR, dead.name))


def test_cleanup_removes_dead_and_prints_summary(blocks: list[SharedBlock]) -> None:
    """``cleanup`` unlinks the dead creator's block, keeps ours, and ends with a summary."""
    dead = make_block(blocks, array_header(creator=dead_creator()))
    alive = make_block(blocks, array_header())
    ran = run_cli("cleanup", helper_scope=[dead.name, alive.name])
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [f"cleaned {dead.name}", "1 cleaned, 0 failed, 1 skipped"]
    assert not os.path.exists(os.path.join(_registry.SHM_DIR, dead.name))
    assert os.path.exists(os.path.join(_registry.SHM_DIR, alive.name))


def test_cleanup_quiet_prints_nothing(blocks: list[SharedBlock]) -> None:
    """``cleanup --quiet`` prints nothing when nothing fails."""
    dead = make_block(blocks, array_header(creator=dead_creator()))
    ran = run_cli("cleanup", "--quiet", helper_scope=[dead.name])
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
    assert not os.path.exists(os.path.join(_registry.SHM_DIR, dead.name))


def test_cleanup_failure_exits_1(
    blocks: list[SharedBlock], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A block that cannot be unlinked is reported on stderr and makes the exit status 1."""
    dead = make_block(blocks, array_header(creator=dead_creator()))
    monkeypatch.setattr(_registry, "_block_names", lambda: [dead.name])

    def refuse(name: str, inode: int) -> bool:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_registry, "_unlink_if_unchanged", refuse)
    assert cli.main(["cleanup", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"failed {dead.name}: cannot unlink: Operation not permitted\n"


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (3 * 2**19, "1.5 MiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_format_size(nbytes: int, text: str) -> None:
    """Sizes print in binary units with one decimal above 1 KiB."""
    assert cli.format_size(nbytes) == text
