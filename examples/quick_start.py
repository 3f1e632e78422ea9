"""Quick start: write a large object in one process, read it in another.

The seed's example. Only the token (a short string) crosses the process
boundary; the 5 MB of data stay in one shared-memory block, which lives until
this process releases it or exits.
Run: python examples/quick_start.py
"""

from __future__ import annotations

import multiprocessing as mp

from shared_memory_array import read, release, write


def reader(token: str) -> None:
    """Child process: rebuild the object from shared memory."""
    data = read(token)
    assert isinstance(data, bytes)
    print(f"Reader got {len(data):,} bytes, first 10: {data[:10]!r}")
    # Reader got 5,000,000 bytes, first 10: b'HELLOWORLD'


def main() -> None:
    payload = b"HELLOWORLD" * 500_000  # 5 MB: above the 1 MB threshold, so shared memory
    token = write(payload)
    print(f"token: {token}")  # e.g. SMA1:s:sma_3f2c9e0d1b7a4c55:0
    child = mp.get_context("spawn").Process(target=reader, args=(token,))
    child.start()
    child.join(60)
    release(token)  # optional: otherwise freed when this process exits


if __name__ == "__main__":
    main()
