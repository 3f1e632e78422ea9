"""Scripts run by tests/test_native.py in processes of their own, on the path the environment picks.

``SHARED_MEMORY_ARRAY_PURE=1`` in a script's environment makes it a pure-Python process;
without it, it uses the accelerator where it is built. Each command prints
``native=<bool>`` first (which path it took), then its results, one line each:

* ``count NAME TAG N``: ``N`` increments of ``"n"``, a store of ``TAG_i`` each, then a
  check of every ``parent_*`` key the test wrote;
* ``verify NAME``: for each line ``KEY`` on standard input, one locked step (which repairs
  what a killed process left), the dict's invariants, and the value of ``KEY``;
* ``sweep NAME STEP``: for k = 1, 2, ...: fork a child that starts ``STEP`` and is killed
  at its k-th shared word store (the accelerator's test hook); print ``killed k`` and wait
  for a line on standard input; print ``done k`` once a child finishes unkilled;
* ``hold NAME``: take the dict's lock, print ``locked`` and sleep (until killed);
* ``die NAME WHERE``: ``_children_dict.die_inside`` (killed inside a write);
* ``wait NAME``: print ``waiting``, then whether ``wait_for`` saw ``go == 1`` (60 s at most);
* ``set NAME``: store ``go = 1`` (a change, which wakes whoever waits).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from shared_memory_array import SharedDict, _accel

STEPS = ("store_new", "store_replace", "store_in_place", "increment", "delete")


def step(shared: SharedDict, name: str, k: int) -> None:
    """One step of the sweep (each one a different path through the accelerator)."""
    if name == "store_new":
        shared[f"new{k}"] = "v" * 40
    elif name == "store_replace":
        shared["big"] = "x" * (300 + k)  # over 256 bytes: a new entry each time, the old freed
    elif name == "store_in_place":
        shared["small"] = f"s{k}"  # two areas after its first update: written in place
    elif name == "increment":
        shared.increment("n")
    elif name == "delete":
        del shared[f"gone{k}"]
    else:
        raise ValueError(name)


def count(name: str, tag: str, times: int) -> None:
    with SharedDict.attach(name) as shared:
        for i in range(times):
            shared.increment("n")
            shared[f"{tag}_{i % 50}"] = i
        parents = {key: shared[key] for key in shared if str(key).startswith("parent_")}
        assert parents == {f"parent_{i}": i for i in range(20)}, parents
    print("ok", flush=True)


def verify(name: str) -> None:
    with SharedDict.attach(name) as shared:
        for line in sys.stdin:
            key = line.strip()
            with shared.lock():  # the first locked step repairs
                shared._check()
                value = shared.get(key)
            print(f"{shared.stats()['repairs']} {value!r}", flush=True)


def sweep(name: str, step_name: str) -> None:
    from shared_memory_array import _native

    shared = SharedDict.attach(name)
    k = 0
    while True:
        k += 1
        pid = os.fork()
        if pid == 0:  # the child: killed at its k-th store, or done
            _native.kill_after_stores(k)
            step(shared, step_name, k)
            _native.kill_after_stores(0)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            print(f"killed {k}", flush=True)
            sys.stdin.readline()
            continue
        assert os.WIFEXITED(status), status
        assert os.WEXITSTATUS(status) == 0, status
        print(f"done {k}", flush=True)
        break
    shared.close()


def hold(name: str) -> None:
    shared = SharedDict.attach(name)
    with shared.lock():
        shared["holder"] = os.getpid()
        print("locked", flush=True)
        time.sleep(600)


def die(name: str, where: str) -> None:
    import _children_dict

    _children_dict.die_inside(name, where)


def wait(name: str) -> None:
    with SharedDict.attach(name) as shared:
        print("waiting", flush=True)
        print(shared.wait_for(lambda d: d.get("go") == 1, timeout=60), flush=True)


def set_go(name: str) -> None:
    with SharedDict.attach(name) as shared:
        shared["go"] = 1
    print("ok", flush=True)


if __name__ == "__main__":
    print(f"native={_accel.native}", flush=True)
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "count":
        count(arguments[0], arguments[1], int(arguments[2]))
    elif command == "verify":
        verify(arguments[0])
    elif command == "sweep":
        sweep(arguments[0], arguments[1])
    elif command == "hold":
        hold(arguments[0])
    elif command == "die":
        die(arguments[0], arguments[1])
    elif command == "wait":
        wait(arguments[0])
    elif command == "set":
        set_go(arguments[0])
    else:
        sys.exit(f"unknown command {command!r}")
