"""Per-partition numpy blocks: built once from Arrow on the executor, kept on its local disk and in
the Python worker's memory, so training jobs ship only a tiny handle instead of the data.

Why not cache the arrays in a Spark RDD: Spark's RDD cache keeps pickled bytes and re-ships every
block to the Python worker on every job (about 0.4 s per 94 MB block here), which dominates a job
that computes one gradient. Here the cached RDD holds only a handle row; the task that owns the
partition runs where the handle (and so the block file) lives, and a reused Python worker finds the
arrays already in memory.

Row order and roles. A block holds every row of its partition, sorted by (is_test, shard, id), where
`shard = pmod(xxhash64(id), N_SHARDS)` is computed by Spark and every shard lives in exactly one
partition. The train-split rows therefore have one global order, (shard, id), that does not depend on
the number of partitions: the global index of a row is the count of train-split rows in lower shards
(summed on the driver from every block's per-shard counts) plus its rank inside its shard. From that
index, the run seed alone decides which rows are held out for validation and how `sync` forms its
global mini-batches, so results never depend on how many partitions there are.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from udfs import worker
from udfs.secagg import SECRET_BYTES
from udfs.seeding import Stream, rng

N_SHARDS = 1024

HANDLE_SCHEMA = ("part int, path string, rows long, test_rows long, width int, label_max double, "
                 "float_label boolean, distinct_labels int, shard_counts binary")
ARRAYS = ("X", "y", "id", "shard", "test")
SECRET_FILE = "secret.key"


class BlockError(ValueError):
    """A row of the training table cannot become part of a block (named by its id)."""


@dataclass(frozen=True)
class Block:
    X: np.ndarray        # float32 [n, d]
    y: np.ndarray        # int32 (classification) or float64 (regression) [n]
    id: np.ndarray       # int64 [n]
    shard: np.ndarray    # int32 [n]
    test: np.ndarray     # bool [n]


def _features(column: pa.ChunkedArray | pa.Array, ids: np.ndarray, width: int | None) -> np.ndarray:
    """Turn a list<float> Arrow column into a 2-D float32 array without a per-row Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        bad = ids[np.asarray(arr.is_null())][0]
        raise BlockError(f"row id {bad}: features is null")
    offsets = np.asarray(arr.offsets)
    lengths = np.diff(offsets)
    width = int(lengths[0]) if width is None and len(lengths) else width
    if len(lengths) and (lengths != width).any():
        i = int(np.flatnonzero(lengths != width)[0])
        raise BlockError(f"row id {ids[i]}: features has {lengths[i]} values, expected {width}")
    values = np.asarray(arr.values.slice(offsets[0], offsets[-1] - offsets[0]), dtype=np.float32)
    return values.reshape(len(lengths), width or 0)


def assemble(batches: Iterator[pa.RecordBatch]) -> Block:
    """One block from all the Arrow batches of a partition (columns id, features, label, split,
    shard), sorted by (is_test, shard, id)."""
    table = pa.Table.from_batches(list(batches))
    ids = np.asarray(table.column("id"), dtype=np.int64)
    X = _features(table.column("features"), ids, None)
    label = table.column("label")
    y = np.asarray(label, dtype=np.float64 if pa.types.is_floating(label.type) else np.int32)
    shard = np.asarray(table.column("shard"), dtype=np.int32)
    test = np.asarray(table.column("split")) == "test"
    order = np.lexsort((ids, shard, test))
    return Block(X[order], y[order], ids[order], shard[order], test[order])


def block_dir(root: str, key: str, part: int) -> str:
    return os.path.join(root, "fedspark-blocks", key, f"part-{part:05d}")


def save(block: Block, path: str) -> None:
    """Write the block's arrays as .npy files, atomically (a retried task may race a dead one)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in ARRAYS:
        np.save(os.path.join(tmp, f"{name}.npy"), getattr(block, name), allow_pickle=False)
    _write_secret(os.path.join(tmp, SECRET_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _write_secret(path: str) -> None:
    """The partition's own secret for secure aggregation: OS entropy, never derived from the run
    seed, readable only by this user and only ever read by this partition's tasks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(SECRET_BYTES))


def secret(path: str) -> bytes:
    """The secret of the block at `path` (see _write_secret)."""
    with open(os.path.join(path, SECRET_FILE), "rb") as fh:
        return fh.read()


