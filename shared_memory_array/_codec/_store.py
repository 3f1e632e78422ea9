"""The codec's blocks: one pickled object per block, its buffers beside the stream.

A codec block is a block of kind ``codec`` (:mod:`.._header`) whose header's
``extra`` is the buffer table (:mod:`._pickling`) and whose payload is::

    data_offset + 0    the payload state word, 8 bytes (below)
    data_offset + 64   pickle stream
    ...                each buffer, 64-byte aligned

Reading validates the table before touching anything and raises
:class:`~shared_memory_array.LayoutError` quoting the bad value.

The two state words
-------------------
A codec block carries two words called "state"; they answer different
questions and live in different places:

====================  ============================  =====================================
word                  values                        says
====================  ============================  =====================================
payload state         ``live``, ``released``        whether the object of the current
(``data_offset``)                                   generation may still be read: any
                                                    process's ``release`` writes
                                                    ``released``, and reading the token
                                                    raises from then on
lifetime state        0 live, 1 pooled              whether the writer keeps the released
(lifetime area,                                     block for its next writes
:mod:`.._lifetime`)                                 (``list_blocks`` shows ``pooled``)
====================  ============================  =====================================

A token names a block *and* a generation (the header's): a block rewritten by
its writer (a pooled block reused) has a new generation and a new block id, so
an old token raises :class:`~shared_memory_array.BlockNotFoundError` instead
of returning another object's bytes.

Lifetime
--------
The block rule of API.md section 0 (:mod:`.._handle`), with the codec's policy
on top: the writer holds each block it wrote and owns it until the token is
released. Readers hold it while any view of it lives. A token is readable only
while its writer owns the block: once the writer exits (or is killed) reading
it raises, while views already handed out stay valid.

Security: reading a token unpickles data, which can run code, exactly like
:func:`pickle.loads`. Blocks are created with mode 0600 and another user's
block is refused, so only the same user can have written them; accept tokens
only from processes you trust.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from typing_extensions import Self

from .._block import GENERATED_NAME_EXAMPLE
from .._handle import BlockHandle
from .._header import BlockKind, align, encode_header, header_size_for
from ..errors import BlockBusyError, BlockNotFoundError, LayoutError
from ._pickling import Pickled, decode_table, encode_table, fill, place, unpickle

__all__ = ["LIVE", "RELEASED", "STATE_SIZE", "CodecBlock", "Plan", "plan", "read_block"]

BLOCK_ALIGNMENT: Final = 64
STATE_SIZE: Final = 64  # the payload state word, padded so the stream starts aligned
LIVE: Final = b"live\0\0\0\0"
RELEASED: Final = b"released"


@dataclass(frozen=True)
class Plan:
    """Where everything goes in a codec block."""

    spans: list[tuple[int, int]]
    extra: bytes
    header_size: int
    payload_size: int

    @property
    def block_size(self) -> int:
        """Bytes of header, lifetime area and payload."""
        return self.header_size + self.payload_size


def plan(pickled: Pickled, name: str) -> Plan:
    """Lay out ``pickled`` in a codec block named ``name``."""
    spans, payload_size = place(pickled, STATE_SIZE, BLOCK_ALIGNMENT)
    extra = encode_table(spans)
    return Plan(spans, extra, header_size_for(extra_len=len(extra), name=name), payload_size)


def _released_error(name: str, generation: int | None) -> BlockNotFoundError:
    which = "the object" if generation is None else f"the object of generation {generation}"
    return BlockNotFoundError(
        name, f"{which} in shared-memory block {name!r} was released (read after release)"
    )


class CodecBlock(BlockHandle):
    """One codec block: the writer's (it owns it) or a reader's (for one :meth:`load`)."""

    KIND: ClassVar[BlockKind] = BlockKind.CODEC
    KIND_NAME: ClassVar[str] = "codec block"

    @classmethod
    def create(cls, pickled: Pickled) -> Self:
        """A new codec block holding ``pickled`` (generation 0), owned by this handle.

        Where the platform has positional writes, the data goes in with
        ``pwrite`` into the pages reserved at creation, so this process never
        faults them into its mapping (measured on the reference machine, 1 GB:
        0.52 s, against 0.83 s with ``MAP_POPULATE`` and a copy through the
        mapping).

        Raises
        ------
        AllocationError
            Shared memory, an inode or a file descriptor is not available.
        """
        # Every generated name has the same length: the plan holds for the one drawn.
        layout = plan(pickled, GENERATED_NAME_EXAMPLE)
        self = cls._create(align(layout.block_size, mmap.PAGESIZE))
        with self._creating():
            self.store(pickled, layout, 0, by_descriptor=True)
        return self

    def store(
        self, pickled: Pickled, layout: Plan, generation: int, *, by_descriptor: bool
    ) -> None:
        """Write payload, ``live`` and (last) the header of generation ``generation``.

        ``by_descriptor``: large pieces go in by positional writes (a new block,
        whose pages this process has not mapped); else through the mapping (a
        pooled block whose mapping is populated).
        """
        block = self._live_block()
        header = encode_header(
            BlockKind.CODEC,
            nbytes=layout.payload_size,
            generation=generation,
            extra=layout.extra,
            name=block.name,
        )
        buf = block.buf
        region = buf[len(header) : len(header) + layout.payload_size]
        fd = block.fileno() if by_descriptor else -1
        fill(region, pickled, layout.spans, fd=fd, fd_offset=len(header))
        region[: len(LIVE)] = LIVE
        region.release()
        if by_descriptor:
            self._publish(header)
        else:
            buf[: len(header)] = header
            self._adopt(header)

    @property
    def generation(self) -> int:
        """The generation of the object stored now."""
        header = self._header
        return 0 if header is None else header.generation

    @property
    def block_id(self) -> bytes:
        """The block id of the object stored now (a rewrite draws a new one)."""
        header = self._header
        return b"" if header is None else header.block_id

    def state(self) -> bytes:
        """The payload state word (``live`` or ``released``)."""
        header = self._header
        assert header is not None
        buf = self._live_block().buf
        return bytes(buf[header.data_offset : header.data_offset + len(LIVE)])

    def mark(self, state: bytes) -> None:
        """Set the payload state word."""
        header = self._header
        assert header is not None
        self._live_block().buf[header.data_offset : header.data_offset + len(state)] = state

    def set_pooled(self, pooled: bool) -> None:
        """Set the lifetime state: pooled (kept for reuse) or live."""
        from .._lifetime import STATE_LIVE, STATE_POOLED

        if self._area is not None:
            self._area.set_state(STATE_POOLED if pooled else STATE_LIVE)

    def load(self) -> object:
        """Rebuild the stored object; arrays are views on this block's mapping."""
        header = self._header
        assert header is not None
        block = self._live_block()
        where = f"block {block.name!r}"
        spans = decode_table(header.extra, header.nbytes, STATE_SIZE, where, exact=True)
        payload = block.buf[header.data_offset : header.data_offset + header.nbytes]
        return unpickle(payload, spans, where)

    @classmethod
    def open_checked(
        cls,
        name: str,
        generation: int | None,
        *,
        readonly: bool = True,
        private: bool = False,
        block_id: bytes | None = None,
        identity: str | None = None,
        writer_must_live: bool = False,
    ) -> Self:
        """Open codec block ``name`` and check its header, generation and state.

        Raises
        ------
        BlockNotFoundError
            The block is gone, its object (of ``generation``, when given) was
            released, or (``writer_must_live``) its writer has exited.
        LayoutError
            The block's header or state word is invalid.
        """
        try:
            # A writer holds the block exclusively only while it rewrites a released block.
            self = cls._open(
                name,
                readonly=readonly,
                private=private,
                wait=generation is None,
                identity=identity,
            )
        except BlockBusyError:
            if generation is None:
                raise
            raise _released_error(name, generation) from None
        try:
            header = self._header
            assert header is not None
            if generation is not None and header.generation != generation:
                raise _released_error(name, generation)
            if block_id is not None and header.block_id != block_id:
                raise BlockNotFoundError(
                    name, f"block {name!r} is not the block this token was made for"
                )
            if header.nbytes < STATE_SIZE:
                raise LayoutError(
                    f"block {name!r}: codec payload of {header.nbytes} bytes is shorter than "
                    f"its {STATE_SIZE}-byte state area"
                )
            state = self.state()
            if state == RELEASED:
                raise _released_error(name, generation)
            if state != LIVE:
                raise LayoutError(f"block {name!r}: unknown codec state word {state!r}")
            block = self._live_block()
            if writer_must_live and not block.hold.owner_elsewhere():
                raise BlockNotFoundError(
                    name, f"the writer of block {name!r} has exited: its tokens are dead"
                )
        except BaseException:
            self.close()
            raise
        return self

    def _pickle_state(self) -> tuple[Any, ...]:
        raise TypeError("a codec block is not pickled: pass its token instead")


