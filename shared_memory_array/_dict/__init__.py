"""``SharedDict``: a process-shared mapping on the library's own heap, split along its seams.

=============  ==================================================================
module         job
=============  ==================================================================
_layout        the format of the entry and data blocks, entries, control words
_keys          canonical key bytes: equal keys are one key in every process
_table         the hash table: probing, entries, publishing with one store
_journal       the crash protocol: mutation marker, update journal, repair
_lock          the lock: a robust mutex (or ``flock``), re-entrant per process
_cache         a handle's read cache
_store         the data blocks: making, opening, growing
_facade        :class:`SharedDict`, the mapping
=============  ==================================================================

Imports go one way, down this table (the journal imports the table and the
layout; the table never imports the journal but for a type).
"""

from ._facade import SharedDict, SharedDictLock, ZeroCopyDict

__all__ = ["SharedDict", "SharedDictLock", "ZeroCopyDict"]
