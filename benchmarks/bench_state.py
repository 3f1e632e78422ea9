"""Shared state: wake-up latency, a private view's memory, and huge pages.

* **Wake-up latency** (issue 19): one process notifies, another returns from its
  wait; the time between the two (``time.perf_counter_ns``, the same clock in
  both processes), median and 99th percentile over ``--rounds`` round trips,
  for ``SharedArray.notify``/``wait`` and ``SharedDict`` ``wait_for`` beside
  ``multiprocessing.Event`` and ``multiprocessing.Condition``, in the same run.
* **A reader that modifies 1 % of a 400 MB array** (issue 19): the extra
  memory of ``read(token, private=True)`` (copy-on-write: only the pages
  written are copied) against ``np.array(read(token))`` (a private copy of
  everything), as the growth of the reader's resident private memory.
* **A cold 1 GiB transfer into new shared pages** (issue 20): ``SharedArray.copy``
  of 1 GiB into /dev/shm's 4 KiB pages against the same into a private tmpfs
  mounted ``huge=always`` (``configure(directory=...)``), in a private mount
  namespace (as root; the row is left out, saying why, where that is impossible).

Run: python benchmarks/bench_state.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from _timing import MiB, Table, fmt_size, fmt_time, ratio

from shared_memory_array import SharedArray, SharedDict, read, release, write

# fork where there is fork: the children share this module's functions at no start-up cost.
_context: Any = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")


# -- wake-up latency ------------------------------------------------------------------------


def _array_waiter(name: str, stamp_name: str, rounds: int, ready: Any) -> None:
    frame = SharedArray.attach(name)
    stamps = SharedArray.attach(stamp_name)
    view = stamps.as_array()
    generation = frame.notify()  # the parent waits for this one: "ready"
    ready.set()
    for index in range(rounds):
        generation = frame.wait(timeout=60, after=generation)
        view[index] = time.perf_counter_ns() - view[index]
        stamps.notify()  # the acknowledgement


def _array_latencies(rounds: int) -> list[float]:
    with SharedArray.allocate(1, "int64") as frame, SharedArray.allocate(rounds, "int64") as stamps:
        view = stamps.as_array()
        ready = _context.Event()
        child = _context.Process(
            target=_array_waiter, args=(frame.name, stamps.name, rounds, ready)
        )
        child.start()
        ready.wait(60)
        ack = stamps.notify()  # the generation the waiter's first acknowledgement moves on
        for index in range(rounds):
            time.sleep(0.0002)  # let the waiter go back to sleep
            view[index] = time.perf_counter_ns()
            frame.notify()
            ack = stamps.wait(timeout=60, after=ack)
        child.join(60)
        return [float(value) / 1e9 for value in view]


def _dict_waiter(name: str, rounds: int, ready: Any, stamps_name: str) -> None:
    shared = SharedDict.attach(name)
    stamps = SharedArray.attach(stamps_name)
    view = stamps.as_array()
    ready.set()
    for index in range(rounds):
        shared.wait_for(lambda d, i=index: d.get("round", -1) >= i, timeout=60)  # type: ignore[misc]
        view[index] = time.perf_counter_ns() - view[index]
        stamps.notify()


def _dict_latencies(rounds: int) -> list[float]:
    name = f"bench_state_{os.getpid()}"
    with (
        SharedDict.create(name, max_items=16) as shared,
        SharedArray.allocate(rounds, "int64") as stamps,
    ):
        view = stamps.as_array()
        ready = _context.Event()
        child = _context.Process(target=_dict_waiter, args=(name, rounds, ready, stamps.name))
        child.start()
        ready.wait(60)
        ack = stamps.notify()  # the generation the waiter's first acknowledgement moves on
        for index in range(rounds):
            time.sleep(0.0002)
            view[index] = time.perf_counter_ns()
            shared["round"] = index
            ack = stamps.wait(timeout=60, after=ack)
        child.join(60)
        return [float(value) / 1e9 for value in view]


def _event_waiter(go: Any, back: Any, stamps: Any, rounds: int) -> None:
    for index in range(rounds):
        go.wait()
        go.clear()
        stamps[index] = time.perf_counter_ns() - stamps[index]
        back.set()


def _event_latencies(rounds: int) -> list[float]:
    go, back = _context.Event(), _context.Event()
    stamps = _context.Array("q", rounds, lock=False)
    child = _context.Process(target=_event_waiter, args=(go, back, stamps, rounds))
    child.start()
    for index in range(rounds):
        time.sleep(0.0002)
        stamps[index] = time.perf_counter_ns()
        go.set()
        back.wait()
        back.clear()
    child.join(60)
    return [float(value) / 1e9 for value in stamps]


def _condition_waiter(condition: Any, state: Any, done: Any, stamps: Any, rounds: int) -> None:
    for index in range(rounds):
        with condition:
            condition.wait_for(lambda i=index: state.value > i)
        stamps[index] = time.perf_counter_ns() - stamps[index]
        with condition:
            done.value = index + 1  # the acknowledgement
            condition.notify_all()


def _condition_latencies(rounds: int) -> list[float]:
    condition = _context.Condition()
    state = _context.Value("q", 0, lock=False)
    done = _context.Value("q", 0, lock=False)
    stamps = _context.Array("q", rounds, lock=False)
    child = _context.Process(
        target=_condition_waiter, args=(condition, state, done, stamps, rounds)
    )
    child.start()
    for index in range(rounds):
        time.sleep(0.0002)
        with condition:
            stamps[index] = time.perf_counter_ns()
            state.value = index + 1
            condition.notify_all()
            condition.wait_for(lambda i=index: done.value > i)
    child.join(60)
    return [float(value) / 1e9 for value in stamps]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_table(rounds: int) -> Table:
    """Wake-up latency, ours beside multiprocessing's Event and Condition."""
    table = Table(
        f"Wake-up latency: notify in one process to return from wait in another ({rounds} rounds)",
        ["primitive", "median", "p99", "median vs mp.Event", "median vs mp.Condition"],
    )
    event, condition = "multiprocessing.Event set / wait", "multiprocessing.Condition notify_all"
    runs = {
        "SharedArray.notify / wait": _array_latencies,
        "SharedDict change / wait_for": _dict_latencies,
        event: _event_latencies,
        condition: _condition_latencies,
    }
    # Interleaved passes, each after a short warm-up of its own, so that a drift of the
    # machine's speed during the run touches every primitive alike.
    results: dict[str, list[float]] = {label: [] for label in runs}
    passes = 4
    for _ in range(passes):
        for label, run in runs.items():
            run(20)
            results[label] += run(max(1, rounds // passes))
    medians = {label: statistics.median(values) for label, values in results.items()}
    for label, values in results.items():
        ours = not label.startswith("multiprocessing")
        table.add(
            label,
            fmt_time(medians[label]),
            fmt_time(_percentile(values, 0.99)),
            ratio(medians[label], medians[event]) if ours else "-",
            ratio(medians[label], medians[condition]) if ours else "-",
        )
    table.note(
        "Each round: the waiter sleeps, the other process stamps the time and notifies (or "
        "sets, or changes the dict); the waiter subtracts the stamp when its wait returns. "
        f"{passes} interleaved passes, each after 20 warm-up rounds."
    )
    return table


# -- a private view's memory ----------------------------------------------------------------


def _private_memory() -> int:
    """Bytes of this process's private resident memory (anonymous + copied-on-write pages)."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as smaps:
            fields = dict(
                (line.split(":")[0], int(line.split()[1]))
                for line in smaps
                if line.split(":")[0] in ("Private_Dirty", "Private_Clean")
            )
        return (fields.get("Private_Dirty", 0) + fields.get("Private_Clean", 0)) * 1024
    except OSError:
        return 0


def _modify_one_percent(token: str, private: bool, results: Any) -> None:
    before = _private_memory()
    array = read(token, private=True) if private else np.array(read(token))
    array[: array.size // 100] += 1  # a contiguous 1 %: the pages of 1 % of the array
    results.put(_private_memory() - before)


def memory_table(nbytes: int) -> Table:
    """A reader modifying 1 % of an array: private view against a full copy."""
    table = Table(
        f"A reader that modifies 1 % of a {nbytes / 1e6:g} MB array: its extra memory",
        ["reader", "extra private memory", "vs np.array(read(token))"],
    )
    token = write(np.zeros(nbytes // 8, dtype=np.float64), threshold=0)
    try:
        figures = {}
        for private in (True, False):
            results = _context.Queue()
            child = _context.Process(target=_modify_one_percent, args=(token, private, results))
            child.start()
            figures[private] = results.get(timeout=120)
            child.join(60)
        less = figures[False] / figures[True] if figures[True] > 0 else float("inf")
        table.add(
            "read(token, private=True)",
            f"{figures[True] / 1e6:.1f} MB",
            f"ours uses {less:.1f}× less",
        )
        table.add("np.array(read(token))", f"{figures[False] / 1e6:.1f} MB", "-")
    finally:
        release(token)
    table.note("Private memory from /proc/self/smaps_rollup, after minus before, in the reader.")
    return table


# -- huge pages -----------------------------------------------------------------------------

_COLD_COPY = r"""
import sys, time
import numpy as np
import shared_memory_array as sma
nbytes = int(sys.argv[1])
if len(sys.argv) > 2:
    sma.configure(directory=sys.argv[2])
source = np.ones(nbytes // 8)
best = float("inf")
for _ in range(3):
    start = time.perf_counter()
    copy = sma.SharedArray.copy(source)
    best = min(best, time.perf_counter() - start)
    copy.close()
print(best)
"""


def huge_page_table(nbytes: int) -> Table:
    """A cold copy into new shared pages: 4 KiB pages against a huge=always tmpfs."""
    table = Table(
        f"A cold {fmt_size(nbytes)} copy into new shared pages (SharedArray.copy, best of 3)",
        ["where", "time", "vs /dev/shm (4 KiB pages)"],
    )
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        table.note("Left out: needs root and unshare -m to mount a tmpfs with huge pages.")
        return table
    mount_point = tempfile.mkdtemp(prefix="sma-huge-")
    script = (
        f"mount -t tmpfs -o huge=always,size={2 * nbytes + (64 << 20)} tmpfs {mount_point} && "
        f'"$0" -c "$1" {nbytes} && "$0" -c "$1" {nbytes} {mount_point}'
    )
    try:
        done = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                sys.executable,
                _COLD_COPY,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        os.rmdir(mount_point)
    if done.returncode != 0:
        table.note(f"Left out: the private huge-page tmpfs failed: {done.stderr.strip()[-200:]}")
        return table
    small, huge = (float(line) for line in done.stdout.split())
    table.add("/dev/shm (4 KiB pages)", fmt_time(small), "-")
    table.add("a tmpfs mounted huge=always", fmt_time(huge), ratio(huge, small))
    table.note("Both in one private mount namespace, one after the other, the same process kind.")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="wake-up round trips")
    arguments = parser.parse_args()
    rounds = arguments.rounds or (200 if arguments.quick else 2000)
    print(
        f"# Shared state: waiting, private views, huge pages "
        f"(Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()})"
    )
    latency_table(rounds).print()
    memory_table((40 if arguments.quick else 400) * 1000 * 1000).print()
    huge_page_table((64 * MiB) if arguments.quick else (1 << 30)).print()


if __name__ == "__main__":
    main()
