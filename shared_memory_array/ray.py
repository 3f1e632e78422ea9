"""Ray adapter: handles go by handle within a node's /dev/shm, by value across nodes.

Enable it with two lines (``pip install zero-copy-shared-memory[ray]``)::

    import ray
    import shared_memory_array.ray as sma_ray

    ray.init(runtime_env=sma_ray.runtime_env())   # every worker runs install() at start
    sma_ray.install()                             # and so does the driver (before or after init)

:func:`runtime_env` adds ``worker_process_setup_hook =
"shared_memory_array.ray.install"`` to a runtime environment (yours, if you pass
one), so every task and actor process registers the serializers before it runs
anything. :func:`install` calls ``ray.util.register_serializer`` for
:class:`~shared_memory_array.SharedArray`, :class:`~shared_memory_array.SharedDict`
and shared-memory tokens.

What travels how
----------------
Ray serialises an argument or a ``ray.put`` once, into the object store of the
sender's node, before it knows which node will read it. So the rule is per
cluster, checked at each serialisation (the node list is cached for 5 s):

* one alive node (``ray.init()`` on one machine): **by handle**, a few hundred
  bytes; the task attaches the same block and its writes are seen by everyone;
* several nodes: **by value**, the data as pickle-5 out-of-band buffers in Ray's
  object store (one copy) and, on the receiving side, an object of the same
  kind in that process's own /dev/shm, owned by it (``h.as_array()`` runs
  unchanged; writes stay in the copy).

``install(mode="handle")`` or ``mode="value"`` (or the environment variable
``SHARED_MEMORY_ARRAY_RAY_MODE``, which :func:`runtime_env` passes to the
workers) forces either. A handle that reaches a process whose /dev/shm is not
the sender's (:func:`~shared_memory_array._identity.shm_identity` differs) never
attaches another block of the same name: it arrives (deserialising never raises),
and its first use raises :class:`~shared_memory_array.BlockNotFoundError` saying
so, which is the task's error: ``ray.get`` raises an error that ``except
BlockNotFoundError`` catches.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any, Final, Literal, cast

from . import _transport

__all__ = ["MODE_VARIABLE", "SETUP_HOOK", "install", "runtime_env"]

# Ray is an optional dependency, absent where the dev extra alone runs mypy.
ray: Any = importlib.import_module("ray")
importlib.import_module("ray.util")

Mode = Literal["auto", "handle", "value"]
MODE_VARIABLE: Final = "SHARED_MEMORY_ARRAY_RAY_MODE"
SETUP_HOOK: Final = f"{__name__}.install"
_NODES_TTL = 5.0
_MODES: Final = ("auto", "handle", "value")

_mode: list[Mode] = ["auto"]
_installed: list[bool] = [False]  # whether install() ran in this process
_nodes_cache: list[float] = [0.0, 0.0]  # [checked at (monotonic), alive node count]


def _alive_nodes() -> int:
    now = time.monotonic()
    if now - _nodes_cache[0] > _NODES_TTL:
        _nodes_cache[:] = [now, float(sum(1 for node in ray.nodes() if node.get("Alive")))]
    return int(_nodes_cache[1])


def _by_value() -> bool:
    mode = _mode[0]
    if mode != "auto":
        return mode == "value"
    return _alive_nodes() > 1


def _serialize(obj: Any) -> tuple[Any, ...]:
    if _by_value():
        return ("value", _transport.by_value(obj))
    return ("handle", _transport.by_handle(obj))


def _deserialize(state: tuple[Any, ...]) -> Any:
    # Never raises because the block cannot be reached (API.md section 1, v3): Ray
    # would report a failure here as a RaySystemError of the argument, which
    # `except BlockNotFoundError` does not catch. A handle keeps the shm identity
    # it was made with and raises at its first use; a token carries it in its text
    # and raises when read: then the task's own error is the BlockNotFoundError.
    rebuild, args = state[1]
    return rebuild(*args)


def install(mode: Mode | None = None) -> None:
    """Register the serializers in this process (the driver, or a worker through its hook).

    Parameters
    ----------
    mode
        ``"auto"`` (default: by handle on a one-node cluster, by value on more),
        ``"handle"`` or ``"value"``. ``None`` reads ``SHARED_MEMORY_ARRAY_RAY_MODE``,
        else ``"auto"``.

    Raises
    ------
    ValueError
        An unknown mode.
    """
    chosen = mode if mode is not None else os.environ.get(MODE_VARIABLE, "auto")
    if chosen not in _MODES:
        raise ValueError(f"mode must be 'auto', 'handle' or 'value', not {chosen!r}")
    _mode[0] = cast(Mode, chosen)
    _installed[0] = True
    for cls in _transport.HANDLE_TYPES:
        ray.util.register_serializer(cls, serializer=_serialize, deserializer=_deserialize)


def runtime_env(env: dict[str, Any] | None = None, *, mode: Mode = "auto") -> dict[str, Any]:
    """``env`` (a Ray runtime environment dict) plus the hook that installs the adapter.

    Raises
    ------
    ValueError
        ``env`` already has another ``worker_process_setup_hook``.
    """
    merged = dict(env or {})
    hook = merged.setdefault("worker_process_setup_hook", SETUP_HOOK)
    if hook != SETUP_HOOK:
        raise ValueError(
            f"the runtime env already has worker_process_setup_hook={hook!r}: "
            f"call {SETUP_HOOK}() from it instead"
        )
    merged["env_vars"] = {**merged.get("env_vars", {}), MODE_VARIABLE: mode}
    return merged
