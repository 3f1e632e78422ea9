"""Pass a SharedArray and a SharedDict through Ray tasks and an actor, by handle.

Needs the ray extra (pip install 'zero-copy-shared-memory[ray]'); prints a note without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Any

import numpy as np

from shared_memory_array import SharedArray, SharedDict


def row_means(handle: SharedArray, results: SharedDict) -> int:
    """A task: write each row's mean into the shared dict."""
    data = handle.as_array()
    for i, row in enumerate(data):
        results[i] = float(row.mean())
    return len(data)


class Counter:
    """An actor that counts into the shared dict it was given."""

    def __init__(self, results: SharedDict) -> None:
        self.results = results

    def bump(self) -> int:
        with self.results.lock():
            self.results["bumps"] = self.results.get("bumps", 0) + 1
            return int(self.results["bumps"])


def main() -> None:
    import shared_memory_array.ray as sma_ray

    ray: Any = importlib.import_module("ray")  # Any: an optional dependency

    ray.init(
        address="local",  # a Ray of its own, never a cluster already running
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env=sma_ray.runtime_env(),  # its hook runs sma_ray.install() in every worker
    )
    sma_ray.install()
    try:
        with (
            SharedArray.copy(None, np.arange(12.0).reshape(3, 4)) as handle,
            SharedDict.create(f"ray-example-{os.getpid()}", 100, 1 << 20) as results,
        ):
            rows = ray.get(ray.remote(row_means).remote(handle, results))
            counter: Any = ray.remote(Counter).remote(results)
            ray.get([counter.bump.remote() for _ in range(3)])
            print(
                f"{rows} row means: {[results[i] for i in range(rows)]}; bumps: {results['bumps']}"
            )
            ray.kill(counter)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if importlib.util.find_spec("ray") is None:
        print("this example needs Ray: pip install 'zero-copy-shared-memory[ray]'")
    else:
        main()