def read_block(
    name: str,
    *,
    generation: int | None = None,
    readonly: bool = True,
    private: bool = False,
    block_id: bytes | None = None,
    identity: str | None = None,
) -> object:
    """Rebuild the object in codec block ``name``; arrays are views on the block.

    ``generation`` is checked when given (tokens carry it, and then the writer
    must still run; ``SharedData`` passes none).

    Raises
    ------
    BlockNotFoundError
        The block is gone, or its object was released.
    LayoutError
        The block is not a valid codec block.
    """
    handle = CodecBlock.open_checked(
        name,
        generation,
        readonly=readonly,
        private=private,
        block_id=block_id,
        identity=identity,
        writer_must_live=generation is not None,
    )
    try:
        return handle.load()
    finally:
        # Unmapped (and no longer held) now if the object holds no view; else with its last view.
        handle.close()


def release_foreign(name: str, generation: int, block_id: bytes | None, identity: str) -> None:
    """Mark generation ``generation`` of block ``name`` released (a block of another process).

    The writer notices within its collection interval and frees or pools it;
    a writer that has exited cannot, so then the name goes now.
    """
    try:
        handle = CodecBlock.open_checked(
            name, generation, readonly=False, block_id=block_id, identity=identity
        )
    except BlockNotFoundError:
        return  # gone, released or reused: nothing left to do
    try:
        handle.mark(RELEASED)
        if not handle._live_block().hold.owner_elsewhere():
            handle.unlink()
    finally:
        handle.close()
