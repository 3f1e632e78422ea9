"""The examples of the seed packages' own pages run against this library.

``seed_examples/`` holds the code of fastshare's README and shared-memory-array's
package page exactly as published (the documents in ``../shared/seeds/``; see
:func:`test_seed_examples_are_verbatim_copies`). Each runs unchanged but for its
import line: ``from fastshare import`` becomes ``from shared_memory_array import``
(shared-memory-array's pages already import from ``shared_memory_array``). The
page's fragments that leave out their imports get them as a prelude, and those that
use a ``manager`` they never define get a started ``SharedMemoryManager``. Checks of
the outcome are appended after the unchanged code.

Left out: shared-memory-array's "Performance Comparison" (it maps over
``process_chunk``/``process_chunk_shared``, which the page never defines), and
zero-copy-ipc's dict examples (the dict's own tests cover them).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("no_leaked_blocks")

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "seed_examples"
SEED_PAGES = HERE.parent.parent / "shared" / "seeds"  # present next to the project's checkout
TIMEOUT = 300

# The one line a fastshare user changes.
FASTSHARE_IMPORT = ("from fastshare import", "from shared_memory_array import")
# What shared-memory-array's fragments use without importing it.
SMA_IMPORTS = (
    "import numpy as np\n"
    "from multiprocessing.managers import SharedMemoryManager\n"
    "from shared_memory_array import SharedArray\n"
)
MANAGER = "manager = SharedMemoryManager()\nmanager.start()\n"


def example(name: str) -> str:
    """The published code of one example, unchanged."""
    return (EXAMPLES / f"{name}.txt").read_text()


def run(code: str, tmp_path: Path) -> str:
    """Run ``code`` as a script in a fresh interpreter; return its stdout (stderr must be empty)."""
    script = tmp_path / "seed_example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=tmp_path,  # the script's directory is first on sys.path: stub modules go there
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


# -- fastshare ----------------------------------------------------------------------------


def test_fastshare_quick_start(tmp_path: Path) -> None:
    """fastshare's quick start: a child process reads the 5 MB token and prints what it got."""
    code = example("fastshare_quick_start").replace(*FASTSHARE_IMPORT)
    assert run(code, tmp_path) == "Reader got 5,000,000 bytes, first 10: b'HELLOWORLD'\n"


def test_fastshare_broadcast(tmp_path: Path) -> None:
    """fastshare's SharedData broadcast: four pool workers load 100 MB by name and sum it."""
    code = example("fastshare_broadcast").replace(*FASTSHARE_IMPORT)
    stdout = run(code, tmp_path)
    # The workers' prints share one pipe and may interleave: count them, not their lines.
    for i in range(4):
        assert stdout.count(f"Worker {i}: shape=(25000000,), sum=25000000") == 1, stdout
    assert stdout.endswith(
        "\nAll workers returned: [25000000.0, 25000000.0, 25000000.0, 25000000.0]\n"
    )


# -- shared-memory-array ------------------------------------------------------------------


def test_shared_memory_array_parallel_row_summation(tmp_path: Path) -> None:
    """The quick start: Pool workers sum the rows of a managed shared copy; the sum is right."""
    checks = (
        "\nimport math\n"
        "assert math.isclose(sum(results), data.sum(), rel_tol=1e-9), (sum(results), data.sum())\n"
    )
    stdout = run(example("sma_row_summation") + checks, tmp_path)
    assert stdout.startswith("Total sum: ")


def test_shared_memory_array_automatic_cleanup(tmp_path: Path) -> None:
    """managed() inside a manager: 800 MB filled with 42, closed and unlinked on exit."""
    checks = (
        "\nassert shared.closed\n"
        "try:\n"
        "    SharedArray.attach(shared.name)\n"
        "except FileNotFoundError:\n"
        "    print('unlinked')\n"
    )
    assert run(SMA_IMPORTS + example("sma_automatic_cleanup") + checks, tmp_path) == "unlinked\n"


