"""One handle base for every kind of block: the lifetime rule of API.md section 0, once.

A :class:`BlockHandle` owns one mapping of one block (a
:class:`~._block.SharedBlock`) and keeps, for every kind (arrays, dicts, the
codec's blocks), the steps of the one lifetime rule:

* **Creation** (:meth:`BlockHandle._create`): the new block is owned by this
  handle, and a block whose creation fails half-way is unlinked
  (:meth:`BlockHandle._creating`). (The block layer runs the reaper's
  periodic scan first, and arms its exit hook.)
* **Opening** (:meth:`BlockHandle._open`), in this order: trust (another
  user's block, one writable by others: :class:`UntrustedBlockError`), then
  the shared-memory identity a handle or token carries (another host's:
  :class:`BlockNotFoundError`), then the header (a block still being created
  is waited for briefly, then "not found", never "corrupt"), then the block
  id a handle carries (the name reused by another block), then that every
  page of the payload is there (:class:`LayoutError` before anyone can SIGBUS
  on it), and only then the mapping.
* **Ownership.** The one record is the mapping's hold
  (:attr:`~._lifetime.Hold.owner`). A handle that landed from a pickle is an
  *heir*: once the previous owner let go it takes ownership (at landing, or
  the first time anyone asks :attr:`BlockHandle.owner`), so exactly one live
  handle reports ``owner``.
* **Explicit ends** (:meth:`BlockHandle.close` by the owner, leaving ``with``):
  the name goes now -- unless pickled handles of the block are in flight: then
  the block is marked *closing* and its name goes when the last of them lands
  or their grace passes. :meth:`BlockHandle.unlink` removes the name now.
* **Implicit ends**: a handle collected by the garbage collector stops owning
  (a weak-reference callback); the block goes when nobody holds it and nothing is
  in flight.
* **Pickling** (:meth:`BlockHandle.__reduce__`): the kind's state plus a
  ticket (the pickle in flight, :mod:`._lifetime`), the block id and the
  shared-memory identity. **Landing never raises** because the block cannot
  be reached: the handle keeps its name and layout and raises the reason at
  its first use of the data (API.md section 1, v3), so a pool or an engine
  reports a failed task instead of losing a worker.

Kinds add only what is their own: the header they write, the state they
pickle, what they check in a header, and their data.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final

from typing_extensions import Self

from . import _lifetime, _reaper  # noqa: F401 - the reaper registers with the block layer
from ._block import SharedBlock
from ._header import FIXED_SIZE, MAGIC, BlockKind, Header, parse_header
from ._identity import check_same_shm, shm_identity
from ._platform import backend
from ._waiting import Signal
from .errors import (
    BlockBeingCreatedError,
    BlockNotFoundError,
    ClosedError,
    LayoutError,
    SharedArrayError,
)

__all__ = ["CREATION_WAIT", "OWNERLESS_WAIT", "BlockHandle", "land", "one_pickle_per_message"]

CREATION_WAIT: Final = 1.0
"""Seconds an open waits for the header of a block another process is still creating."""

OWNERLESS_WAIT: Final = 0.1
"""Seconds an open waits for an owner to appear on a block with neither header nor owner.

