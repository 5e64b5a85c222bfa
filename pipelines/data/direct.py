"""Blocks straight from a table version's files (udfs/data/direct.py) when the executors can read
them, and the block cache that keeps them for later runs (`data.block_cache`, `data.block_cache_gb`).

The driver decides per load: the table's files must be on a file system the executors see as
local paths (a `file:` or plain-path lake), readable as plain Parquet (Delta reader protocol 1: no
deletion vectors, no column mapping; every file holding the columns we read, the features a dense
array), and a task's share of
the table must fit in one Python worker's memory budget (each task holds the rows of its
partitions before sorting them). Otherwise the blocks are built through Spark's shuffle and sort
(pipelines/data/blocks.py), as before, and not cached.

A block's key in the store is a pure function of what its content depends on: the Delta table's
id and the pinned version, the version's data files (their names: a copied table written to since
has other files), the splits, the placement (`shard mod partitions` and the count, or a digest of
the clients' assignment), the block format (float32 features) and the feature transform the
blocks hold (udfs/data/transform.py: a standardized block is another block). Nothing of
the run (seed of the validation split, dtype of training, run id) is in it: the same blocks serve
every run that reads that version with that partitioning.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from functools import partial
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import RDD
from pyspark.sql import DataFrame, SparkSession

from pipelines.core.config import DataSection, default
from udfs.data import direct
from udfs.data.transform import NONE, Transform

FORMAT = {"blocks": 2, "features": "float32"}   # bump when block files change
GIB = 2 ** 30


@dataclass(frozen=True)
class BlockCache:
    """data.block_cache (None: the default under the executor user's cache dir) and
    data.block_cache_gb (the cap per executor host; 0: no cache)."""

    root: str | None = default("data.block_cache")
    cap_gb: float = default("data.block_cache_gb")

    @classmethod
    def of(cls, data: DataSection) -> BlockCache:
        return cls(data.block_cache, data.block_cache_gb)

    def spec(self) -> direct.StoreSpec:
        if self.cap_gb <= 0:
            return direct.StoreSpec(persistent=False)
        return direct.StoreSpec(True, self.root, int(self.cap_gb * GIB))


OFF = BlockCache(None, 0.0)


@dataclass(frozen=True)
class Snapshot:
    """What the driver knows of a table version that executors may read directly."""

    table_id: str
    version: int
    files: tuple[str, ...]      # local paths of its Parquet files
    table_path: str             # local path of the table
    nbytes: int                 # uncompressed, from the files' footers


def _local(uri: str) -> str | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return os.path.abspath(unquote(parsed.path))
    return None


def snapshot(spark: SparkSession, df: DataFrame, table_path: str, version: int,
             columns: tuple[str, ...]) -> Snapshot | None:
    """The version's files if the executors can read them as plain Parquet with `columns`, else
    None (see the module docstring)."""
    root = _local(table_path)
    if root is None:
        return None
    from delta.tables import DeltaTable

    detail = DeltaTable.forPath(spark, table_path).detail().select("id", "minReaderVersion").first()
    assert detail is not None  # detail() is one row per table
    if int(detail[1]) > 1:   # the protocol only grows: no version of the table uses its features
        return None
    paths = [_local(f) for f in df.inputFiles()]
    if any(p is None for p in paths):
        return None
    files = tuple(sorted(p for p in paths if p is not None))
    nbytes = 0
    for path in files:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
        if not set(columns) <= set(schema.names):
            return None   # schema evolution or a partition column: Spark knows how to read it
        if not pa.types.is_list(schema.field("features").type):
            return None   # sparse features: built through Spark (CSR parts, rarely this small)
        nbytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return Snapshot(str(detail[0]), version, files, root, nbytes)


def fits(snap: Snapshot, partitions: int, slots: int, worker_bytes: int) -> bool:
    """Whether one task's share of the table fits in a Python worker's memory budget."""
    return snap.nbytes / max(min(partitions, slots), 1) <= worker_bytes


def block_key(snap: Snapshot, splits: tuple[str, ...], placement: dict,
              transform: Transform = NONE) -> str:
    described = {"table_id": snap.table_id, "version": snap.version,
                 "files": [os.path.relpath(f, snap.table_path) for f in snap.files],
                 "splits": sorted(splits), "placement": placement,
                 "format": {**FORMAT, "transform": transform.digest()}}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def build(spark: SparkSession, source: direct.Source, placement: direct.Placement,
          partitions: int, name: str, cache: BlockCache, worker_bytes: int) -> RDD:
    """One block per partition from the table's files (udfs/data/direct.py): the handles, to cache
    and collect. More partitions than task slots: a `fill` job first builds what the store lacks,
    one task per slot, each reading the table once."""
    sc = spark.sparkContext
    spec = cache.spec()
    app_key = f"{name}-{uuid.uuid4().hex[:12]}"
    slots = max(sc.defaultParallelism, 1)
    if partitions > slots:
        sc.parallelize(range(slots), slots).mapPartitions(partial(
            direct.fill, source=source, placement=placement, spec=spec,
            partitions=partitions, groups=slots, app_key=app_key)).sum()
    return sc.parallelize(range(partitions), partitions).mapPartitions(partial(
        direct.obtain, source=source, placement=placement, spec=spec, app_key=app_key,
        cache_bytes=worker_bytes))