def build_partition(batches: Iterator[pa.RecordBatch], key: str) -> Iterator[pa.RecordBatch]:
    """mapInArrow function: assemble this partition's block, store it on the executor's local disk
    and return one handle row: where it is, its size and labels, and train-split rows per shard."""
    from pyspark import SparkFiles, TaskContext

    worker.prepare()
    part = TaskContext.get().partitionId()
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return
    block = assemble(iter(batches))
    path = block_dir(SparkFiles.getRootDirectory(), key, part)
    save(block, path)
    counts = np.bincount(block.shard[~block.test], minlength=N_SHARDS).astype(np.int64)
    yield pa.RecordBatch.from_pydict({
        "part": pa.array([part], pa.int32()),
        "path": pa.array([path]),
        "rows": pa.array([len(block.id)], pa.int64()),
        "test_rows": pa.array([int(block.test.sum())], pa.int64()),
        "width": pa.array([block.X.shape[1]], pa.int32()),
        "label_max": pa.array([float(block.y.max())], pa.float64()),
        "float_label": pa.array([block.y.dtype.kind == "f"]),
        "distinct_labels": pa.array([len(np.unique(block.y))], pa.int32()),
        "shard_counts": pa.array([counts.tobytes()], pa.binary()),
    })


# What this Python worker holds in memory, by block path: the block, and values derived from it
# (roles, a float64 copy, sync's batch plan). Spark reuses Python workers across tasks, so a block is
# read from disk once per worker. Everything of other datasets is dropped when a new one arrives,
# and `remove_partition` drops a dataset's files and memory when the driver releases it.
_LOADED: dict[str, Block] = {}
_DERIVED: dict[str, dict[Any, Any]] = {}
_DERIVED_PER_BLOCK = 8


def _forget(keep: Callable[[str], bool]) -> None:
    for path in [p for p in _LOADED if not keep(p)]:
        del _LOADED[path]
        _DERIVED.pop(path, None)


def load(path: str) -> Block:
    block = _LOADED.get(path)
    if block is None:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"block {path} is not on this executor: the task ran away from the executor that "
                "built it (raise spark.locality.wait), or the executor's files were removed")
        dataset = os.path.dirname(path)
        _forget(lambda p: os.path.dirname(p) == dataset)
        block = Block(*(np.load(os.path.join(path, f"{n}.npy"), allow_pickle=False) for n in ARRAYS))
        _LOADED[path] = block
    return block


def derived(path: str, key: Any, compute: Callable[[Block], Any]) -> Any:
    """`compute(block)` for the block at `path`, kept while the block is (the newest few per block)."""
    block = load(path)
    cache = _DERIVED.setdefault(path, {})
    if key not in cache:
        if len(cache) >= _DERIVED_PER_BLOCK:
            del cache[next(iter(cache))]
        cache[key] = compute(block)
    return cache[key]


def remove_partition(rows: Iterable[Any]) -> Iterator[int]:
    """mapPartitions function: delete this partition's block files and forget the dataset here."""
    for row in rows:
        dataset = os.path.dirname(row.path)
        _forget(lambda p: os.path.dirname(p) != dataset)
        shutil.rmtree(row.path, ignore_errors=True)
        yield 1


@dataclass(frozen=True)
class Layout:
    """Global facts every task needs to place its rows: the offset of each shard in the global
    (shard, id) order of train-split rows, and how the run splits them."""

    shard_offsets: tuple[int, ...]   # N_SHARDS + 1 cumulative counts
    seed: int
    validation_fraction: float

    @property
    def n_train_split(self) -> int:
        return self.shard_offsets[-1]

    @property
    def n_validation(self) -> int:
        return int(round(self.validation_fraction * self.n_train_split))

    @property
    def n_train(self) -> int:
        return self.n_train_split - self.n_validation


@dataclass(frozen=True)
class Roles:
    """Where a block's rows go: train rows (block positions, ordered by global train index, and
    that index), validation rows and test rows."""

    train: np.ndarray
    train_index: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def global_index(block: Block, offsets: np.ndarray) -> np.ndarray:
    """Global (shard, id)-order index of each train-split row of the block, in block order."""
    shards = block.shard[~block.test]
    first_in_block = np.searchsorted(shards, shards, side="left")
    return offsets[shards] + (np.arange(len(shards)) - first_in_block)


@lru_cache(maxsize=4)
def validation_mask(n_train_split: int, n_validation: int, seed: int) -> np.ndarray:
    """Which global indices are validation rows: exactly n_validation of them, drawn by the seed."""
    ranks = rng(seed, Stream.VALIDATION).permutation(n_train_split)
    return ranks < n_validation


def roles(block: Block, layout: Layout) -> Roles:
    offsets = np.asarray(layout.shard_offsets, dtype=np.int64)
    g = global_index(block, offsets)
    split_rows = np.flatnonzero(~block.test)
    held_out = validation_mask(layout.n_train_split, layout.n_validation, layout.seed)
    is_val = held_out[g]
    # rank among the training rows: global index minus validation rows before it
    val_before = np.concatenate(([0], np.cumsum(held_out)))
    train_index = g[~is_val] - val_before[g[~is_val]]
    return Roles(split_rows[~is_val], train_index, split_rows[is_val], np.flatnonzero(block.test))