A creator makes the file first (``O_CREAT``, which fails if the name exists) and
takes OWNER microseconds later: in between, the block is empty and nobody owns it.
"""

# Inside one_pickle_per_message(): the ticket each handle was pickled with (by id; the
# handle is kept so that its id stays its own for the scope's life).
_message_tickets: contextvars.ContextVar[dict[int, tuple[object, int]] | None] = (
    contextvars.ContextVar("shared_memory_array_message_tickets", default=None)
)


@contextlib.contextmanager
def one_pickle_per_message() -> Iterator[None]:
    """Inside, every pickle of one handle counts as the same pickle in flight (one ticket).

    For an engine that serialises one message several ways (Dask tries
    ``pickle``, then ``cloudpickle``) and sends only one of them: the encodings
    it throws away must not keep the block for a grace after its owner's
    ``close()``. Nested scopes are one scope.
    """
    if _message_tickets.get() is not None:
        yield
        return
    token = _message_tickets.set({})
    try:
        yield
    finally:
        _message_tickets.reset(token)


# Live handles: id(weak reference) -> (the reference, its block's hold). A weak reference
# with a callback is much cheaper than weakref.finalize, and not run at interpreter exit
# (where the exit hook lets go of every hold at once: see _reaper).
_handle_refs: dict[int, tuple[weakref.ref[Any], _lifetime.Hold]] = {}


def _watch(handle: BlockHandle, hold: _lifetime.Hold) -> weakref.ref[Any]:
    ref = weakref.ref(handle, _implicit_end)
    _handle_refs[id(ref)] = (ref, hold)
    return ref


def _implicit_end(
    ref: weakref.ref[Any], refs: dict[int, tuple[weakref.ref[Any], _lifetime.Hold]] = _handle_refs
) -> None:
    """A handle was garbage collected: its hold stops owning (the block stays while held).

    Bound to its arguments (no module global): at interpreter exit, when it may
    still run, the module's globals may already be gone.
    """
    try:
        entry = refs.pop(id(ref), None)
        if entry is not None:
            entry[1].drop_owner()
    except Exception:
        pass


class BlockHandle:
    """The base of every handle to one block (see the module docstring).

    Subclasses set :attr:`KIND` and implement :meth:`_pickle_state`,
    :meth:`_open_from_state` and :meth:`_restore_unreachable`; they may
    override :meth:`_check_header`, :meth:`_payload_end` and :meth:`_release`.
    """

    KIND: ClassVar[BlockKind]
    KIND_NAME: ClassVar[str] = "block"
    CONSTRUCTORS: ClassVar[str] = "its classmethods"

    # Class-level defaults so close() works after a failed constructor.
    _block: SharedBlock | None = None
    _header: Header | None = None
    _area: _lifetime.Area | _lifetime.LegacyArea | None = None
    _heir: bool = False
    _closed: bool = False
    _unreachable: SharedArrayError | None = None
    _watched: weakref.ref[Any] | None = None
    _notify: Signal | None = None
    _name: str = ""

    def __init__(self) -> None:
        raise TypeError(f"use {self.CONSTRUCTORS} to make a {type(self).__name__}")

    # -- creation ----------------------------------------------------------------------

    @classmethod
    def _create(
        cls,
        size: int,
        *,
        name: str | None = None,
        populate: bool = False,
        reserve: int | None = None,
    ) -> Self:
        """A handle owning a new block of ``size`` bytes (its header not written yet).

        The caller writes the block's content, then :meth:`_publish` its header,
        inside ``with self._creating():``.
        """
        block = SharedBlock.create(size, name=name, populate=populate, reserve=reserve)
        self = object.__new__(cls)
        self._block = block
        self._name = block.name
        self._watched = _watch(self, block.hold)
        return self

    @contextlib.contextmanager
    def _creating(self) -> Iterator[None]:
        """Unlink the new block if anything inside fails: "unlink if creation fails", once."""
        try:
            yield
        except BaseException:
            block = self._block
            if block is not None:
                block.unlink()
            self.close()
            raise

    def _publish(self, header: bytes) -> None:
        """Write the header (last: attaching processes wait until it is there)."""
        block = self._block
        assert block is not None
        block.write_at(0, header)
        self._adopt(header)

    def _adopt(self, header: bytes) -> None:
        """Take ``header`` (just written into the block) as this handle's header."""
        block = self._block
        assert block is not None
        self._header = parse_header(header, name=block.name, block_size=block.size)
        self._area = _area_of(block, self._header)

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def _open(
        cls,
        name: str,
        *,
        readonly: bool = False,
        private: bool = False,
        wait: bool = True,
        identity: str | None = None,
        block_id: bytes | None = None,
        verify_checksum: bool = True,
        populate: bool = False,
    ) -> Self:
        """Open, check (in the order of the module docstring) and map block ``name``."""
        try:
            block = SharedBlock.open(name, readonly=readonly, private=private, wait=wait)
        except BlockNotFoundError:
            check_same_shm(name, identity)  # a handle from elsewhere: say so
            raise
        try:
            check_same_shm(block.name, identity)
            header = _read_header(block, cls.KIND, verify_checksum)
            if block_id is not None and header.block_id != block_id:
                raise BlockNotFoundError(
                    block.name,
                    f"block {block.name!r} is not the {cls.KIND_NAME} this handle was made "
                    "for (the name was reused by another block)",
                )
            cls._check_header(block, header)
            _check_pages(block, min(block.size, cls._payload_end(header, block.read_at)))
            block.map(populate=populate)
        except BaseException:
            block.close()
            raise
        self = object.__new__(cls)
        self._block = block
        self._name = header.name or block.name
        self._header = header
        self._area = _area_of(block, header)
        self._watched = _watch(self, block.hold)
        return self

    @classmethod
    def _check_header(cls, block: SharedBlock, header: Header) -> None:
        """Kind-specific checks of a parsed header (raise LayoutError)."""
        if header.name and header.name != block.name:
            raise BlockNotFoundError(
                block.name,
                f"block {block.name!r} holds {header.name!r} (two long names share a short "
                "system name)",
            )

    @classmethod
    def _payload_end(cls, header: Header, read: Callable[[int, int], bytes]) -> int:
        """Bytes from the block's start whose pages must all be there before mapping.

        ``read(size, offset)`` reads more of the block, without mapping it.
        """
        return header.data_offset + header.nbytes

    # -- the lifetime rule -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The block's name (no leading slash), as ``attach`` takes it."""
        return self._name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this handle."""
        return self._closed

    @property
    def owner(self) -> bool:
        """Whether this handle owns the block: its :meth:`close` ends the block.

        The creating handle owns it; a handle that landed from a pickle takes
        ownership once the previous owner has let go (API.md section 0:
        exactly one live handle reports it).
        """
        block = self._block
        if block is None or self._closed:
            return False
        hold = block._hold
        if hold is None or hold.closed:
            return False
        if hold.owner:
            return True
        if self._heir and (self._area is None or self._area.state() != _lifetime.STATE_CLOSING):
            return hold.take_owner()
        return False

    def _live_block(self) -> SharedBlock:
        """The block, for a use of its data: raise why it cannot be used, if it cannot."""
        block = self._block
        if block is None or self._closed:
            if self._unreachable is not None and not self._closed:
                raise self._unreachable
            raise ClosedError(f"{self.KIND_NAME} {self._name!r} is closed")
        return block

    def close(self) -> None:
        """Release this handle; the owner also ends the block. Idempotent.

        The owner's close removes the block's name now, or, while pickled
        handles of it are in flight, as soon as the last of them lands or their
        grace passes. Views handed out earlier stay valid.
        """
        if self._closed:
            return
        owner = self.owner
        self._closed = True
        block, self._block = self._block, None
        if self._watched is not None:
            _handle_refs.pop(id(self._watched), None)
        if block is None:
            return
        try:
            if owner:
                area = self._area
                if area is None or area.close_unless_in_flight():
                    self._unlink_name(block)
                block.hold.drop_owner()
        finally:
            self._area = None
            notify, self._notify = self._notify, None
            if notify is not None:
                notify.release()
            self._release()
            block.close()

    def unlink(self) -> None:
        """Remove the block's name now (owner or not); idempotent.

        Mappings, in any process, stay valid; no process can attach afterwards.
        """
        block = self._block
        if block is not None:
            self._unlink_name(block)
        elif self._name and self._header is not None:  # closed: its block may still be named
            self._unlink_closed(self._header.block_id)

    def _unlink_closed(self, block_id: bytes) -> None:
        """Remove the name of this closed handle's block: only if it is still that block."""
        with contextlib.suppress(SharedArrayError, OSError):
            block = SharedBlock.open(self._name, wait=False)
            try:
                header = _read_header(block, self.KIND, True)
                if header.block_id == block_id:
                    block.unlink()
            finally:
                block.close()

    def _signal(self) -> Signal:
        """The block's notify word (its lifetime area, format v3), for notify and wait."""
        block = self._live_block()
        signal = self._notify
        if signal is None:
            area, header = self._area, self._header
            if area is None or header is None or area.notify_offset < 0:
                raise NotImplementedError(
                    f"{self.KIND_NAME} {self._name!r} has no notify word (a read-only handle, "
                    "or a block made by an older version of this library)"
                )
            view = block.shared_view(header.data_offset)
            signal = self._notify = Signal(
                view, area.notify_offset, area.waiters_offset, block.hold.locks
            )
        return signal

    def _unlink_name(self, block: SharedBlock) -> bool:
        """Remove the name if it is still this block's (a kind with more to remove adds it)."""
        return block.unlink()

    def _release(self) -> None:
        """Let go of the kind's own views of the block (before the mapping is closed)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pickling ----------------------------------------------------------------------

    def _pickle_state(self) -> tuple[Any, ...]:
        """What the kind needs to open the block again elsewhere (never the data)."""
        raise NotImplementedError

    @classmethod
    def _open_from_state(
        cls, state: tuple[Any, ...], identity: str | None, block_id: bytes | None
    ) -> Self:
        """Open the block a pickle names (the kind checks its layout against ``state``)."""
        raise NotImplementedError

    def _restore_unreachable(self, state: tuple[Any, ...]) -> None:
        """Set what a handle that cannot reach its block still shows (name, layout)."""
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the kind's state, a ticket, the block id and the identity: never the data.

        The ticket counts this pickle as a handle in flight until it lands
        (:mod:`._lifetime`), so the block outlives this handle while the
        receiver may still need it.
        """
        ticket = 0
        area = self._area
        block = self._block
        if area is not None and block is not None and not self._closed:
            scope = _message_tickets.get()
            if scope is not None and id(self) in scope:
                ticket = scope[id(self)][1]
            else:
                ticket = area.pickled()
                if scope is not None:
                    scope[id(self)] = (self, ticket)
        header = self._header
        block_id = header.block_id if header is not None else b""
        return (land, (type(self), self._pickle_state(), ticket, block_id, shm_identity()))

    def _landed(self, ticket: int) -> None:
        """This handle was unpickled: its ticket lands; it is the heir of the block."""
        self._heir = True
        area, block = self._area, self._block
        if area is not None and block is not None and area.landed(ticket):
            self._unlink_name(block)  # the owner ended it; the last handle in flight is here
        self.owner  # noqa: B018 - takes ownership now if the previous owner has let go


