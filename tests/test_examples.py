"""Every script in examples/ runs to completion with a clean stderr and leaves no block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_examples_are_found() -> None:
    """The examples directory is where this test looks (an empty list would test nothing)."""
    assert len(EXAMPLES) >= 10


@pytest.mark.usefixtures("no_leaked_blocks")
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_cleanly(script: Path) -> None:
    """The example exits 0, prints its result, writes nothing to stderr, and cleans up."""
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert done.stderr == ""
