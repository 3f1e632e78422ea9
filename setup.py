"""The optional accelerator, shared_memory_array._native (everything else is in pyproject.toml).

Built by ``pip install`` (``-e`` too) where a C compiler and the Python headers exist, on
Linux; where it cannot be built, the install goes on without it and the package runs its
pure-Python path (``optional=True``). The source keeps to the limited API of Python 3.10,
but each Python builds a binary of its own (no ``abi3`` tag): an editable install of every
Python into one checkout (CI) then never loads a binary built with another Python's headers.
"""

import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """``build_ext`` whose copy into the source tree (an editable install) is a rename.

    Copying over the file would rewrite, in place, a library that running processes have
    mapped (another Python's editable install of the same checkout, a test run): they
    could crash. A new file renamed over the old one leaves them the old one.
    """

    def copy_file(self, infile: str, outfile: str, *args: Any, **kwargs: Any) -> Any:
        if not str(outfile).endswith(".so"):
            return super().copy_file(infile, outfile, *args, **kwargs)
        partial = f"{outfile}.{os.getpid()}.partial"
        result = super().copy_file(infile, partial, *args, **kwargs)
        if os.path.exists(partial):
            os.replace(partial, outfile)
        return outfile, result[1]


extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "shared_memory_array._native",
            ["shared_memory_array/_native.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        )
    )

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
