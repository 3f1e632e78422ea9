"""shared_memory_array.testing without Hypothesis: an ImportError that names the test extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Two ways a machine can lack Hypothesis: a None entry in sys.modules (import halts), and a
# meta-path finder that refuses it (as if it were not installed at all).
HIDE_HYPOTHESIS = {
    "sys.modules": "import sys\nsys.modules['hypothesis'] = None\n",
    "meta_path": (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hypothesis' or name.startswith('hypothesis.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hide())\n"
    ),
}

CHECK = """
import shared_memory_array  # the package itself never needs Hypothesis
try:
    import shared_memory_array.testing
except ImportError as exc:
    print(type(exc).__name__, issubclass(type(exc), ImportError), exc.name)
    print(exc)
else:
    print("imported")
"""


@pytest.mark.parametrize("hide", HIDE_HYPOTHESIS.values(), ids=HIDE_HYPOTHESIS.keys())
def test_testing_without_hypothesis_names_the_test_extra(hide: str) -> None:
    """Importing testing without Hypothesis raises ImportError saying how to install it."""
    done = subprocess.run(
        [sys.executable, "-c", hide + CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    kind, message = done.stdout.strip().split("\n", 1)
    assert kind == "ModuleNotFoundError True hypothesis"
    assert "pip install 'zero-copy-shared-memory[test]'" in message
    assert "Hypothesis" in message


def test_testing_imports_with_hypothesis() -> None:
    """With Hypothesis installed the same check imports the module (the check can tell)."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "imported", done.stderr
