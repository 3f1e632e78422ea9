"""Child-process code for the registry, CLI and hostile-input tests.

Importable under ``spawn`` (the crash child) and runnable as a script:

* ``python _children_registry.py templates`` creates one genuine block of each
  kind through the public API, prints them as JSON (name, bytes, the argument
  each entry point takes) and exits, so its blocks go with it;
* ``python _children_registry.py cli-scoped NAME,NAME... ARGS`` runs the CLI
  with its scan limited to those blocks;
* ``python _children_registry.py serve`` obeys one command per line on stdin
  and answers each with one JSON line on stdout (see :func:`serve`): the
  parent makes it create, attach or pickle blocks, then SIGKILLs it or lets it
  exit, to set up each case of the lifetime rule in a process of its own;
* ``python _children_registry.py run`` reads hostile cases (JSON) on stdin,
  tries every entry point that reads a block on each, and prints one JSON
  result per case and entry point. A crash shows as a negative exit status in
  the parent; a huge allocation fails (the address space is capped).
"""

from __future__ import annotations

import base64
import contextlib
import faulthandler
import io
import json
import os
import pickle
import resource
import secrets
import sys
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from typing import Any, TextIO

import numpy as np

import shared_memory_array as sma
from shared_memory_array import __main__ as cli
from shared_memory_array import _registry
from shared_memory_array._block import SharedBlock

ADDRESS_SPACE_HEADROOM = 1 << 30  # a hostile header must not get the reader to map or allocate more
TEMPLATE_ARRAY = np.arange(24, dtype="<f8").reshape(4, 6)

Result = dict[str, Any]


# -- crash child -----------------------------------------------------------------------


def create_blocks_then_wait(queue: Queue[dict[str, Any]], dict_name: str) -> None:
    """Create arrays, codec blocks and a dict, report them, then wait to be killed."""
    arrays = [
        sma.SharedArray.copy(None, np.arange(1000, dtype="f8")),
        sma.SharedArray.allocate(None, (30, 40), "f4"),
    ]
    tokens: list[str] | None
    try:
        tokens = [sma.write(np.ones(5000, dtype="f8"), threshold=0) for _ in range(2)]
    except NotImplementedError:  # the codec's placeholder: the test skips
        tokens = None
    shared = sma.SharedDict.create(dict_name, max_items=64, heap_size=1 << 16)
    shared["answer"] = 42
    queue.put({"pid": os.getpid(), "arrays": [a.name for a in arrays], "tokens": tokens})
    time.sleep(600)  # the parent SIGKILLs us long before this


# -- a process that holds blocks on request ----------------------------------------------


def serve(commands: TextIO, replies: TextIO) -> int:
    """Obey commands, one per line, answering each with one JSON line.

    ``create array`` / ``create codec`` / ``create dict NAME``: make a block
    (kept mapped), reply ``{"name": ...}`` (a dict's also ``"data"``: its data
    block's name); ``attach NAME``: map an existing
    block and keep it; ``pickle``: pickle the last array made (a handle in
    flight), reply ``{"pickle": hex}``; ``drop``: close every handle made;
    ``exit``: a normal exit (status 0). Every reply carries this ``pid``.
    """
    kept: list[Any] = []
    arrays: list[sma.SharedArray] = []
    for line in iter(commands.readline, ""):
        words = line.split()
        reply: dict[str, Any] = {"pid": os.getpid()}
        if words == ["create", "array"]:
            array = sma.SharedArray.copy(None, np.arange(10.0))
            arrays.append(array)
            reply["name"] = array.name
        elif words == ["create", "codec"]:
            token = sma.write(np.ones(5000), threshold=0)
            kept.append(token)
            reply["name"] = token.split(":")[2]
        elif words[:2] == ["create", "dict"] and len(words) == 3:
            shared = sma.SharedDict.create(words[2], max_items=8, heap_size=4096)
            kept.append(shared)
            reply["name"] = words[2]
            reply["data"] = shared._data.name
        elif words[:1] == ["attach"] and len(words) == 2:
            kept.append(SharedBlock.attach(words[1]))
            reply["name"] = words[1]
        elif words == ["pickle"]:
            reply["pickle"] = pickle.dumps(arrays[-1]).hex()
        elif words == ["drop"]:
            for handle in [*arrays, *kept]:
                close = getattr(handle, "close", None)
                if close is not None:
                    close()
            arrays.clear()
            kept.clear()
        elif words == ["exit"]:
            return 0
        else:
            reply["error"] = f"unknown command {line!r}"
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


# -- genuine templates -----------------------------------------------------------------


def _blocks_made_here() -> set[str]:
    return {info.name for info in sma.list_blocks() if info.creator_pid == os.getpid()}


def _template(name: str, arg: str) -> dict[str, str]:
    block = SharedBlock.attach(name, readonly=True)
    try:
        raw = bytes(block.buf)
    finally:
        block.close()
    return {"block": name, "arg": arg, "bytes": base64.b64encode(raw).decode("ascii")}


def _array_template() -> dict[str, str]:
    array = sma.SharedArray.copy(None, TEMPLATE_ARRAY)
    return _template(array.name, array.name)


def _codec_template() -> dict[str, str]:
    before = _blocks_made_here()
    token = sma.write(TEMPLATE_ARRAY, threshold=0)
    (block,) = _blocks_made_here() - before
    return _template(block, token)


