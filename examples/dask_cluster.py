"""Pass SharedArray handles through Dask: by handle on this machine, by value elsewhere.

Needs the dask extra (pip install 'zero-copy-shared-memory[dask]'); prints a note without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import numpy as np

from shared_memory_array import SharedArray


def normalise(handle: SharedArray) -> float:
    """A task: scale the shared array in place, return its new sum."""
    data = handle.as_array()  # the same call, whether the handle came by handle or by value
    data /= data.max()
    return float(data.sum())


def main() -> None:
    import shared_memory_array.dask  # noqa: F401  (registers the adapter, here and in workers)

    distributed: Any = importlib.import_module("distributed")  # Any: an optional dependency

    with (
        distributed.LocalCluster(
            processes=True,
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
        SharedArray.copy(None, np.arange(1.0, 1_000_001.0)) as handle,
    ):
        total = client.submit(normalise, handle, pure=False).result()
        # the worker saw our /dev/shm: it attached the block, and its writes are ours
        print(f"sum after normalise: {total:.1f}; here: {handle.as_array().sum():.1f}")


if __name__ == "__main__":
    if importlib.util.find_spec("distributed") is None:
        print("this example needs Dask: pip install 'zero-copy-shared-memory[dask]'")
    else:
        main()
