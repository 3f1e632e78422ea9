"""Command line: ``python -m shared_memory_array {list,inspect,cleanup}``.

Also installed as the ``shared-memory-array`` console script. Output is one
record per line so it can be grepped; errors are one line on stderr with a
non-zero exit status, never a traceback. Nothing here unpickles anything:
``inspect`` is safe on a hostile block.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ._header import Header, HeaderFlags
from ._registry import GRACE_PERIOD, BlockInfo, cleanup, describe_block, list_blocks
from .errors import SharedArrayError

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1  # an error, or blocks that could not be cleaned
EXIT_USAGE = 2  # argparse's own status for bad arguments

_EXTRA_PREVIEW = 32  # bytes of kind-specific metadata shown by ``inspect``


def format_size(nbytes: int) -> str:
    """Return ``nbytes`` in binary units: ``"512 B"``, ``"1.5 KiB"``, ``"2.0 GiB"``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def _timestamp(seconds: float) -> str:
    if not seconds:
        return "?"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _flag_names(flags: HeaderFlags) -> str:
    names = [flag.name or "" for flag in HeaderFlags if flag.value and flags & flag]
    return "|".join(names) or "NONE"


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
    rows = [("NAME", "KIND", "SIZE", "CREATOR", "ALIVE", "NOTE")]
    rows += [_list_row(info) for info in list_blocks()]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[5]]).rstrip() + "\n")
    return EXIT_OK


def _list_row(info: BlockInfo) -> tuple[str, str, str, str, str, str]:
    creator = "-" if info.creator_pid is None else str(info.creator_pid)
    alive = _yes_no(info.creator_alive)
    name, note = _one_line(info.name, blanks=False), _one_line(info.error or "")
    return (name, info.kind, format_size(info.size), creator, alive, note)


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    info, header = describe_block(args.name)
    if header is None:
        raise SharedArrayError(f"cannot read the header: {info.error}")
    for field, value in _header_fields(info, header):
        out.write(f"{field:<14} {_one_line(value, blanks=field != 'name')}\n")
    return EXIT_OK


def _header_fields(info: BlockInfo, header: Header) -> list[tuple[str, str]]:
    extra = header.extra
    preview = extra[:_EXTRA_PREVIEW].hex() + ("..." if len(extra) > _EXTRA_PREVIEW else "")
    return [
        ("name", info.name),
        ("kind", info.kind),
        ("size", f"{info.size} ({format_size(info.size)})"),
        ("version", str(header.version)),
        ("flags", _flag_names(header.flags)),
        ("shape", str(header.shape)),
        ("strides", str(header.strides)),
        ("dtype", "-" if header.dtype is None else str(header.dtype)),
        ("header_size", str(header.header_size)),
        ("data_offset", str(header.data_offset)),
        ("nbytes", str(header.nbytes)),
        ("generation", str(header.generation)),
        ("creator_pid", str(header.creator_pid)),
        ("creator_start", str(header.creator_start)),
        ("creator_alive", _yes_no(info.creator_alive)),
        ("owner_uid", str(info.owner_uid)),
        ("modified", _timestamp(info.modified)),
        ("extra", f"{len(extra)} bytes {preview}".rstrip()),
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
        description="List this library's blocks: name, kind, size, creator pid, creator alive.",
    )
    listing.set_defaults(run=_list)
    inspect = commands.add_parser(
        "inspect",
        help="show the decoded header of one block",
        description="Show the decoded header of block NAME. Never unpickles anything.",
    )
    inspect.add_argument("name", metavar="NAME", help="block name, as `list` shows it")
    inspect.set_defaults(run=_inspect)
    clean = commands.add_parser(
        "cleanup",
        help="unlink blocks whose creating process has exited",
        description=(
            "Unlink the blocks whose creating process has exited. Blocks of running "
            "processes are never touched; a block with an unreadable header is removed "
            f"only when it is unused and unchanged for {GRACE_PERIOD:.0f} s."
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


def _stdout_closed() -> int:
    # The reader went away (`... | head`): silence the flush at interpreter exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
