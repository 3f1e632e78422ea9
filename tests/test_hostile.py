"""Hostile blocks against every entry point that reads one.

Cases are built here from genuine blocks (made by the public API in a child
that then exits): random bytes, truncation, a block shrunk after creation,
header fields mutated with the checksum recomputed (so the checks behind the
CRC are reached), shape/offsets claiming more than the block holds, wrong kind,
wrong version, a 0-byte block, a missing block. One child per batch tries every
entry point on every case (``_children_registry.py run``); it must exit
normally within the timeout, and each result must match the one header parser:

* the parser rejects the block for the entry point's kind -> ``LayoutError``;
* the parser accepts it -> success, or a ``SharedArrayError`` subclass (the
  kind's own metadata may still be inconsistent);
* a missing block -> ``BlockNotFoundError``;
* ``list_blocks`` lists the block, as ``unknown`` exactly when unreadable;
  ``inspect`` exits 1 with one line on stderr exactly when unreadable, else 0.
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _header_tools import FIELD_FORMATS, reseal, with_field
from conftest import has
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from shared_memory_array._block import PREFIX, SharedBlock
from shared_memory_array._header import FIXED_SIZE, BlockKind, encode_header, parse_header
from shared_memory_array.errors import LayoutError

SHM_DIR = "/dev/shm"
RUNNER = Path(__file__).with_name("_children_registry.py")
RUN_TIMEOUT = 120  # seconds; a hang fails the test instead of stalling the suite

# The kind each entry point reads; "shared_data" and the CLI are resolved from the templates.
# Entry points documented to skip the checksum (bounds are still checked).
UNCHECKED_CRC = {"array.attach_unsafe"}

ENTRY_KINDS = {
    "array.attach": "array",
    "array.attach_unsafe": "array",
    "codec.read": "codec",
    "shared_data.load": "shared_data",
    "dict.attach": "dict",
}


@dataclass(frozen=True)
class Template:
    """A genuine block: its bytes, its name, and the argument an entry point takes for it."""

    block: str
    arg: str
    raw: bytes

    def arg_for(self, case_block: str) -> str | None:
        """The entry point's argument for a copy of this block named ``case_block``."""
        if self.arg == self.block:
            return case_block
        if self.block in self.arg:  # a token naming the block
            return self.arg.replace(self.block, case_block)
        prefix = self.block[: len(self.block) - len(self.arg)]
        if self.block.endswith(self.arg) and case_block.startswith(prefix):
            return case_block[len(prefix) :]
        return None


@dataclass(frozen=True)
class Case:
    """One hostile block: its final bytes, and the size it had before being shrunk.

    ``file_type`` other than ``"block"`` puts a FIFO or a directory under the
    block's name instead (opening a FIFO for reading would block forever).
    """

    label: str
    content: bytes
    created_size: int = 0
    missing: bool = False
    file_type: str = "block"


def _raw_template(kind: BlockKind) -> Template:
    """A header-valid block of ``kind`` for entry points whose module is still a placeholder."""
    header = encode_header(kind, nbytes=64)
    name = PREFIX + "raw_" + kind.name.lower()
    return Template(name, name, header + bytes(64))


