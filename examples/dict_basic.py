"""The shared dict, basic use: create, write, read, update, inspect.

Run: python examples/dict_basic.py
"""

from __future__ import annotations

import numpy as np

from shared_memory_array import SharedDict


def main() -> None:
    # The block is named "sma_my_dict"; 1000 keys always fit, 10 MiB for keys and values.
    with SharedDict.create("my_dict", max_items=1000, heap_size=10 * 2**20) as d:
        d["name"] = "Alice"
        d["age"] = 30
        d["data"] = {"nested": "dict"}
        d["matrix"] = np.eye(3, dtype=np.float32)  # numpy values keep dtype and shape
        d[("point", 1)] = (10, 20)  # any hashable, picklable key
        print(d["name"], d["age"], d["data"])

        d["age"] = 31  # a new entry is published with one 8-byte store; the old one is freed
        d.update(city="Paris", country="France")  # all pairs or none
        print("age:", d["age"], "| keys:", sorted(map(str, d)))
        print("matrix:", d["matrix"].dtype, d["matrix"].shape)

        stats = d.stats()
        print(f"used slots: {stats['used_slots']} of {stats['max_items']}")
        print(f"load factor: {stats['load_factor']:.2%}, heap used: {stats['heap_used']} bytes")
        gc = d.gc_stats()
        print(f"free blocks: {gc['total_free_blocks']}, free space: {gc['total_free_space']} bytes")
    # Leaving the block closed the dict; its creator also unlinked the block.


if __name__ == "__main__":
    main()
