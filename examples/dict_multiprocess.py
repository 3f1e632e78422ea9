"""Several processes share one dict by name: a write is seen by every reader at once.

Run: python examples/dict_multiprocess.py
"""

from __future__ import annotations

import multiprocessing

from shared_memory_array import SharedDict

NAME = "shared_dict_example"


def reader(started: multiprocessing.synchronize.Event) -> None:
    """Process 2: attach and read what process 1 wrote."""
    with SharedDict.attach(NAME) as d:
        print("reader sees counter =", d["counter"])
        started.set()


def updater() -> None:
    """Process 3: attach and write; every other process sees the new value."""
    with SharedDict.attach(NAME) as d:
        d["counter"] = 100
        d["written by"] = multiprocessing.current_process().name


def main() -> None:
    context = multiprocessing.get_context("spawn")
    with SharedDict.create(NAME, max_items=100, heap_size=2**20) as d:  # process 1
        d["counter"] = 0
        started = context.Event()
        first = context.Process(target=reader, args=(started,))
        first.start()
        started.wait(timeout=60)
        first.join(timeout=60)
        second = context.Process(target=updater, name="updater")
        second.start()
        second.join(timeout=60)
        print("creator sees counter =", d["counter"], "written by", d["written by"])


if __name__ == "__main__":
    main()