def land(
    cls: type[BlockHandle],
    state: tuple[Any, ...],
    ticket: int,
    block_id: bytes,
    identity: str | None,
) -> BlockHandle:
    """Unpickle a handle; never raises because its block cannot be reached (see the module)."""
    try:
        handle = cls._open_from_state(state, identity, block_id or None)
    except SharedArrayError as exc:
        handle = object.__new__(cls)
        handle._unreachable = exc
        handle._restore_unreachable(state)
        return handle
    handle._landed(ticket)
    return handle


def _area_of(block: SharedBlock, header: Header) -> _lifetime.Area | _lifetime.LegacyArea | None:
    offset = header.lifetime_offset
    if offset is None or (block.readonly and not block.private):
        return None  # v1: no area; a read-only reader changes nothing in it
    view = block.shared_view(offset + header.area_size)
    kind = _lifetime.Area if header.version >= 3 else _lifetime.LegacyArea
    return kind(view, offset, block.hold.locks)


# Blocks whose first bytes this process found all there: (dev, ino, ctime, bytes checked).
_checked: dict[tuple[int, int, int], int] = {}
_CHECKED_MAX: Final = 1024


def _check_pages(block: SharedBlock, end: int) -> None:
    """Raise LayoutError unless every page of ``block``'s first ``end`` bytes is there.

    A page that is not there reads as zeros through ``read``, but through a
    mapping of a full filesystem it is a SIGBUS. Reserved pages count in
    ``st_blocks``; but so do pages reserved past the end of the file
    (``fallocate(FALLOC_FL_KEEP_SIZE)``), so only a look at the range itself
    proves it (``SEEK_HOLE``, which walks the file's pages: about 4 ms per GiB
    here). Done once per block per process: the answer is kept by the file's
    identity and change time (a process that punches holes into a block others
    use can crash them, as one that truncates it can: API.md section 6).
    """
    if end <= 0 or not backend.reserves_pages:
        return
    info = block.stat
    key = (info.st_dev, info.st_ino, info.st_ctime_ns)
    if _checked.get(key, -1) >= end:
        return
    if info.st_blocks * 512 < min(end, info.st_size):
        hole: int | None = 0  # fewer pages than bytes: certainly a hole somewhere
    else:
        hole = block.first_hole(0, end)
    if hole is not None:
        raise LayoutError(
            f"block {block.name!r} has no page behind byte {hole} of its first {end} "
            "bytes: reading it could crash this process (SIGBUS)"
        )
    if len(_checked) >= _CHECKED_MAX:
        _checked.clear()
    _checked[key] = end


def _read_header(block: SharedBlock, kind: BlockKind, verify_checksum: bool) -> Header:
    """Parse the block's header; a block still being created is waited for, then "not found"."""
    deadline = ownerless_until = 0.0
    delay = 1e-4
    while True:
        raw = block.header_bytes()
        if raw[:8] == MAGIC:
            return parse_header(
                raw,
                expected_kind=kind,
                name=block.name,
                verify_checksum=verify_checksum,
                block_size=block.size,
            )
        # No header yet (its place all zeros, or not even sized): its creator, who owns it
        # from microseconds after the name appears (OWNERLESS_WAIT) and writes the header
        # last, is still at work. Other bytes there are a corrupt header; a block that
        # stays empty with no owner is not being created.
        now = time.monotonic()
        if not deadline:
            deadline, ownerless_until = now + CREATION_WAIT, now + OWNERLESS_WAIT
        if any(raw[:FIXED_SIZE]) or (now > ownerless_until and not block.hold.owner_elsewhere()):
            return parse_header(raw, expected_kind=kind, name=block.name, block_size=block.size)
        if now > deadline:
            raise BlockBeingCreatedError(
                block.name, f"block {block.name!r} is still being created (no header yet)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
        block.refresh_size()
