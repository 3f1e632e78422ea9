"""The command line, run as users run it: ``python -m shared_memory_array ...`` in a subprocess.

A real (non-dry-run) cleanup goes through ``_children_registry.py cli-scoped``,
which limits the scan to this test's blocks so that other processes' orphans
on a shared machine are left alone; everything else runs the real module.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    block_exists,
    dead_identity,
    has,
    make_unheld_block,
    needs,
    refuse_unlink,
    remove_block,
    shield,
)

import shared_memory_array as sma
from shared_memory_array import __main__ as cli
from shared_memory_array import _codec, _lifetime, _registry
from shared_memory_array._block import PREFIX, SharedBlock, new_name
from shared_memory_array._header import (
    MAGIC,
    BlockKind,
    HeaderFlags,
    encode_header,
)
from shared_memory_array._platform import backend

TIMEOUT = 60
HELPER = Path(__file__).with_name("_children_registry.py")

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")


def run_cli(
    *args: str | bytes,
    helper_scope: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter (scoped to ``helper_scope`` blocks if given)."""
    if helper_scope is None:
        command: list[str | bytes] = [sys.executable, "-m", "shared_memory_array", *args]
    else:
        command = [sys.executable, str(HELPER), "cli-scoped", ",".join(helper_scope), *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


NO_GRACE = {_lifetime.GRACE_ENV: "0"}  # the CLI sees a shielded orphan as a plain orphan


def assert_one_line_error(ran: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failed command: non-zero status, one line on stderr naming the problem, no traceback."""
    assert ran.returncode == 1
    assert len(ran.stderr.splitlines()) == 1, ran.stderr
    assert "Traceback" not in ran.stderr
    for fragment in fragments:
        assert fragment in ran.stderr


@pytest.fixture
def blocks() -> Iterator[list[SharedBlock]]:
    """Blocks a test creates (this process maps them); closed and unlinked afterwards."""
    made: list[SharedBlock] = []
    yield made
    for block in made:
        block.close()
        block.unlink()


@pytest.fixture
def entries() -> Iterator[list[bytes]]:
    """Blocks a test makes by hand (nobody maps them) and paths it puts in /dev/shm; removed after.

    Paths (links, FIFOs, odd names) are absolute; block names are not.
    """
    made: list[bytes] = []
    yield made
    for entry in made:
        if not entry.startswith(b"/"):
            remove_block(os.fsdecode(entry))
        elif os.path.lexists(entry):
            os.unlink(entry)


def make_block(made: list[SharedBlock], content: bytes, size: int = 8192) -> SharedBlock:
    block = SharedBlock.create(max(size, len(content)))
    block.buf[: len(content)] = content
    made.append(block)
    return block


def write_orphan(made: list[bytes], content: bytes, name: bytes | None = None) -> str:
    """A block nobody maps, shielded from other processes' reapers (see test_registry).

    With a ``name`` (bytes, perhaps not UTF-8) it is a file written in /dev/shm by hand.
    """
    data = bytearray(8192)
    data[: len(content)] = content
    if content.startswith(MAGIC):
        shield(data)
    if name is None:
        made.append(make_unheld_block(bytes(data)).encode())
        return os.fsdecode(made[-1])
    raw_name = name
    path = b"/dev/shm/" + raw_name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    made.append(path)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return os.fsdecode(raw_name)


# The flags of array_header(): the portable backend marks its blocks.
FLAGS = ["F_ORDER", "READY", *(["PORTABLE"] if backend.lock_files else [])]


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


def line_of(output: str, name: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if line.startswith(name)]
    return line.split()


def exists(name: str) -> bool:
    return block_exists(name) or os.path.lexists(os.path.join(b"/dev/shm", os.fsencode(name)))


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


def test_list_prints_one_greppable_line_per_block(
    blocks: list[SharedBlock], entries: list[bytes]
) -> None:
    """``list``: a header, then name, kind, one-word size, state, in use, creator, alive, note."""
    dead = dead_identity()
    held = make_block(blocks, array_header(creator=dead), size=3 * 2**20)
    orphan = write_orphan(entries, array_header())
    bad = make_block(blocks, b"garbage", size=100)
    ran = run_cli("list", env=NO_GRACE)
    assert ran.returncode == 0, ran.stderr
    pid = str(os.getpid())
    header = ran.stdout.splitlines()[0]
    assert header.split() == [
        "NAME", "KIND", "SIZE", "SHAPE", "DTYPE", "STATE", "IN_USE", "CREATOR", "ALIVE", "NOTE"
    ]  # fmt: skip
    assert line_of(ran.stdout, held.name) == [
        held.name,
        "array",
        "3.0MiB",
        "(2,3)",
        "int16",
        "live",
        "yes",
        str(dead[0]),
        "no",
    ]
    assert line_of(ran.stdout, orphan) == [
        orphan, "array", "8.0KiB", "(2,3)", "int16", "orphan", "no", pid, "yes"
    ]  # fmt: skip
    bad_line = line_of(ran.stdout, bad.name)
    assert bad_line[1:9] == ["unknown", "100B", "-", "-", "unreadable", "yes", "-", "?"]
    assert "magic" in " ".join(bad_line[9:])


def test_empty_list_says_so_in_words() -> None:
    """``list`` with no block prints one sentence, not a lone header; ``--json`` an empty list."""
    ran = run_cli("list", helper_scope=[])
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, cli.NO_BLOCKS + "\n", "")
    ran = run_cli("list", "--json", helper_scope=[])
    assert (ran.returncode, json.loads(ran.stdout)) == (0, [])


LIST_KEYS = {
    "name", "kind", "size", "state", "in_use", "creator_pid", "creator_alive", "modified",
    "owner_uid", "generation", "shape", "dtype", "error", "mapped_by", "resident",
}  # fmt: skip


def test_list_json_has_stable_keys_and_sizes_in_bytes(
    blocks: list[SharedBlock], entries: list[bytes]
) -> None:
    """``list --json``: one object per block with the BlockInfo fields, sizes in bytes."""
    held = make_block(blocks, array_header(), size=3 * 2**20)
    orphan = write_orphan(entries, array_header())
    ran = run_cli("list", "--json", env=NO_GRACE)
    assert ran.returncode == 0, ran.stderr
    records = {record["name"]: record for record in json.loads(ran.stdout)}
    for record in records.values():
        assert set(record) == LIST_KEYS
    assert records[held.name] | {"modified": 0} == {
        "name": held.name, "kind": "array", "size": 3 * 2**20, "state": "live", "in_use": True,
        "creator_pid": os.getpid(), "creator_alive": True, "modified": 0,
        "owner_uid": os.geteuid(), "generation": 0, "shape": [2, 3], "dtype": "int16",
        "error": None,
        # This process maps it (the CLI only looks); its pages were reserved at creation.
        "mapped_by": [os.getpid()] if has("process_table") else None,
        "resident": 3 * 2**20 if has("reserved_pages") else None,
    }  # fmt: skip
    assert (records[orphan]["state"], records[orphan]["in_use"]) == ("orphan", False)
    assert records[orphan]["size"] == 8192
    assert records[orphan]["mapped_by"] == ([] if has("process_table") else None)


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
    """``inspect NAME`` prints every field as ``field value``, with names, times and states."""
    block = make_block(blocks, array_header())
    ran = run_cli("inspect", "/" + block.name)
    assert ran.returncode == 0, ran.stderr
    fields = dict(line.split(None, 1) for line in ran.stdout.splitlines())
    assert fields["name"] == block.name
    assert fields["kind"] == "array"
    assert fields["state"] == "live"
    assert fields["in_use"] == "yes, a process maps it"
    assert fields["cleanup"].startswith("would keep: in use")
    assert fields["size"] == "8192 bytes (8.0KiB)"
    assert fields["shape"] == "(2, 3)"
    assert fields["strides"] == "(2, 4)"
    assert fields["dtype"] == "int16"
    assert fields["flags"] == ", ".join(FLAGS)
    assert fields["creator_pid"] == str(os.getpid())
    assert fields["creator_alive"] == "yes"
    assert fields["version"].split()[0] == "3"
    if not has("process_table"):
        return  # no start time to show
    started = datetime.datetime.strptime(fields["creator_started"], "%Y-%m-%dT%H:%M:%SZ")
    started = started.replace(tzinfo=datetime.timezone.utc)
    boot = cli._boot_time()
    assert boot is not None
    assert boot - 1 <= started.timestamp() <= time.time()


def test_inspect_json_has_stable_keys(blocks: list[SharedBlock]) -> None:
    """``inspect NAME --json``: the list record plus the decoded header, sizes in bytes."""
    block = make_block(blocks, array_header(creator=dead_identity()))
    ran = run_cli("inspect", block.name, "--json")
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    assert set(record) == LIST_KEYS | {
        "version", "flags", "strides", "header_size", "data_offset", "nbytes", "block_id",
        "creator_start_ticks", "creator_started", "extra_size", "in_flight", "verdict", "reason",
    }  # fmt: skip
    assert (record["name"], record["size"], record["nbytes"]) == (block.name, 8192, 12)
    assert (record["state"], record["in_use"], record["creator_alive"]) == ("live", True, False)
    assert (record["verdict"], record["flags"]) == ("keep", FLAGS)
    assert (record["shape"], record["strides"], record["in_flight"]) == ([2, 3], [2, 4], 0)
    assert len(bytes.fromhex(record["block_id"])) == 16


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
        fields = dict(line.split(None, 1) for line in ran.stdout.splitlines())
        assert fields["kind"] == "codec"
        assert not marker.exists()
    finally:
        sma.release(token)
        _codec.writer.drop_all()  # release pools the block for reuse; unlink it now


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
        os.truncate(os.path.join(backend.directory or "/dev/shm", block.name), 0)
    ran = run_cli("inspect", block.name)
    assert_one_line_error(ran, "cannot read the header", block.name)


def test_inspect_invalid_name_is_one_line_error() -> None:
    """A name that cannot name a block is reported, not raised."""
    ran = run_cli("inspect", "a/b")
    assert_one_line_error(ran, "not a valid shared-memory block name")


# -- cleanup ---------------------------------------------------------------------------


def test_cleanup_dry_run_reports_and_keeps(blocks: list[SharedBlock], entries: list[bytes]) -> None:
    """``cleanup --dry-run`` names the orphan it would clean and the held block; unlinks nothing."""
    orphan = write_orphan(entries, array_header())
    held = make_block(blocks, array_header(creator=dead_identity()))
    ran = run_cli(
        "cleanup", "--dry-run", "--verbose", helper_scope=[orphan, held.name], env=NO_GRACE
    )
    assert ran.returncode == 0, ran.stderr
    assert f"would clean {orphan}: no process holds it" in ran.stdout
    assert f"skipped {held.name}: in use: a process maps it" in ran.stdout
    assert ran.stdout.splitlines()[-1] == "1 would clean, 0 failed, 1 skipped"
    assert exists(orphan)


def test_cleanup_removes_orphans_and_prints_summary(
    blocks: list[SharedBlock], entries: list[bytes]
) -> None:
    """``cleanup`` unlinks the orphan, keeps the held block, and ends with a summary."""
    orphan = write_orphan(entries, array_header())
    held = make_block(blocks, array_header(creator=dead_identity()))
    ran = run_cli("cleanup", helper_scope=[orphan, held.name], env=NO_GRACE)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [f"cleaned {orphan}", "1 cleaned, 0 failed, 1 skipped"]
    assert not exists(orphan)
    assert exists(held.name)


def test_cleanup_quiet_prints_nothing(entries: list[bytes]) -> None:
    """``cleanup --quiet`` prints nothing when nothing fails."""
    orphan = write_orphan(entries, array_header())
    ran = run_cli("cleanup", "--quiet", helper_scope=[orphan], env=NO_GRACE)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
    assert not exists(orphan)


def test_cleanup_failure_exits_1(
    entries: list[bytes], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A block that cannot be unlinked is reported on stderr and makes the exit status 1."""
    orphan = write_orphan(entries, array_header())
    monkeypatch.setenv(_lifetime.GRACE_ENV, "0")
    monkeypatch.setattr(_registry, "_block_names", lambda: [orphan])

    with monkeypatch.context() as patch:
        refuse_unlink(patch, backend.system_name(orphan))
        status = cli.main(["cleanup", "--quiet"])
    assert status == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"failed {orphan}: cannot unlink: Operation not permitted\n"


def test_the_cli_reaps_nothing_at_exit(entries: list[bytes]) -> None:
    """``list``, ``inspect`` and ``cleanup --dry-run`` leave an orphan in place, exit included."""
    orphan = write_orphan(entries, array_header())
    for args in (["list"], ["inspect", orphan], ["cleanup", "--dry-run"]):
        ran = run_cli(*args, env=NO_GRACE)
        assert ran.returncode == 0, ran.stderr
        assert exists(orphan), args


# -- odd entries (API.md section 5, v2) -------------------------------------------------


@needs("block_files")
def test_odd_entries_never_crash_the_cli(entries: list[bytes], blocks: list[SharedBlock]) -> None:
    """Undecodable names, symlinks, FIFOs: every command reports them, none prints a traceback."""
    tag = new_name()[len(PREFIX) :].encode()
    undecodable = write_orphan(entries, b"garbage", name=b"sma_\xff" + tag)
    surrogate = write_orphan(entries, b"garbage", name=b"sma_\xed\xa0\x80" + tag)
    non_ascii = write_orphan(entries, array_header(), name=("sma_é" + "é" * 100).encode())
    target = make_block(blocks, array_header())
    link, fifo = b"/dev/shm/sma_link_" + tag, b"/dev/shm/sma_fifo_" + tag
    os.symlink(target.name, link)
    entries.append(link)
    os.mkfifo(fifo, 0o600)
    entries.append(fifo)
    odd = [undecodable, surrogate, non_ascii, os.fsdecode(link[9:]), os.fsdecode(fifo[9:])]
    scope = [*odd, target.name]
    ascii_only = {"PYTHONIOENCODING": "ascii"}  # a terminal that cannot show "é"
    for args in (["list"], ["list", "--json"], ["cleanup", "--dry-run", "--verbose"]):
        for env in (None, ascii_only):
            ran = run_cli(*args, helper_scope=scope, env=env)
            assert ran.returncode == 0, ran.stderr
            assert ran.stderr == ""
    ran = run_cli("list", "--json", helper_scope=scope)
    listed = {record["name"]: record for record in json.loads(ran.stdout)}
    assert set(listed) == set(scope)
    assert listed[os.fsdecode(link[9:])]["error"].startswith("a symbolic link")
    assert listed[os.fsdecode(fifo[9:])]["error"].startswith("a FIFO")
    ran = run_cli("list", helper_scope=scope)
    assert "sma_\\udcff" in ran.stdout
    (line,) = [line for line in ran.stdout.splitlines() if line.startswith("sma_\\udcff")]
    assert "name is not valid UTF-8" in line
    ran = run_cli("inspect", b"sma_\xff" + tag)
    assert_one_line_error(ran, "cannot read the header")
    ran = run_cli("inspect", link[9:])
    assert_one_line_error(ran, "a symbolic link")
    ran = run_cli("inspect", PREFIX + "é" * 200)
    assert_one_line_error(ran, "not a valid shared-memory block name")
    assert all(exists(name) for name in scope)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (3 * 2**19, "1.5MiB"),
        (2**50, "1024.0TiB"),
    ],
)
def test_format_size(nbytes: int, text: str) -> None:
    """Sizes print as one word in binary units, with one decimal above 1 KiB."""
    assert cli.format_size(nbytes) == text
