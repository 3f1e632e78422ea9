"""The first transfers of a large array: ``write`` + ``read`` + ``release``, 1st, 2nd and 3rd.

The first transfer fills a new block by ``pwrite``; ``release`` pools it; the
second reuses it by copying through the writer's mapping, which used to take
a page fault per page. With the populate thread (``_populate``) the pooled
block's mapping is mapped in off the hot path. Both are measured in the same
run, alternating: "before" stubs the populate thread and the hot-path prefault
out. Two cadences: back to back (the next write right after the release, so
the thread has no time: the write maps what is left itself) and with a pause
between transfers (untimed), as when a worker computes before the next round.

Each figure is the median of ``--repeat`` rounds, each from an empty pool;
``faults`` are the minor page faults of the calling thread during the transfer.

Run: python benchmarks/bench_reuse.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from _timing import fmt_time

from shared_memory_array import _codec, _populate, read, release, write

MB = 1000 * 1000
_RUSAGE = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


def _faults() -> int:
    return resource.getrusage(_RUSAGE).ru_minflt


def _no_submit(view: memoryview, start: int = 0) -> _populate.Job:
    """``_populate.submit`` before the change: nothing is populated."""
    job = _populate.Job(view[:0], 0)
    job.done = True
    return job


def _no_prefault(
    view: memoryview, start: int = 0, stop: int | None = None, *, by_reading: bool = False
) -> bool:
    """``_populate.prefault`` before the change: nothing is mapped in."""
    return False


@contextmanager
def _variant(after: bool) -> Iterator[None]:
    """Before (``after=False``): the populate thread and the hot-path prefault stubbed out."""
    saved = _populate.submit, _populate.prefault
    if not after:
        _populate.submit, _populate.prefault = _no_submit, _no_prefault
    try:
        yield
    finally:
        _populate.submit, _populate.prefault = saved


def _transfer(array: np.ndarray) -> tuple[float, int]:
    faults = _faults()
    start = time.perf_counter()
    token = write(array)
    result = read(token)
    del result
    release(token)
    return time.perf_counter() - start, _faults() - faults


def _round(array: np.ndarray, *, after: bool, pause: float) -> list[tuple[float, int]]:
    """Three transfers from an empty pool: ``[(seconds, faults), ...]``."""
    _codec.writer.drop_all()
    _populate.wait_idle(30)
    with _variant(after):
        figures = []
        for index in range(3):
            if index and pause:
                time.sleep(pause)
            figures.append(_transfer(array))
        _codec.writer.drop_all()
        _populate.wait_idle(30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 10")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per figure (median)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    print(
        f"# Codec reuse benchmark{' (quick)' if args.quick else ''}: Python "
        f"{platform.python_version()}, numpy {np.__version__}, {platform.platform()}"
    )
    print(
        "\n## the first three transfers of a large array: write + read + release, "
        f"median of {args.repeat} rounds\n"
    )
    print("| size | cadence | variant | 1st | 2nd | 3rd | faults 1st/2nd/3rd |")
    print("|---|---|---|---|---|---|---|")
    for nbytes in (100 * MB // scale, 1000 * MB // scale):
        array = np.ones(nbytes // 4, np.float32)
        pause = max(0.05, nbytes / 2e9)  # time enough for the thread (~0.25 s per GB here)
        for cadence, gap in (("back to back", 0.0), (f"pause {gap_text(pause)}", pause)):
            rounds: dict[bool, list[list[tuple[float, int]]]] = {False: [], True: []}
            for _ in range(args.repeat):
                for after in (False, True):  # alternating: the same machine state for both
                    rounds[after].append(_round(array, after=after, pause=gap))
            for after in (False, True):
                times = [statistics.median(r[i][0] for r in rounds[after]) for i in range(3)]
                faults = [int(statistics.median(r[i][1] for r in rounds[after])) for i in range(3)]
                print(
                    f"| {nbytes // MB} MB | {cadence} | {'after' if after else 'before'} | "
                    + " | ".join(fmt_time(t).strip() for t in times)
                    + f" | {'/'.join(map(str, faults))} |",
                    flush=True,
                )
        del array
    print(
        "\nfaults: minor page faults of the calling thread in each transfer (a copy into pages "
        "not yet mapped takes one per 4 KiB page); 'before' stubs out the populate thread that "
        "maps a pooled block in off the hot path."
    )


def gap_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    main()
