"""Attach by name alone: the header tells every other process shape, dtype and order.

Run: python examples/attach_by_name.py
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from shared_memory_array import SharedArray

CHILD = """
import sys
from shared_memory_array import SharedArray
shared = SharedArray.attach(sys.argv[1])          # nothing but the name
arr = shared.as_array()
print(f"child: {shared.shape} {shared.dtype} F-order={arr.flags.f_contiguous}")
arr["temperature"] += 1.0
"""


def main() -> None:
    readings = np.zeros((3, 4), dtype=[("station", "U8"), ("temperature", "<f4")], order="F")
    readings["station"] = "north"
    readings["temperature"] = 20.0
    with SharedArray.copy(readings) as shared:
        subprocess.run([sys.executable, "-c", CHILD, shared.name], check=True, timeout=60)
        print("parent:", shared.as_array()["temperature"][0])


if __name__ == "__main__":
    main()
