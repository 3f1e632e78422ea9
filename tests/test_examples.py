"""Every script in examples/, every Python block of README.md and of the docs runs cleanly.

A complete script is a fenced ``python`` block in the README and a
``.. code-block:: python`` in ``docs/``; fragments are ``py`` blocks and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
# The directive, its options, a blank line, then the indented body up to the first line
# indented less (or the end of the file).
_RST_PYTHON = re.compile(
    r"^( *)\.\. code-block:: python\n(?:\1 +:.*\n)*\n((?:\1 +\S.*\n|\n)+)", re.M
)
DOCS_BLOCKS = {
    f"{page.relative_to(ROOT)}:{number}": textwrap.dedent(match.group(2))
    for page in sorted((ROOT / "docs").rglob("*.rst"))
    for number, match in enumerate(_RST_PYTHON.finditer(page.read_text()), 1)
}


# A Ray example's ray.init() starts its own Ray, never joins one that another process on
# this machine started last (recorded in /tmp/ray): then it failed with "num_cpus must not
# be provided". The variable changes nothing else.
ENV = {**os.environ, "RAY_ADDRESS": "local"}


def test_examples_are_found() -> None:
    """The examples and the README and docs blocks are found (none found would test nothing)."""
    assert len(EXAMPLES) >= 10
    assert len(README_BLOCKS) >= 1
    assert len(DOCS_BLOCKS) >= 7


@pytest.mark.usefixtures("no_leaked_blocks")
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_cleanly(script: Path) -> None:
    """The example exits 0, prints its result, writes nothing to stderr, and cleans up."""
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
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
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.usefixtures("no_leaked_blocks")
@pytest.mark.parametrize("code", DOCS_BLOCKS.values(), ids=DOCS_BLOCKS.keys())
def test_docs_block_runs_cleanly(code: str, tmp_path: Path) -> None:
    """A docs page's complete script, run as it is, exits 0 with a clean stderr and cleans up."""
    script = tmp_path / "docs_example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
