"""The optional accelerator, shared_memory_array._native (everything else is in pyproject.toml).

Built by ``pip install`` (``-e`` too) where a C compiler and the Python headers exist, on
Linux; where it cannot be built, the install goes on without it and the package runs its
pure-Python path (``optional=True``). One binary per platform for every Python from 3.10
(the limited API, ``abi3``).
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
            py_limited_api=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        )
    )

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
