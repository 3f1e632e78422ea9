"""Image-processing pipeline: analyse tiles of one large image in parallel, no copies.

The seed's complete example, without tqdm (progress is printed as tiles finish).
Run: python examples/image_tiles.py
"""

from __future__ import annotations

from multiprocessing import Pool
from multiprocessing.managers import SharedMemoryManager
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared_memory_array import SharedMemoryArray


def process_tile(args: tuple[SharedMemoryArray, int, int]) -> tuple[float, float]:
    """Process one tile of a large image."""
    shared_img, y_start, y_end = args
    img = shared_img.as_array()
    tile = img[y_start:y_end, :]
    return float(tile.mean()), float(tile.std())


def parallel_image_analysis(image: NDArray[Any], n_tiles: int = 10) -> list[tuple[float, float]]:
    """Analyse a large image in parallel without copying it to the workers."""
    tile_height = image.shape[0] // n_tiles
    with SharedMemoryManager() as manager:
        shared = SharedMemoryArray.copy(manager, image)  # share the image once
        tiles = [(shared, i * tile_height, (i + 1) * tile_height) for i in range(n_tiles)]
        results = []
        with Pool() as pool:
            for done, stats in enumerate(pool.imap(process_tile, tiles), start=1):
                results.append(stats)
                print(f"\rtiles {done}/{n_tiles}", end="", flush=True)
        print()
        return results


def main() -> None:
    large_image = np.random.default_rng(2).random((4000, 4000))
    stats = parallel_image_analysis(large_image)
    print(f"Processed {len(stats)} tiles; first tile mean/std {stats[0][0]:.4f}/{stats[0][1]:.4f}")


if __name__ == "__main__":
    main()
