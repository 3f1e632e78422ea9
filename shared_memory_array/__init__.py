"""Zero-copy numpy arrays, pickled objects and a dict in named shared memory.

What users touch: :class:`SharedArray`, the pickle-5 codec (:func:`write`,
:func:`read`, :func:`release`, :class:`SharedData`), :class:`SharedDict`, and
housekeeping (:func:`list_blocks`, :func:`cleanup`, ``python -m
shared_memory_array``). The map of the layers beneath (platform, process,
lifetime, block, header, handle, reaper, heap, then these) is the module
table in the README's "Layers" section, the one place it is kept.
"""

from ._array import ManagedSharedMemoryArray as ManagedSharedMemoryArray
from ._array import SharedArray as SharedArray
from ._array import SharedMemoryArray as SharedMemoryArray
from ._codec import Token as Token
from ._codec import configure as configure
from ._codec import read as read
from ._codec import release as release
from ._codec import write as write
from ._dict import SharedDict as SharedDict
from ._dict import SharedDictLock as SharedDictLock
from ._dict import ZeroCopyDict as ZeroCopyDict
from ._registry import BlockInfo as BlockInfo
from ._registry import CleanupResult as CleanupResult
from ._registry import cleanup as cleanup
from ._registry import list_blocks as list_blocks
from ._shared_data import SharedData as SharedData
from .errors import AllocationError as AllocationError
from .errors import BlockExistsError as BlockExistsError
from .errors import BlockNotFoundError as BlockNotFoundError
from .errors import ClosedError as ClosedError
from .errors import LayoutError as LayoutError
from .errors import SharedArrayError as SharedArrayError
from .errors import UntrustedBlockError as UntrustedBlockError

__version__ = "1.0.0"

__all__ = [
    "AllocationError",
    "BlockExistsError",
    "BlockInfo",
    "BlockNotFoundError",
    "CleanupResult",
    "ClosedError",
    "LayoutError",
    "ManagedSharedMemoryArray",
    "SharedArray",
    "SharedArrayError",
    "SharedData",
    "SharedDict",
    "SharedDictLock",
    "SharedMemoryArray",
    "Token",
    "UntrustedBlockError",
    "ZeroCopyDict",
    "cleanup",
    "configure",
    "list_blocks",
    "read",
    "release",
    "write",
]
