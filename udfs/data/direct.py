"""Blocks built straight from a table version's Parquet files, with no shuffle, and kept in the
block store (udfs/data/store.py) for later loads of the same version.

When the executors can read the table's files themselves (a lake on a local or shared file
system; the driver decides, pipelines/data/direct.py), a task needs nothing but the list of files
to build any block: it reads the files through Arrow (no JVM conversion of the features, no
shuffle of them), keeps the rows its partitions own, sorts them by (split, shard, id) and writes
them as udfs/data/blocks.py does. The blocks are the same as the shuffled build's: `shard` is
Spark's pmod(xxhash64(id), N_SHARDS), computed here with the same hash (checked against Spark in
tests/test_block_cache.py), and a row goes to the same partition by the same rule.

Two jobs. `fill` (only when there are more partitions than task slots, as for 100 federated
clients) builds the blocks the store lacks in a few tasks, each reading the table once for its
share of partitions. `obtain` then runs one task per partition: it takes its block from the store
(hard links), or builds it alone when the store on that executor does not have it (the first load
of a few partitions; a task placed on another executor; a rebuild after the files were lost), and
gives the block this application's meta.json and a fresh secret. Because `obtain` can always build
its block, the cached handles' lineage rebuilds a lost block anywhere (data.Blocks.run).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Row

from udfs.core import files, worker
from udfs.data import blocks, store
from udfs.data.transform import Transform

if TYPE_CHECKING:
    from pyspark import Broadcast

COLUMNS = ("id", "features", "label", "split")
READ_BATCH_ROWS = 8192
_P1, _P2, _P3, _P4, _P5 = (np.uint64(x) for x in (
    0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5))
SPARK_HASH_SEED = 42


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def xxhash64(ids: np.ndarray) -> np.ndarray:
    """Spark's xxhash64 of a long column (XxHash64Function.hashLong, seed 42), as uint64."""
    with np.errstate(over="ignore"):
        k = _rotl(ids.astype(np.int64).view(np.uint64) * _P2, 31) * _P1
        h = (np.uint64(SPARK_HASH_SEED) + _P5 + np.uint64(8)) ^ k
        h = _rotl(h, 27) * _P1 + _P4
        h = (h ^ (h >> np.uint64(33))) * _P2
        h = (h ^ (h >> np.uint64(29))) * _P3
        return h ^ (h >> np.uint64(32))


def shard_of(ids: np.ndarray) -> np.ndarray:
    """pmod(xxhash64(id), N_SHARDS) as Spark computes it (N_SHARDS is a power of two)."""
    return (xxhash64(ids) & np.uint64(blocks.N_SHARDS - 1)).astype(np.int32)


class Placement(Protocol):
    """Which partition each row goes to (-1: none), from its id and shard."""

    def targets(self, ids: np.ndarray, shard: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ByShard:
    """Training blocks: shard s in partition s mod partitions (every shard in one partition)."""

    partitions: int

    def targets(self, ids: np.ndarray, shard: np.ndarray) -> np.ndarray:
        return shard % self.partitions


@dataclass(frozen=True)
class ByAssignment:
    """Federated clients: the driver's assignment of row ids to clients, by broadcast
    ((sorted ids, client of each) as one int64 array [2, n]); rows it does not name go nowhere."""

    assignment: Broadcast

    def targets(self, ids: np.ndarray, shard: np.ndarray) -> np.ndarray:
        known, client = self.assignment.value
        pos = np.searchsorted(known, ids)
        at = np.minimum(pos, len(known) - 1)
        return np.where((pos < len(known)) & (known[at] == ids), client[at], -1)


@dataclass(frozen=True)
class Source:
    """A table version's Parquet files (local paths), the splits to keep, the key of its blocks in
    the store (a pure function of the table's content, the partitioning and the transform), and
    the feature transform the blocks hold their features after (None: as stored)."""

    files: tuple[str, ...]
    splits: tuple[str, ...]
    key: str
    transform: Transform | None = None


@dataclass(frozen=True)
class StoreSpec:
    """Where an executor keeps the blocks: `root` (None: the default under the user's cache dir)
    with at most `cap_bytes`, or, when `persistent` is false, the load's own directory."""

    persistent: bool
    root: str | None = None
    cap_bytes: int | None = None

    def resolve(self, block_path: str) -> store.Store:
        """The store on this executor; the load's own when the persistent one cannot be made
        (an executor user without a writable home)."""
        if self.persistent:
            root = os.path.expanduser(self.root) if self.root else store.default_root()
            try:
                os.makedirs(root, mode=0o700, exist_ok=True)
                return store.Store(root, self.cap_bytes)
            except OSError:
                pass
        return store.Store(blocks.own_store_root(block_path), None)


def read_columns(paths: Iterable[str], columns: tuple[str, ...], splits: tuple[str, ...]
                 ) -> Iterator[pa.RecordBatch]:
    """`columns` of the rows of the given splits, file by file in batches."""
    wanted = pa.array(list(splits))
    read = list(dict.fromkeys((*columns, "split")))
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=read,
                                                       use_threads=False):
            keep = pc.fill_null(pc.is_in(batch.column("split"), value_set=wanted), False)
            if not pc.all(keep).as_py():
                batch = batch.filter(keep)
            if batch.num_rows:
                yield batch.select(list(columns))


