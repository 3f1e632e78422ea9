"""Stream batches from a producer to a consumer: tokens through a queue, ``release`` after use.

The producer writes each batch with :func:`write` and sends only the token. The
consumer reads it (a zero-copy view), uses it, drops the view and releases the
token. Because released blocks are reused by the producer once no process maps
them, the steady state copies each batch once into memory that is already
faulted in: no page faults, no pickling of the data.
Run: python examples/streaming.py
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.queues import Queue

import numpy as np

from shared_memory_array import read, release, write

BATCHES = 50
BATCH_SHAPE = (1024, 1024, 8)  # 32 MiB of float32 per batch


def consumer(tokens: Queue[str | None], results: Queue[float]) -> None:
    """Read each batch, reduce it, drop the view, release the token."""
    while (token := tokens.get(timeout=60)) is not None:
        batch = read(token)
        assert isinstance(batch, np.ndarray)
        value = float(batch[:, :, 0].mean())
        del batch  # the last view: the block can now be reused
        release(token)
        results.put(value)


def main() -> None:
    context = mp.get_context("spawn")
    tokens: Queue[str | None] = context.Queue(maxsize=2)  # at most 2 batches in flight
    results: Queue[float] = context.Queue()
    worker = context.Process(target=consumer, args=(tokens, results))
    worker.start()
    batch = np.empty(BATCH_SHAPE, dtype=np.float32)
    start = time.perf_counter()
    for index in range(BATCHES):
        batch.fill(index)  # produce the next batch
        tokens.put(write(batch))
    tokens.put(None)
    means = [results.get(timeout=60) for _ in range(BATCHES)]
    elapsed = time.perf_counter() - start
    worker.join(60)
    assert means == [float(i) for i in range(BATCHES)]
    gib = BATCHES * batch.nbytes / 2**30
    print(
        f"streamed {BATCHES} batches ({gib:.2f} GiB) in {elapsed:.2f} s: {gib / elapsed:.1f} GiB/s"
    )


if __name__ == "__main__":
    main()
