"""Every script in examples/ and every Python block of README.md runs cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_examples_are_found() -> None:
    """The examples and README blocks are where these tests look (none found would test nothing)."""
    assert len(EXAMPLES) >= 10
    assert len(README_BLOCKS) >= 3


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


@pytest.mark.usefixtures("no_leaked_blocks")
@pytest.mark.parametrize("code", README_BLOCKS, ids=lambda code: code.split("\n", 1)[0][:40])
def test_readme_block_runs_cleanly(code: str, tmp_path: Path) -> None:
    """A README example, run as a script, exits 0 with a clean stderr and cleans up."""
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