@dataclass
class _Rows:
    """Rows of one partition as read: feature matrices and per-row columns (blocks.SMALL)."""

    X: list[np.ndarray] = field(default_factory=list)
    small: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, X: np.ndarray, small: dict[str, np.ndarray], rows: np.ndarray) -> None:
        self.X.append(X[rows])
        self.small.append({name: column[rows] for name, column in small.items()})

    def write(self, tmp: str) -> bool:
        """The block of these rows, sorted by (is_test, shard, id) as the shuffled build sorts
        them, into `tmp`; False when there are none."""
        if not self.X:
            return False
        small = {name: np.concatenate([s[name] for s in self.small]) for name in blocks.SMALL}
        order = np.lexsort((small["id"], small["shard"], small["test"]))
        X = np.concatenate(self.X)
        self.X.clear()   # the copies below are what is kept
        return blocks.write_dense(tmp, X[order], {n: c[order] for n, c in small.items()})


def _rows_by_partition(source: Source, placement: Placement, parts: set[int]
                       ) -> dict[int, _Rows]:
    """Each wanted partition's rows, read batch by batch: the features checked and turned into a
    float32 matrix as they are read (blocks.dense_features), then only the rows kept copied."""
    found = {p: _Rows() for p in parts}
    wanted = np.array(sorted(parts))
    width = None
    for batch in read_columns(source.files, COLUMNS, blocks.SPLITS):
        ids = np.asarray(batch.column("id").cast(pa.int64()))
        X = blocks.dense_features(batch.column("features"), ids, width)
        width = X.shape[1]
        if source.transform is not None:
            X = source.transform.apply(X, ids)
        shard = shard_of(ids)
        split = batch.column("split")
        small = blocks.row_columns(ids, batch.column("label"), shard, split)
        # rows of other splits are dropped here, not by an Arrow filter that copies the features
        kept = np.isin(split.to_numpy(zero_copy_only=False), source.splits)
        target = np.where(kept, placement.targets(ids, shard), -1)
        for p in wanted[np.isin(wanted, target)]:
            found[int(p)].add(X, small, np.flatnonzero(target == p))
    return found


def fill(_: Iterable[Any], source: Source, placement: Placement, spec: StoreSpec,
         partitions: int, groups: int, app_key: str) -> Iterator[int]:
    """mapPartitions function over `groups` partitions: build, reading the table once, the blocks
    of the partitions p = this task's partition (mod groups) that the store here lacks, and store
    them; yields how many it built."""
    worker.prepare()
    group = blocks.task_partition()
    scratch = blocks.block_dir(blocks.local_root(), app_key, -1 - group)
    shop = spec.resolve(scratch)
    parts = {p for p in range(group, partitions, groups) if not shop.has(source.key, p)}
    built = 0
    if parts:
        for part, rows in _rows_by_partition(source, placement, parts).items():
            with files.replacing_dir(scratch) as tmp:
                if rows.write(tmp):
                    shop.put(tmp, blocks.data_files(tmp), source.key, part)
                    built += 1
                for name in os.listdir(tmp):   # stored (linked) or not: scratch, not a block
                    os.remove(os.path.join(tmp, name))
    yield built


def obtain(_: Iterable[Any], source: Source, placement: Placement, spec: StoreSpec,
           app_key: str, cache_bytes: int) -> Iterator[Row]:
    """mapPartitions function, one task per partition: this partition's block in this
    application's directory, taken from the store or else built here (and stored), sealed with a
    fresh secret (blocks.seal); yields its handle row (blocks.describe), none for a partition
    without rows."""
    worker.prepare()
    part = blocks.task_partition()
    path = blocks.block_dir(blocks.local_root(), app_key, part)
    shop = spec.resolve(path)
    with files.replacing_dir(path) as tmp:   # left empty: no block
        if not shop.take(source.key, part, tmp):
            if not _rows_by_partition(source, placement, {part})[part].write(tmp):
                return
            if spec.persistent:
                shop.put(tmp, blocks.data_files(tmp), source.key, part)
        blocks.seal(tmp, cache_bytes)
    yield Row(**blocks.describe(part, path))
