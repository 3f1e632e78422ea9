"""Run every benchmark of this repository, one after the other, and print their tables.

Each benchmark runs the competitors (numpy.copy, the stdlib's SharedMemory, pickle,
a multiprocessing.Queue and Pool, Manager().dict(), joblib and UltraDict when the
``bench`` extra is installed, zero-copy-ipc where installed, Dask and Ray when theirs are)
on the same work in the same run, and prints Markdown tables in one style: sizes
labelled exactly, every ratio phrased from our side ("ours is 3.5× faster"). The rows the
C accelerator speeds up (attach, the dict, the counter) are measured on both paths, each
in a process of its own: the accelerator (``C``) and pure Python (``pure``,
``SHARED_MEMORY_ARRAY_PURE=1``).

Run: python benchmarks/run_all.py [--quick]
(--quick: small sizes, 35 s on 2 vCPUs without the dask and ray extras)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_array.py",
    "bench_codec.py",
    "bench_reuse.py",
    "bench_dict.py",
    "bench_memory.py",
    "bench_state.py",  # waiting, private views, huge pages (the huge-page row needs root)
    "bench_cluster.py",  # Dask and Ray rows only where the dask/ray extras are installed
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: 35 s on 2 vCPUs without the dask and ray extras",
    )
    quick = parser.parse_args().quick
    failed = []
    for script in BENCHMARKS:
        print(flush=True)  # a blank line between two scripts' reports
        command = [sys.executable, str(HERE / script), *(["--quick"] if quick else [])]
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
