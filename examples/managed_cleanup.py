"""Automatic cleanup: managed() (or the handle itself) closes and unlinks on exit.

Run: python examples/managed_cleanup.py
"""

from __future__ import annotations

from multiprocessing.managers import SharedMemoryManager

from shared_memory_array import BlockNotFoundError, SharedArray


def main() -> None:
    with SharedMemoryManager() as manager:
        with SharedArray.allocate(manager, shape=(2000, 2000), dtype="float64").managed() as shared:
            arr = shared.as_array()
            arr[:] = 42.0
            name = shared.name
            print(f"{name}: {shared.nbytes / 2**20:.1f} MiB, mean {arr.mean()}")
        # Memory is cleaned up here: nobody can attach any more.
        try:
            SharedArray.attach(name)
        except BlockNotFoundError as exc:
            print(f"after managed(): {exc}")
    # A plain `with` works too, with or without a manager.
    with SharedArray.allocate((3,), "int32") as shared:
        shared.as_array()[:] = [1, 2, 3]
        print(f"{shared.name}: {shared.as_array().tolist()}")


if __name__ == "__main__":
    main()
