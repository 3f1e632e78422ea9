"""Dask adapter: handles go by handle where the receiver sees our /dev/shm, by value elsewhere.

Importing this module is all a program does (``pip install
zero-copy-shared-memory[dask]``)::

    import shared_memory_array.dask  # noqa: F401  (in the client, before the cluster starts)

It then holds for every :class:`~shared_memory_array.SharedArray`,
:class:`~shared_memory_array.SharedDict` and shared-memory token that Dask
sends, alone or nested anywhere in a task's arguments, a scattered value or a
result:

* **by handle** (a few hundred bytes; the receiver attaches, writes are seen
  by everyone) when the receiving process sees the same /dev/shm as the
  sender, judged by :func:`~shared_memory_array._identity.shm_identity`, never
  by hostname or IP address;
* **by value** otherwise: the data rides Dask's own pickle-5 frames (numpy data
  out of band, no copy on the sender) and the receiver gets an object of the
  same kind in its own /dev/shm, owned by it, so ``h.as_array()`` runs
  unchanged; writes to that copy stay there. Also by value: whatever Dask
  serialises without a receiver (spilling to disk), and any receiver whose
  identity is unknown (a process without this adapter).

Every worker process needs the adapter too (it advertises its identity and
sends by value in turn). Importing this module adds itself to the Dask config
keys ``distributed.worker.preload``, ``distributed.nanny.preload`` and
``distributed.scheduler.preload``, which workers and schedulers started from
this process afterwards (``LocalCluster``, ``SSHCluster``...) inherit. Workers
started elsewhere need the one flag ``--preload shared_memory_array.dask``
(``dask worker``, ``dask scheduler``) or the same key in their Dask config.

Also registered: ``dask.sizeof`` counts a handle as its own small size, not as
the shared bytes it names (they are not the worker's memory), and
``normalize_token`` gives a SharedArray or SharedDict a fresh token each time
it is tokenized: its contents can change under the same name, so
``pure=True`` never reuses a stale result for it (each submission runs).

How it works
------------
Dask's comms exchange a handshake dict when a connection opens; this module
adds ``"shm-identity"`` to it (``Comm.handshake_info``), so each message's
serialisation ``context["recipient"]`` says what /dev/shm the receiver sees.
Dask's type-dispatched serialisers (``dask_serialize``) see only top-level
objects, and nested ones are pickled by their own reducers, which receive no
context; so the adapter wraps ``distributed.protocol.dumps`` and
``distributed.protocol.serialize.serialize`` to publish the current context in
a context variable, and registers a reducer in ``copyreg.dispatch_table``
(which pickle and cloudpickle consult before ``__reduce_ex__``) that picks by
handle or by value from it. The client pickles a graph before handing it to its
comm (no context): its recipient is the scheduler of the default client, whose
identity that client's connection knows. The scheduler unpickles graphs, so a
scheduler on another /dev/shm gets the data by value, and sends it on by value
again to each worker that does not share its /dev/shm (two copies, still correct).
Outside Dask's serialisation the reducer is the handle's own ``__reduce__``:
``multiprocessing`` and plain ``pickle`` are unaffected.
"""

from __future__ import annotations

import contextvars
import copyreg
import functools
import importlib
import sys
import uuid
from collections.abc import Callable
from typing import Any, Final

from . import _transport
from ._array import SharedArray
from ._dict import SharedDict
from ._handle import one_pickle_per_message
from ._identity import shm_identity

__all__ = ["HANDSHAKE_KEY", "install", "sends_by_handle"]

# Dask is an optional dependency, absent where the dev extra alone runs mypy: its
# modules are typed as Any here rather than imported by name.
dask: Any = importlib.import_module("dask")
distributed: Any = importlib.import_module("distributed")
for _submodule in ("dask.sizeof", "dask.tokenize"):
    importlib.import_module(_submodule)
for _submodule in ("comm.core", "protocol", "protocol.serialize", "spill"):
    importlib.import_module(f"distributed.{_submodule}")

HANDSHAKE_KEY: Final = "shm-identity"
_MODULE: Final = __name__

# None: not inside Dask's serialisation. A str: inside it, the recipient's identity
# ("" when there is no recipient, as when spilling to disk, or it is unknown).
_recipient: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "shared_memory_array_dask_recipient", default=None
)
_installed = False


def _recipient_identity(context: object) -> str:
    if not isinstance(context, dict):
        return ""
    recipient = context.get("recipient")
    if not isinstance(recipient, dict):
        return ""
    identity = recipient.get(HANDSHAKE_KEY)
    return identity if isinstance(identity, str) else ""


