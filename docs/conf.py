"""Sphinx configuration of the shared_memory_array documentation.

Build (warnings are errors, as in CI):

    pip install -e '.[docs]'        # add the dask and ray extras to document the adapters for real
    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference documents the public names as users import them
(``shared_memory_array.SharedArray``), never the private modules they live in.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, also where it is not installed

import shared_memory_array  # noqa: E402

project = "shared_memory_array"
author = "the shared_memory_array authors"
copyright = "the shared_memory_array authors, MIT License"
release = shared_memory_array.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# -- autodoc -------------------------------------------------------------------------
autodoc_typehints = "none"  # signatures as written; numpydoc sections give the types
autodoc_default_options = {"member-order": "bysource"}
autosummary_generate = False  # the reference pages are written by hand, no stubs
# The engine adapters import Dask and Ray at import time. Where the engines are not
# installed, autodoc imports the adapters against stand-ins (CI builds with the real ones).
autodoc_mock_imports = [
    engine for engine in ("dask", "distributed", "ray") if importlib.util.find_spec(engine) is None
]

# -- numpydoc ------------------------------------------------------------------------
numpydoc_show_class_members = False  # autodoc's :members: lists them once
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# -- HTML ----------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"shared_memory_array {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {page: [] for page in ("index", "getting-started", "performance", "development")}
html_show_sourcelink = False
# A page's contents list "allocate()", not "SharedArray.allocate()".
toc_object_entries_show_parents = "hide"
pygments_style = "sphinx"