@pytest.fixture(scope="module")
def templates() -> dict[str, Template]:
    """Genuine blocks of every kind, made by the public API in a child that has exited."""
    made = subprocess.run(
        [sys.executable, str(RUNNER), "templates"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    found = {
        key: Template(value["block"], value["arg"], base64.b64decode(value["bytes"]))
        for key, value in json.loads(made.stdout).items()
    }
    found.setdefault("codec", _raw_template(BlockKind.CODEC))
    found.setdefault("shared_data", found["codec"])
    found.setdefault("dict", _raw_template(BlockKind.DICT))
    return found


def _expected_kind(entry: str, templates: dict[str, Template]) -> BlockKind:
    template = templates[ENTRY_KINDS[entry]]
    return parse_header(template.raw).kind


def _parses(content: bytes, kind: BlockKind | None, *, verify_checksum: bool = True) -> bool:
    try:
        parse_header(content, expected_kind=kind, verify_checksum=verify_checksum)
    except LayoutError:
        return False
    return True


def run_batch(cases: list[Case], templates: dict[str, Template]) -> list[str]:
    """Write cases to blocks, run the child on them, check every result, unlink the blocks.

    Returns the entry points that are still placeholders (their results are not checked).
    """
    names: list[str] = []
    held: list[SharedBlock] = []  # held while the child runs: an unheld block is an orphan
    specs = []
    try:
        for index, case in enumerate(cases):
            name = PREFIX + secrets.token_hex(8)
            if not case.missing:
                names.append(name)
                block = _write_case_block(name, case)
                if block is not None:
                    held.append(block)
            args = {"cli.inspect": name}
            for entry, template_key in ENTRY_KINDS.items():
                arg = templates[template_key].arg_for(name)
                if arg is not None:
                    args[entry] = arg
            specs.append({"id": index, "block": name, "args": args})
        results = _run_child(specs)
    finally:
        for block in held:
            block.close()
        for name in names:
            path = os.path.join(SHM_DIR, name)
            if os.path.isdir(path):
                os.rmdir(path)
            elif os.path.exists(path):
                os.unlink(path)  # a FIFO too, which unlink_block would refuse to judge
    return _check(cases, specs, results, templates)


def _write_case_block(name: str, case: Case) -> SharedBlock | None:
    """Create the block at its original size, fill it, and shrink it to the case's length.

    Returns the creating handle, still open (so the block is held, but no longer
    owned: an owned block without a header is one still being created), or ``None``
    for entries that are not blocks.
    """
    path = os.path.join(SHM_DIR, name)
    if case.file_type == "fifo":
        os.mkfifo(path, 0o600)
        return None
    if case.file_type == "directory":
        os.mkdir(path, 0o700)
        return None
    size = max(case.created_size, len(case.content), 1)
    block = SharedBlock.create(size, name=name)
    block.buf[: len(case.content)] = case.content
    block.hold.drop_owner()
    if size != len(case.content):
        os.truncate(path, len(case.content))
    return block


def _run_child(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    ran = subprocess.run(
        [sys.executable, str(RUNNER), "run"],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=False,
    )
    assert ran.returncode == 0, f"runner died with status {ran.returncode}:\n{ran.stderr[-4000:]}"
    results: list[dict[str, Any]] = json.loads(ran.stdout)
    return results


def _check(
    cases: list[Case],
    specs: list[dict[str, Any]],
    results: list[dict[str, Any]],
    templates: dict[str, Template],
) -> list[str]:
    """Assert every result against the parser's verdict; return the entries still placeholders."""
    unavailable = set()
    problems = []
    for result in results:
        case = cases[result["case"]]
        entry = result["entry"]
        where = f"{case.label} -> {entry}: {result}"
        if result["outcome"] == "unavailable":
            unavailable.add(entry)
        elif entry == "list_blocks":
            expected = None if case.missing or not _listable(case) else _listed_kind(case)
            if result["kind"] != expected:
                problems.append(f"{where} (expected kind {expected})")
        elif entry == "cli.inspect":
            readable = _listed_kind(case) != "unknown"
            stderr_lines = result["stderr"].splitlines()
            ok = result["outcome"] == "exit" and (
                result["status"] == 0 if readable else result["status"] == 1
            )
            if not ok or (not readable and len(stderr_lines) != 1):
                problems.append(f"{where} (readable={readable})")
        else:
            expected_error = _expected_error(
                case, _expected_kind(entry, templates), verify_checksum=entry not in UNCHECKED_CRC
            )
            if not _matches(result, expected_error):
                problems.append(
                    f"{where} (expected {expected_error or 'success or SharedArrayError'})"
                )
    assert not problems, "\n".join(problems)
    assert len(results) == sum(len(spec["args"]) + 1 for spec in specs)
    return sorted(unavailable)


def _listable(case: Case) -> bool:
    """Whether ``list_blocks`` can see the case at all.

    A FIFO or directory put in /dev/shm by hand is listed only where blocks are
    the files of a directory: the portable backend lists its lock files, and
    such an entry has none.
    """
    return case.file_type == "block" or has("block_files")


def _listed_kind(case: Case) -> str:
    if case.file_type != "block" or case.missing:
        return "unknown"
    try:
        return parse_header(case.content).kind.name.lower()
    except LayoutError:
        return "unknown"


def _expected_error(case: Case, kind: BlockKind, *, verify_checksum: bool) -> str | None:
    if case.missing:
        return "BlockNotFoundError"
    if case.file_type != "block":
        return "SharedArrayError"  # not a block: BlockNotFoundError or LayoutError
    return None if _parses(case.content, kind, verify_checksum=verify_checksum) else "LayoutError"


def _matches(result: dict[str, Any], expected_error: str | None) -> bool:
    if expected_error is not None:
        return result["outcome"] == "raised" and expected_error in result["mro"]
    return result["outcome"] == "ok" or (
        result["outcome"] == "raised" and "SharedArrayError" in result["mro"]
    )


def _skip_if_placeholders(unavailable: list[str]) -> None:
    if unavailable:
        pytest.skip(f"entry points still placeholders (checked the others): {unavailable}")


# -- named cases -----------------------------------------------------------------------


def _header_size(raw: bytes) -> int:
    return int(struct.unpack_from("<I", raw, 16)[0])


def _named_cases(templates: dict[str, Template]) -> list[Case]:
    rng = random.Random(5)
    cases = [Case("missing block", b"", missing=True), Case("0-byte block", b"", created_size=4096)]
    cases.append(Case("random bytes", rng.randbytes(4096)))
    cases.append(Case("random bytes, short", rng.randbytes(40)))
    cases.append(Case("a FIFO named like a block", b"", file_type="fifo"))
    cases.append(Case("a directory named like a block", b"", file_type="directory"))
    for key, template in templates.items():
        raw = template.raw
        header_size = _header_size(raw)
        full = len(raw)
        cases += [
            Case(f"{key}: genuine (wrong kind for the others)", raw),
            Case(f"{key}: shrunk below the fixed header", raw[: FIXED_SIZE - 1], full),
            Case(f"{key}: shrunk inside the header", raw[: header_size - 8], full),
            Case(f"{key}: shrunk to the header only", raw[:header_size], full),
            Case(f"{key}: shrunk by one byte", raw[:-1], full),
            Case(f"{key}: magic text-mangled", b"\x93SMA\n" + raw[5:]),
            Case(f"{key}: checksum broken", raw[:30] + bytes([raw[30] ^ 0xFF]) + raw[31:]),
            Case(f"{key}: version 2", bytes(with_field(raw, "version", 2))),
            Case(f"{key}: kind 99", bytes(with_field(raw, "kind", 99))),
            Case(f"{key}: unknown flag", bytes(with_field(raw, "flags", 0x80))),
            Case(f"{key}: nbytes past the end", bytes(with_field(raw, "nbytes", full))),
            Case(f"{key}: nbytes 2**64-1", bytes(with_field(raw, "nbytes", 2**64 - 1))),
            Case(f"{key}: data_offset 2**63", bytes(with_field(raw, "data_offset", 2**63))),
            Case(f"{key}: header_size 2**32-1", bytes(with_field(raw, "header_size", 2**32 - 1))),
            Case(f"{key}: ndim 64", bytes(with_field(raw, "ndim", 64))),
            Case(f"{key}: extra_len 2**32-1", bytes(with_field(raw, "extra_len", 2**32 - 1))),
            Case(f"{key}: descr_len 2**31", bytes(with_field(raw, "descr_len", 2**31))),
            Case(f"{key}: creator pid 0", bytes(with_field(raw, "creator_pid", 0))),
            Case(f"{key}: creator pid 2**32-1", bytes(with_field(raw, "creator_pid", 2**32 - 1))),
            Case(f"{key}: generation +1", bytes(_bump_generation(raw))),
        ]
        (ndim,) = struct.unpack_from("<H", raw, 14)
        if ndim:
            cases.append(Case(f"{key}: shape[0] 10**12", bytes(_set_dim(raw, 0, 10**12))))
            cases.append(Case(f"{key}: stride[0] 2**40", bytes(_set_dim(raw, ndim, 2**40))))
            cases.append(Case(f"{key}: shape[0] -1", bytes(_set_dim(raw, 0, -1))))
        extra_len = struct.unpack_from("<I", raw, 28)[0]
        if extra_len:
            cases.append(Case(f"{key}: extra bytes all 0xFF", bytes(_fill_extra(raw, 0xFF))))
            cases.append(Case(f"{key}: extra bytes all zero", bytes(_fill_extra(raw, 0x00))))
    return cases


def _bump_generation(raw: bytes) -> bytearray:
    (generation,) = struct.unpack_from("<Q", raw, 48)
    return with_field(raw, "generation", generation + 1)


def _set_dim(raw: bytes, index: int, value: int) -> bytearray:
    """Set shape entry ``index`` (strides follow the ndim shape entries) and reseal."""
    mutated = bytearray(raw)
    struct.pack_into("<q", mutated, FIXED_SIZE + 8 * index, value)
    return reseal(mutated)


def _fill_extra(raw: bytes, byte: int) -> bytearray:
    ndim, descr_len, extra_len = (
        struct.unpack_from("<H", raw, 14)[0],
        struct.unpack_from("<I", raw, 24)[0],
        struct.unpack_from("<I", raw, 28)[0],
    )
    start = FIXED_SIZE + 16 * ndim + descr_len
    mutated = bytearray(raw)
    mutated[start : start + extra_len] = bytes([byte]) * extra_len
    return reseal(mutated)


def test_named_hostile_cases(templates: dict[str, Template]) -> None:
    """Each named hostile case gets the parser's verdict at every entry point; the child lives."""
    unavailable = run_batch(_named_cases(templates), templates)
    _skip_if_placeholders(unavailable)


# -- generated cases -------------------------------------------------------------------

_FIELD_LIMITS = {
    name: 2 ** (8 * struct.calcsize(fmt)) - 1 for name, (_, fmt) in FIELD_FORMATS.items()
}


TEMPLATE_KEYS = ["array", "codec", "dict", "shared_data"]
_SPECIAL_VALUES = [0, 1, 2, 63, 64, 65, 72, 2**16 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


@dataclass(frozen=True)
class Mutation:
    """How to turn a template into a hostile block; positions are taken modulo the sizes.

    The strategy knows nothing of the templates (which come from a child at run
    time), so its draws never depend on external state.
    """

    how: str
    key: str = "array"
    field: str = "nbytes"
    number: int = 0
    relative: bool = False  # ``number`` is an offset from the template's length
    payload: bytes = b""

    def apply(self, templates: dict[str, Template]) -> Case:
        if self.how == "random":
            return Case("random bytes", self.payload)
        raw = templates[self.key].raw
        if self.how == "truncate":
            length = self.number % len(raw)
            return Case(f"{self.key} shrunk to {length}", raw[:length], len(raw))
        if self.how == "field":
            value = (len(raw) + self.number if self.relative else self.number) & _FIELD_LIMITS[
                self.field
            ]
            return Case(
                f"{self.key} {self.field}={value}", bytes(with_field(raw, self.field, value))
            )
        if self.how == "dim":
            (ndim,) = struct.unpack_from("<H", raw, 14)
            index = self.number % max(2 * ndim, 1)
            value = int.from_bytes(self.payload[:8].ljust(8, b"\0"), "little", signed=True)
            return Case(f"{self.key} dim[{index}]={value}", bytes(_set_dim(raw, index, value)))
        offset = self.number % min(len(raw), _header_size(raw))
        mask = (self.payload[:1] or b"\x01")[0] or 1
        mutated = bytearray(raw)
        mutated[offset] ^= mask
        if self.how == "flip+reseal":
            mutated = reseal(mutated)
        return Case(f"{self.key} byte {offset} ^ {mask} ({self.how})", bytes(mutated))


_keys = st.sampled_from(TEMPLATE_KEYS)
_positions = st.integers(0, 2**20)
MUTATIONS = st.one_of(
    st.builds(Mutation, how=st.just("random"), payload=st.binary(max_size=600)),
    st.builds(Mutation, how=st.just("truncate"), key=_keys, number=_positions),
    st.builds(
        Mutation,
        how=st.just("field"),
        key=_keys,
        field=st.sampled_from(sorted(FIELD_FORMATS)),
        number=st.sampled_from(_SPECIAL_VALUES) | st.integers(0, 2**64 - 1),
    ),
    st.builds(
        Mutation,
        how=st.just("field"),
        key=_keys,
        field=st.sampled_from(["nbytes", "data_offset", "header_size", "extra_len"]),
        number=st.integers(-2, 2),
        relative=st.just(True),
    ),
    st.builds(
        Mutation,
        how=st.just("dim"),
        key=_keys,
        number=_positions,
        payload=st.binary(min_size=8, max_size=8),
    ),
    st.builds(
        Mutation,
        how=st.sampled_from(["flip", "flip+reseal"]),
        key=_keys,
        number=_positions,
        payload=st.binary(min_size=1, max_size=1),
    ),
)


# No shrinking: each example costs a child process, and the failure message
# already names every failing case and entry point.
@settings(max_examples=8, phases=[Phase.explicit, Phase.generate])
@given(mutations=st.lists(MUTATIONS, min_size=20, max_size=40))
def test_generated_hostile_cases(templates: dict[str, Template], mutations: list[Mutation]) -> None:
    """Hypothesis-generated hostile blocks give the parser's verdict at every entry point."""
    unavailable = run_batch([mutation.apply(templates) for mutation in mutations], templates)
    _skip_if_placeholders(unavailable)
