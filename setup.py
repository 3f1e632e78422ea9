"""The optional accelerator, shared_memory_array._native (everything else is in pyproject.toml).

Built by ``pip install`` (``-e`` too) where a C compiler and the Python headers exist, on
Linux; where it cannot be built, the install goes on without it and the package runs its
pure-Python path (``optional=True``). One binary per platform for every Python from 3.10
(the limited API, ``abi3``).
"""

import sys

from setuptools import Extension, setup

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

setup(ext_modules=extensions)