def sends_by_handle() -> bool | None:
    """How a handle pickled right now travels.

    Returns
    -------
    bool or None
        ``None`` outside Dask's serialisation (a handle pickles by handle, as
        always); ``True`` inside it when the recipient sees this process's
        /dev/shm; ``False`` when it does not, is unknown, or there is no
        recipient (spilling).
    """
    recipient = _recipient.get()
    if recipient is None:
        return None
    return recipient == shm_identity()


def _reduce(obj: Any) -> Any:
    if sends_by_handle() is False:
        return _transport.by_value(obj)
    return _transport.by_handle(obj)


def _client_scheduler_identity() -> str | None:
    """The identity of the scheduler of this process's default client, if it has one.

    The client serialises a graph for the scheduler before it knows the recipient
    (``serialize(..., context=None)``); the scheduler unpickles it.
    """
    try:
        client = distributed.default_client()
        remote = client.scheduler_comm.comm.remote_info
    except (ValueError, AttributeError):
        return None  # no client: keep the handle's own pickle
    return _recipient_identity({"recipient": remote})


def _with_context(function: Callable[..., Any], position: int | None) -> Callable[..., Any]:
    """Wrap a Dask serialisation entry point so that it publishes its recipient.

    ``position`` is the index of the ``context`` argument; ``None`` marks an entry
    point that never has a recipient (``serialize_bytelist``: spilling to disk).
    """
    if getattr(function, "_sma_wrapped", False):
        return function

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if position is None:
            recipient: str | None = ""
        else:
            context = kwargs.get("context", _positional(args, position))
            if context is not None:
                recipient = _recipient_identity(context)
            else:  # nested in an outer call, or the client's graph for the scheduler
                recipient = _recipient.get()
                if recipient is None:
                    recipient = _client_scheduler_identity()
        token = _recipient.set(recipient)
        try:
            # Dask may encode one message several ways and send one: count each handle once.
            with one_pickle_per_message():
                return function(*args, **kwargs)
        finally:
            _recipient.reset(token)

    wrapper._sma_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _positional(args: tuple[Any, ...], position: int) -> object:
    return args[position] if len(args) > position else None


def _handshake_info_with_identity(original: Callable[..., dict[str, Any]]) -> Any:
    if getattr(original, "_sma_wrapped", False):
        return original

    @functools.wraps(original)
    def handshake_info(self: Any) -> dict[str, Any]:
        info = original(self)
        info[HANDSHAKE_KEY] = shm_identity()
        return info

    handshake_info._sma_wrapped = True  # type: ignore[attr-defined]
    return handshake_info


def _sizeof_handle(handle: SharedArray | SharedDict) -> int:
    return sys.getsizeof(handle) + len(handle.name) + 64


def _fresh_token(handle: SharedArray | SharedDict) -> tuple[str, str, str]:
    # The contents behind a name can change at any time: never the same token twice.
    return ("shared_memory_array", type(handle).__name__, uuid.uuid4().hex)


def _add_preload(key: str) -> None:
    preloads = list(dask.config.get(key, default=None) or [])
    if _MODULE not in preloads:
        dask.config.set({key: [*preloads, _MODULE]})


def install() -> None:
    """Register the adapter in this process (idempotent; importing the module calls it).

    Workers and schedulers started by this process afterwards load it too (through
    the Dask config's ``preload`` keys).
    """
    global _installed
    if _installed:
        return
    comm = distributed.comm.core.Comm
    comm.handshake_info = _handshake_info_with_identity(comm.handshake_info)
    # serialize(x, serializers, on_error, context, ...) and dumps(msg, serializers,
    # on_error, context, ...) take the context fourth; serialize_bytelist (spilling) has
    # none. Each is patched where its callers look it up at call time.
    serialize_module: Any = sys.modules["distributed.protocol.serialize"]
    serialize_module.serialize = _with_context(serialize_module.serialize, 3)
    bytelist = _with_context(serialize_module.serialize_bytelist, None)
    serialize_module.serialize_bytelist = bytelist
    distributed.spill.serialize_bytelist = bytelist
    distributed.protocol.serialize_bytelist = bytelist
    distributed.protocol.dumps = _with_context(distributed.protocol.dumps, 3)
    for cls in _transport.HANDLE_TYPES:
        copyreg.pickle(cls, _reduce)
    dask.sizeof.sizeof.register(SharedArray)(_sizeof_handle)
    dask.sizeof.sizeof.register(SharedDict)(_sizeof_handle)
    dask.tokenize.normalize_token.register((SharedArray, SharedDict))(_fresh_token)
    for key in (
        "distributed.worker.preload",
        "distributed.nanny.preload",
        "distributed.scheduler.preload",
    ):
        _add_preload(key)
    _installed = True


install()