def _shared_data_template() -> dict[str, str]:
    before = _blocks_made_here()
    with sma.SharedData(TEMPLATE_ARRAY) as shared_data:
        (block,) = _blocks_made_here() - before
        return _template(block, shared_data.name)


def _dict_template() -> dict[str, str]:
    before = _blocks_made_here()
    name = f"sma_hostile_{secrets.token_hex(4)}"
    with sma.SharedDict.create(name, max_items=8, heap_size=4096) as mapping:
        mapping["key"] = TEMPLATE_ARRAY
        # The entry block (its data block is "<entry>~<generation>": see _dict._layout).
        (block,) = {made for made in _blocks_made_here() - before if "~" not in made}
        return _template(block, name)


def make_templates() -> dict[str, dict[str, str]]:
    """One genuine block per entry point's kind, made by the public API (placeholders left out)."""
    makers = {
        "array": _array_template,
        "codec": _codec_template,
        "shared_data": _shared_data_template,
        "dict": _dict_template,
    }
    templates = {}
    for kind, maker in makers.items():
        with contextlib.suppress(NotImplementedError, AttributeError, TypeError):
            templates[kind] = maker()  # a placeholder module raises one of these
    return templates


# -- hostile-case runner ---------------------------------------------------------------


def _touch(value: object) -> None:
    """Read every byte an array result exposes (a bad mapping would fault here)."""
    if isinstance(value, np.ndarray):
        value.tobytes()


def _array_attach(arg: str) -> None:
    with sma.SharedArray.attach(arg) as array:
        _touch(array.as_array())


def _array_attach_unsafe(arg: str) -> None:
    with sma.SharedArray.attach_unsafe(arg) as array:
        _touch(array.as_array())


def _codec_read(arg: str) -> None:
    _touch(sma.read(arg))


def _shared_data_load(arg: str) -> None:
    _touch(sma.SharedData.load(arg))


def _dict_attach(arg: str) -> None:
    mapping = sma.SharedDict.attach(arg)
    try:
        for key in mapping:
            _touch(mapping[key])
    finally:
        mapping.close()


def _inspect(arg: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["inspect", arg])
    return {"outcome": "exit", "status": status, "stderr": err.getvalue()}


ENTRY_POINTS: dict[str, Callable[[str], None]] = {
    "array.attach": _array_attach,
    "array.attach_unsafe": _array_attach_unsafe,
    "codec.read": _codec_read,
    "shared_data.load": _shared_data_load,
    "dict.attach": _dict_attach,
}


def _call(entry: Callable[[str], None], arg: str) -> Result:
    try:
        entry(arg)
    except NotImplementedError:
        return {"outcome": "unavailable"}
    except BaseException as exc:
        classes = [cls.__name__ for cls in type(exc).__mro__]
        return {
            "outcome": "raised",
            "type": type(exc).__name__,
            "mro": classes,
            "message": str(exc),
        }
    return {"outcome": "ok"}


def _placeholder(entry_name: str) -> bool:
    """Whether the module behind an entry point is still the placeholder of its issue."""
    owner = {"array": sma.SharedArray, "dict": sma.SharedDict, "shared_data": sma.SharedData}
    cls = owner.get(entry_name.split(".")[0])
    return cls is not None and not hasattr(cls, entry_name.split(".")[1])


def run_cases(cases: list[dict[str, Any]]) -> list[Result]:
    """Try every entry point on every case; one result per (case, entry point)."""
    results = []
    for case in cases:
        for entry_name, arg in case["args"].items():
            if entry_name == "cli.inspect":
                result = _inspect(arg)
            elif _placeholder(entry_name):
                result = {"outcome": "unavailable"}
            else:
                result = _call(ENTRY_POINTS[entry_name], arg)
            results.append({"case": case["id"], "entry": entry_name, **result})
    listed = {info.name: info.kind for info in sma.list_blocks()}
    for case in cases:
        results.append(
            {"case": case["id"], "entry": "list_blocks", "outcome": "listed",
             "kind": listed.get(case["block"])}
        )  # fmt: skip
    return results


def _cap_address_space() -> None:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    in_use = int(line.split()[1]) * 1024
    limit = in_use + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str]) -> int:
    """Entry point of the script (see the module docstring)."""
    faulthandler.enable()
    if argv == ["templates"]:
        json.dump(make_templates(), sys.stdout)
        return 0
    if argv[:1] == ["cli-scoped"]:
        # The CLI with its scan limited to the named blocks: a real cleanup in a
        # test must not touch other processes' orphans on a shared machine.
        scope = set(argv[1].split(","))
        real_scan = _registry._block_names
        _registry._block_names = lambda: [name for name in real_scan() if name in scope]
        cli._as_a_program()  # as `python -m shared_memory_array` does (main gets argv here)
        return cli.main(argv[2:])
    if argv == ["serve"]:
        return serve(sys.stdin, sys.stdout)
    if argv == ["run"]:
        cases = json.load(sys.stdin)
        _cap_address_space()
        json.dump(run_cases(cases), sys.stdout)
        return 0
    sys.stderr.write("usage: _children_registry.py templates|run|serve|cli-scoped NAMES ARGS...\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
