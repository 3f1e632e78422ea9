"""Command line: ``python -m shared_memory_array {list,inspect,cleanup}``.

Also installed as the ``shared-memory-array`` console script. Output is one
record per line so it can be grepped, with columns that split on blanks (names
and sizes are single words); ``--json`` gives the same records for scripts,
sizes in bytes and times in seconds since the epoch. Errors are one line on
stderr with a non-zero exit status, never a traceback. Nothing here unpickles
anything: ``inspect`` is safe on a hostile block. The command only observes:
unlike other processes of the library, it reaps nothing at its exit (else
``list``, ``inspect`` and ``cleanup --dry-run`` would unlink orphans).

JSON keys (stable): ``list --json`` prints a list of objects with the fields of
:class:`~shared_memory_array.BlockInfo` (``name``, ``kind``, ``size``,
``state``, ``in_use``, ``creator_pid``, ``creator_alive``, ``modified``,
``owner_uid``, ``generation``, ``shape``, ``dtype``, ``error``, ``mapped_by``,
``resident``); ``inspect
NAME --json`` prints one object with those and the header's ``version``,
``flags`` (names), ``strides``, ``header_size``, ``data_offset``, ``nbytes``,
``block_id`` (hex), ``creator_start_ticks``, ``creator_started`` (seconds since
the epoch, or null), ``extra_size``, ``in_flight``, ``verdict`` (what
``cleanup`` would do: ``"clean"`` or ``"keep"``) and ``reason``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ._header import Header, HeaderFlags
from ._platform import backend
from ._reaper import Judgement, Verdict
from ._registry import UNREADABLE_QUIET, BlockInfo, _describe, cleanup, list_blocks
from .errors import SharedArrayError

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1  # an error, or blocks that could not be cleaned
EXIT_USAGE = 2  # argparse's own status for bad arguments

NO_BLOCKS = "no blocks of shared_memory_array found"


def format_size(nbytes: int) -> str:
    """Return ``nbytes`` in binary units as one word: ``"512B"``, ``"1.5KiB"``, ``"2.0GiB"``."""
    if nbytes < 1024:
        return f"{nbytes}B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TiB"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def _timestamp(seconds: float | None) -> str:
    if not seconds:
        return "?"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _flag_names(flags: HeaderFlags) -> list[str]:
    return [flag.name or "" for flag in HeaderFlags if flag.value and flags & flag]


def _boot_time() -> float | None:
    """Seconds since the epoch at which this machine booted, where the platform tells."""
    return backend.boot_time()


def started_at(ticks: int) -> float | None:
    """A creator's start (clock ticks since boot, as the header keeps it) in epoch seconds.

    ``None`` when unknown (0 ticks, or no /proc). As seen from this machine's
    boot clock: a creator in another time namespace started elsewhere on it.
    """
    boot = _boot_time()
    if not ticks or boot is None or not hasattr(os, "sysconf"):
        return None
    return boot + ticks / backend.clock_ticks()


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_line(text: str, *, blanks: bool = True) -> str:
    """``text`` escaped so that it stays on one line and cannot drive the terminal.

    Names and header text come from blocks anyone with access may have written;
    control characters (and blanks, where they would split a column) are shown
    as escapes.
    """

    def shown(char: str) -> str:
        if char.isprintable() and (blanks or not char.isspace()):
            return char
        return repr(char)[1:-1] if char != " " else "\\x20"

    return "".join(shown(char) for char in text)


def _list(args: argparse.Namespace, out: TextIO) -> int:
    infos = list_blocks()
    if args.json:
        json.dump([_info_json(info) for info in infos], out, indent=2)
        out.write("\n")
        return EXIT_OK
    if not infos:
        out.write(NO_BLOCKS + "\n")
        return EXIT_OK
    rows: list[tuple[str, ...]] = [
        ("NAME", "KIND", "SIZE", "SHAPE", "DTYPE", "STATE", "IN_USE", "CREATOR", "ALIVE", "NOTE")
    ]
    rows += [_list_row(info) for info in infos]
    columns = len(rows[0]) - 1  # the note is last and may hold blanks
    widths = [max(len(row[column]) for row in rows) for column in range(columns)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
    return EXIT_OK


def _list_row(info: BlockInfo) -> tuple[str, ...]:
    creator = "-" if info.creator_pid is None else str(info.creator_pid)
    note = info.error or ""
    if not _utf8(info.name):
        note = "name is not valid UTF-8" + (f"; {note}" if note else "")
    return (
        _one_line(info.name, blanks=False),
        info.kind,
        format_size(info.size),
        _shape_word(info.shape),
        "-" if info.dtype is None else _one_line(info.dtype, blanks=False),
        info.state,
        _yes_no(info.in_use),
        creator,
        _yes_no(info.creator_alive),
        _one_line(note),
    )


def _shape_word(shape: tuple[int, ...] | None) -> str:
    """A shape as one word: ``(4,2)``, ``(10,)``, ``()``; ``-`` for no shape."""
    if shape is None:
        return "-"
    return "(" + ",".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _info_json(info: BlockInfo) -> dict[str, Any]:
    record = dataclasses.asdict(info)
    record["shape"] = None if info.shape is None else list(info.shape)
    record["mapped_by"] = None if info.mapped_by is None else list(info.mapped_by)
    return record


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    info, header, judgement = _describe(args.name)
    if header is None:
        raise SharedArrayError(f"cannot read the header: {info.error}")
    if args.json:
        json.dump(_inspect_json(info, header, judgement), out, indent=2)
        out.write("\n")
        return EXIT_OK
    for field, value in _header_fields(info, header, judgement):
        out.write(f"{field:<15} {_one_line(value, blanks=field != 'name')}\n")
    return EXIT_OK


def _verdict(judgement: Judgement) -> str:
    return "clean" if judgement.verdict is Verdict.REAP else "keep"


def _inspect_json(info: BlockInfo, header: Header, judgement: Judgement) -> dict[str, Any]:
    return {
        **_info_json(info),
        "version": header.version,
        "flags": _flag_names(header.flags),
        "strides": list(header.strides),
        "header_size": header.header_size,
        "data_offset": header.data_offset,
        "nbytes": header.nbytes,
        "block_id": header.block_id.hex(),
        "creator_start_ticks": header.creator_start,
        "creator_started": started_at(header.creator_start),
        "extra_size": len(header.extra),
        "in_flight": judgement.in_flight,
        "verdict": _verdict(judgement),
        "reason": judgement.reason,
    }


def _pids(pids: tuple[int, ...] | None) -> str:
    if pids is None:
        return "unknown"
    return " ".join(map(str, pids)) if pids else "no process"


def _header_fields(info: BlockInfo, header: Header, judgement: Judgement) -> list[tuple[str, str]]:
    in_use = {True: "yes, a process maps it", False: "no process maps it", None: "unknown"}
    alive = _yes_no(info.creator_alive)
    return [
        ("name", info.name),
        ("kind", info.kind),
        ("state", info.state),
        ("in_use", in_use[info.in_use]),
        ("mapped_by", _pids(info.mapped_by)),
        ("resident", "unknown" if info.resident is None else f"{info.resident} bytes in memory"),
        ("in_flight", f"{judgement.in_flight} pickled handle(s) not yet unpickled"),
        ("cleanup", f"would {_verdict(judgement)}: {judgement.reason}"),
        ("size", f"{info.size} bytes ({format_size(info.size)})"),
        ("shape", str(header.shape)),
        ("dtype", "-" if header.dtype is None else str(header.dtype)),
        ("strides", str(header.strides)),
        ("nbytes", f"{header.nbytes} bytes of payload at offset {header.data_offset}"),
        ("flags", ", ".join(_flag_names(header.flags)) or "none"),
        ("version", f"{header.version} (header {header.header_size} bytes)"),
        ("generation", str(header.generation)),
        ("block_id", header.block_id.hex() or "-"),
        ("creator_pid", str(header.creator_pid)),
        ("creator_alive", alive),
        ("creator_started", _timestamp(started_at(header.creator_start))),
        ("owner_uid", str(info.owner_uid)),
        ("modified", _timestamp(info.modified)),
        ("extra", f"{len(header.extra)} bytes of {info.kind} metadata"),
    ]


def _cleanup(args: argparse.Namespace, out: TextIO) -> int:
    result = cleanup(dry_run=args.dry_run)
    done = "would clean" if result.dry_run else "cleaned"

    def report(stream: TextIO, verb: str, name: str, *, reason: bool) -> None:
        why = f": {_one_line(result.reasons[name])}" if reason else ""
        stream.write(f"{verb} {_one_line(name, blanks=False)}{why}\n")

    if not args.quiet:
        for name in result.cleaned:
            report(out, done, name, reason=args.verbose)
        if args.verbose:
            for name in result.skipped:
                report(out, "skipped", name, reason=True)
    for name in result.failed:
        report(sys.stderr, "failed", name, reason=True)
    if not args.quiet:
        out.write(
            f"{len(result.cleaned)} {done}, {len(result.failed)} failed, "
            f"{len(result.skipped)} skipped\n"
        )
    return EXIT_FAILURE if result.failed else EXIT_OK


def _program_name() -> str:
    launched_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if launched_as in ("", "__main__.py", "-c", "-m"):
        return "python -m shared_memory_array"
    return launched_as


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the command line."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="List, inspect and clean up the shared-memory blocks of shared_memory_array.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    listing = commands.add_parser(
        "list",
        help="list this library's blocks (one per line)",
        description=(
            "List this library's blocks: name, kind, size, state (live, pooled, orphan, "
            "unreadable), whether a process maps it, creator pid, creator alive."
        ),
    )
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    listing.set_defaults(run=_list)
    inspect = commands.add_parser(
        "inspect",
        help="show the decoded header of one block",
        description="Show the decoded header of block NAME. Never unpickles anything.",
    )
    inspect.add_argument("name", metavar="NAME", help="block name, as `list` shows it")
    inspect.add_argument("--json", action="store_true", help="print the record as JSON")
    inspect.set_defaults(run=_inspect)
    clean = commands.add_parser(
        "cleanup",
        help="unlink the blocks that no process holds",
        description=(
            "Unlink the blocks that no process maps and of which no pickled handle is "
            "in flight (asked of the kernel, whatever the creator's pid says). Blocks "
            "a process maps are never touched; a block with an unreadable header is "
            f"removed only when it is unused and unchanged for {UNREADABLE_QUIET:.0f} s."
        ),
    )
    clean.add_argument("--dry-run", action="store_true", help="report, unlink nothing")
    verbosity = clean.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="also say why each block was kept or removed"
    )
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but failures")
    clean.set_defaults(run=_cleanup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    if argv is None:  # run as a program (not called by a program that has its own exit)
        _as_a_program()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args, sys.stdout)
        sys.stdout.flush()
    except (SharedArrayError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _stdout_closed()
        message = _one_line(str(exc) or type(exc).__name__)
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return status


def _as_a_program() -> None:
    # Names are anyone's bytes: never let one that the terminal cannot show stop the output.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def _stdout_closed() -> int:
    # The reader went away (`... | head`): silence the flush at interpreter exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
