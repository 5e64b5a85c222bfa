"""The per-worker cache: what one Python worker keeps of the data stored on its executor's local
disk (data-parallel blocks, udfs/data/blocks.py; model-parallel cells, udfs/model_parallel/shards.py)
and of the values derived from it (roles, batch plans, a float64 copy).

Spark reuses Python workers across tasks, so an entry is opened once per worker. One budget bounds
everything the cache keeps in memory: an entry's budget (`cache_bytes`, the dataset's share per
worker of data.worker_cache_gb, written beside the data when it was built). An entry is held in
memory only while what the worker already keeps plus the entry fit in it; any other is
memory-mapped from the local disk, so the operating system streams it from the page cache or the
disk on every pass and a table larger than the budget still trains.

Derived values come before in-memory copies of entries: they are small (index arrays, a few bytes a
row) but cost a sort or a gather over the entry to rebuild, while an entry memory-mapped from a warm
page cache reads about as fast as a copy (measured on the 20M-row benchmark: 0.12-0.2 s per 1 GB
block either way, while rebuilding a 2M-row block's roles took 0.12-0.2 s on every task). So a
derived value that does not fit first demotes in-memory entries to memory-mapped ones; only when
none is left is it computed again each time it is asked for instead of kept. Entries are not
evicted to make room for other entries (two taking turns would reread each other every pass);
everything of other datasets (another directory of entries) is dropped when a new one arrives, and
`release` drops a dataset when the driver releases it.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

import numpy as np
from scipy import sparse


class Entry(Protocol):
    """What the cache needs to know of a block or a cell (frozen dataclasses: read-only here)."""

    derived_per_entry: ClassVar[int]  # derived values kept per entry, the newest first

    @property
    def in_memory(self) -> bool:
        """Whether the entry was copied into the worker's memory (else it is memory-mapped)."""

    @property
    def budget(self) -> int:
        """Bytes the worker may keep (see above)."""

    @property
    def cached_bytes(self) -> int:
        """Bytes the entry itself keeps in the worker's memory: nothing when memory-mapped."""


E = TypeVar("E", bound=Entry)
Opener = Callable[[str, bool], Entry]   # (path, may be copied into memory) -> entry


def _file_backed(a: np.ndarray) -> bool:
    """Whether an array's pages are a memory-mapped file's (owned by the OS page cache). A
    memory-mapped array's astype copy is an np.memmap too, but one in the worker's memory."""
    base: Any = a
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = getattr(base, "base", None)
    return False


def nbytes(value: Any) -> int:
    """Bytes of the numpy arrays in `value` (nested tuples, lists, dicts, dataclasses, CSR
    matrices), each array counted once (a batch plan may hand back the roles' own array);
    memory-mapped arrays count nothing: their pages belong to the OS page cache."""
    return sum({id(a): a.nbytes for a in _arrays(value)}.values())


def _arrays(value: Any) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        if not _file_backed(value):
            yield value
        return
    if sparse.issparse(value):
        value = (value.data, value.indices, value.indptr)
    elif isinstance(value, dict):
        value = tuple(value.values())
    elif is_dataclass(value) and not isinstance(value, type):
        value = tuple(getattr(value, f.name) for f in fields(value))
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays(v)


# By path: the entry and how to open it again (memory-mapped, when demoted); the derived values.
_ENTRIES: dict[str, tuple[Entry, Opener]] = {}
DERIVED: dict[str, dict[Any, Any]] = {}


def _forget(keep: Callable[[str], bool]) -> None:
    for path in [p for p in _ENTRIES if not keep(p)]:
        del _ENTRIES[path]
        DERIVED.pop(path, None)


def resident_bytes(adding: Any = None) -> int:
    """Bytes this worker's cache keeps in memory (in-memory entries and kept derived values), and
    would keep after also keeping `adding`."""
    return (sum(entry.cached_bytes for entry, _ in _ENTRIES.values())
            + nbytes([adding] + [list(kept.values()) for kept in DERIVED.values()]))


def has_room(size: int, budget: int) -> bool:
    """Whether `size` more bytes fit in the budget beside what the worker keeps: an opener asks
    before copying an entry into memory."""
    return resident_bytes() + size <= budget


@dataclass(frozen=True)
class Kind(Generic[E]):
    """One kind of entry (blocks, cells): how to open one and the error for one that is not here."""

    open: Callable[[str, bool], E]   # an Opener of this kind's entries
    missing: Callable[[str], Exception]

    def load(self, path: str) -> E:
        """The entry at `path`, opened once per worker. The files decide: an entry whose directory
        is gone (released, or built on another executor) is missing even if this worker still
        remembers it."""
        if not os.path.isdir(path):
            _forget(lambda p: p != path)
            raise self.missing(path)
        held = _ENTRIES.get(path)
        if held is None:
            dataset = os.path.dirname(path)
            _forget(lambda p: os.path.dirname(p) == dataset)
            held = _ENTRIES[path] = (self.open(path, True), self.open)
        # every entry under `path` was opened by this kind's opener (a path names a block or a
        # cell, never both), so it is an E; _ENTRIES is shared by all kinds, hence the cast
        return cast(E, held[0])

    def derived(self, path: str, key: Any, compute: Callable[[E], Any]) -> Any:
        """`compute(entry)` for the entry at `path`, kept while the entry is (the newest few per
        entry) if the worker's budget has room for it, demoting in-memory entries to make that room."""
        entry = self.load(path)
        kept = DERIVED.setdefault(path, {})
        if key in kept:
            return kept[key]
        if len(kept) >= entry.derived_per_entry:
            del kept[next(iter(kept))]
        value = compute(entry)
        held = sorted((p for p, (e, _) in _ENTRIES.items() if e.in_memory), key=lambda p: p == path)
        while resident_bytes(value) > entry.budget and held:
            demoted = held.pop(0)   # other entries first: the caller is still using this one
            opener = _ENTRIES[demoted][1]
            _ENTRIES[demoted] = (opener(demoted, False), opener)
        if resident_bytes(value) <= entry.budget:
            kept[key] = value
        return value


def release(path: str) -> None:
    """Forget the dataset of the entry at `path` here: the driver released it."""
    dataset = os.path.dirname(path)
    _forget(lambda p: os.path.dirname(p) != dataset)