def test_shared_memory_array_attach_from_multiple_processes(tmp_path: Path) -> None:
    """attach(name=, shape=, dtype=) sees the owner's data; both close; the views stay valid."""
    checks = (
        "\nassert client.closed and owner.closed\n"
        "assert not client.owner\n"
        "print((client_arr == arr).all(), client_arr.shape)\n"
    )
    code = SMA_IMPORTS + example("sma_attach_from_multiple_processes") + checks
    assert run(code, tmp_path) == "True (1000, 1000)\n"


def test_shared_memory_array_core_api(tmp_path: Path) -> None:
    """Creating, accessing (name, shape, dtype, owner) and manually closing, in page order."""
    code = (
        SMA_IMPORTS
        + MANAGER
        + example("sma_creating_shared_arrays")
        + example("sma_accessing_arrays")
        + example("sma_manual_cleanup")
        + "assert sa.closed\nassert arr[0, 0] == 42.0\nmanager.shutdown()\n"
    )
    name, shape, dtype, owner = run(code, tmp_path).splitlines()
    assert name.startswith("sma_")
    assert (shape, dtype, owner) == ("(1000, 1000)", "float64", "True")


def test_shared_memory_array_cleanup_with_context_manager(tmp_path: Path) -> None:
    """'Automatic cleanup with context manager' on the page's first array: closed after it."""
    code = (
        SMA_IMPORTS
        + MANAGER
        + "sa = SharedArray.allocate(manager, shape=(100, 200), dtype='float64')\n"
        + example("sma_cleanup_with_context_manager")
        + "print(sa.closed, arr.shape)\nmanager.shutdown()\n"
    )
    assert run(code, tmp_path) == "True (100, 200)\n"


def test_shared_memory_array_attaching_to_a_made_up_name() -> None:
    """The page's attach(name="psm_12345", ...): no such block, so FileNotFoundError."""
    namespace: dict[str, object] = {}
    with pytest.raises(FileNotFoundError, match="psm_12345"):
        exec(SMA_IMPORTS + example("sma_attaching_to_existing_memory"), namespace)


def test_shared_memory_array_safe_and_unsafe(tmp_path: Path) -> None:
    """allocate and allocate_unsafe with the page's arguments build the same array."""
    code = (
        SMA_IMPORTS
        + MANAGER
        + example("sma_safe_vs_unsafe")
        + "assert (sa_safe.shape, sa_safe.dtype) == (sa_unsafe.shape, sa_unsafe.dtype)\n"
        + "print(sa_unsafe.shape, sa_unsafe.dtype, sa_unsafe.owner)\nmanager.shutdown()\n"
    )
    assert run(code, tmp_path) == "(100,) float64 True\n"


def test_shared_memory_array_image_processing_pipeline(tmp_path: Path) -> None:
    """The complete example: tile statistics of an 800 MB image from Pool workers are right.

    tqdm (a progress bar the page imports) is replaced by a pass-through module.
    """
    (tmp_path / "tqdm.py").write_text("def tqdm(iterable, total=None):\n    return iterable\n")
    checks = (
        "\nimport numpy as np\n"
        "for i, (mean, std) in enumerate(stats):\n"
        "    tile = large_image[i * 1000:(i + 1) * 1000]\n"
        "    assert np.isclose(mean, tile.mean()) and np.isclose(std, tile.std()), i\n"
    )
    stdout = run(example("sma_image_processing_pipeline") + checks, tmp_path)
    assert stdout == "Processed 10 tiles\n"


# -- the copies are the published code ------------------------------------------------------


def _code_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


@pytest.mark.skipif(not SEED_PAGES.is_dir(), reason=f"the seed documents are not at {SEED_PAGES}")
def test_seed_examples_are_verbatim_copies() -> None:
    """Every example file's lines appear, in order and contiguous, in one of the seed pages."""
    pages = [_code_lines(page.read_text()) for page in sorted(SEED_PAGES.glob("*.txt"))]
    files = sorted(EXAMPLES.glob("*.txt"))
    assert len(files) == 12
    for path in files:
        lines = _code_lines(path.read_text())
        found = any(
            page[i : i + len(lines)] == lines
            for page in pages
            for i in range(len(page) - len(lines) + 1)
        )
        assert found, f"{path.name} is not a verbatim excerpt of a seed page"
