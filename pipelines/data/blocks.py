"""From a Delta table at a pinned version to one cached numpy block per partition.

The table is read once: Spark assigns each row a shard (a hash of its id), puts whole shards into
`data.partitions` partitions, and hands each partition's rows to `udfs.blocks.build_partition` as
Arrow batches. What stays cached in Spark is one small handle row per partition; see udfs/data/blocks.py
for why and for how rows get their global order and roles.
"""
from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
from pyspark import RDD, SparkContext
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core import py4j
from pipelines.core.config import default
from pipelines.core.errors import UserError
from pipelines.data import direct, lake
from pipelines.data.direct import OFF, BlockCache
from udfs.data import blocks
from udfs.data import direct as direct_udfs
from udfs.data.transform import NONE, Transform

R = TypeVar("R")
MAX_REBUILDS = 3
DEFAULT_CACHE_GB = default("data.worker_cache_gb")   # callers without a config (tests, benchmarks)
SPARSE_FEATURES = "struct<size:int,indices:array<int>,values:array<float>>"
LABEL_TYPES = (T.IntegerType, T.LongType, T.ShortType, T.ByteType, T.FloatType, T.DoubleType)


@dataclass
class BlockSet:
    """Cached block handles, one per partition, that jobs run over."""

    handles: RDD
    rebuilds: int = field(default=0, kw_only=True)   # times a job found a block missing
    reruns: int = field(default=0, kw_only=True)     # times a job was run again after a lost task

    def release(self) -> None:
        release(self.handles)

    def run(self, job: Callable[[RDD], R], reruns: int = 0) -> R:
        """`job(handles)`, called again when running it again cures what failed it:

        * a task found its block missing (it ran on an executor that does not hold it, or the
          files were removed): the blocks are rebuilt first, from the cached handles' lineage (the
          shuffled, sorted rows; Spark keeps the shuffle files, or re-reads the Delta version), on
          whichever executors Spark picks, and later tasks run where the new handles are cached.
          A block is the same wherever it is built, so results do not change; up to MAX_REBUILDS
          times, counted in `rebuilds`.
        * a task was lost (its worker or executor died), for jobs that ask for up to `reruns` more
          attempts: a barrier stage, which Spark does not run again in local mode and which fails
          as a whole. `job` is called afresh each time (a new stage secret). Counted in `reruns`."""
        rebuilt = rerun = 0
        while True:
            try:
                return job(self.handles)
            except Exception as exc:  # noqa: BLE001 - py4j wraps what the tasks raised
                if py4j.raised(exc, blocks.BlockMissing.__name__) and rebuilt < MAX_REBUILDS:
                    rebuilt += 1
                    self.rebuilds += 1
                    self.handles.unpersist(blocking=True)
                    self.handles.cache().count()
                elif rerun < reruns and _task_lost(exc):
                    rerun += 1
                    self.reruns += 1
                    error = py4j.task_error(exc)
                    print(f"[fedspark] a task was lost ({error.message if error else type(exc).__name__}); "
                          f"running its job again ({rerun} of at most {reruns} times)", file=sys.stderr)
                else:
                    raise


def _task_lost(exc: BaseException) -> bool:
    """Whether a job failed in its tasks (Spark aborted it), not for a bad row or on the driver."""
    return ("org.apache.spark.SparkException" in py4j.java_classes(exc)
            and py4j.task_message(exc, blocks.BlockError.__name__) is None)


@dataclass
class Blocks(BlockSet):
    """The cached block handles of one table version and what the driver knows about them."""

    layout: blocks.Layout
    table: str
    version: int
    partitions: int
    n_features: int
    n_classes: int          # 1 + the largest label (classification); 0 when labels are real numbers
    test_rows: int
    feature_bytes: int = 0  # of all blocks, as stored on the executors' disks

    @property
    def train_rows(self) -> int:
        return self.layout.n_train

    @property
    def validation_rows(self) -> int:
        return self.layout.n_validation


def release(handles: RDD) -> None:
    """Delete the blocks' files on the executors and drop the cached handles."""
    handles.mapPartitions(blocks.remove_partition).count()
    handles.unpersist()


def check_schema(df: DataFrame, table: str) -> None:
    """The training-table contract of CONTRACT.md, with errors that name the column."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    rules = {
        "id": lambda t: isinstance(t, (T.LongType, T.IntegerType)),
        "features": lambda t: _dense_features(t) or _sparse_features(t),
        "label": lambda t: isinstance(t, LABEL_TYPES),
        "split": lambda t: isinstance(t, T.StringType),
    }
    expected = {"id": "long", "features": f"array<float> or sparse {SPARSE_FEATURES}",
                "label": "int or double",
                "split": "string ('train' | 'test')"}
    for column, ok in rules.items():
        if column not in fields:
            raise UserError(f"table {table!r} has no column {column!r} (expected {expected[column]}); "
                            f"its columns are {list(fields)}")
        if not ok(fields[column]):
            raise UserError(f"table {table!r}: column {column!r} is {fields[column].simpleString()}, "
                            f"expected {expected[column]}")


def _dense_features(t: T.DataType) -> bool:
    return isinstance(t, T.ArrayType) and isinstance(t.elementType, (T.FloatType, T.DoubleType))


def _sparse_features(t: T.DataType) -> bool:
    """struct<size, indices, values>, the fields of Spark's SparseVector, with numeric types."""
    if not isinstance(t, T.StructType) or set(t.names) != {"size", "indices", "values"}:
        return False
    kinds = {f.name: f.dataType for f in t.fields}
    return (isinstance(kinds["size"], (T.IntegerType, T.LongType))
            and isinstance(kinds["indices"], T.ArrayType)
            and isinstance(kinds["indices"].elementType, (T.IntegerType, T.LongType))
            and _dense_features(kinds["values"]))


def partition_keys(spark: SparkSession, partitions: int) -> list[int]:
    """For each partition i, an integer that Spark's hash partitioning sends to partition i.

    `repartition(n, col)` places a row by pmod(hash(col), n) (Murmur3, as SQL's hash()), so
    repartitioning on these keys puts every row exactly where we chose, with no sampling pass."""
    found: dict[int, int] = {}
    for row in spark.range(0, 64 * partitions + 1024).selectExpr(
            "cast(id as int) as k", f"pmod(hash(cast(id as int)), {partitions}) as p").collect():
        found.setdefault(row.p, row.k)
        if len(found) == partitions:
            return [found[i] for i in range(partitions)]
    raise RuntimeError(f"no hash keys found for {partitions} partitions")


def place(spark: SparkSession, rows: DataFrame, partitions: int, target: Column) -> DataFrame:
    """Rows go to partition `target` (an int column in [0, partitions)), exactly."""
    keys = F.array(*[F.lit(k) for k in partition_keys(spark, partitions)])
    return (rows.withColumn("_part", F.element_at(keys, target + 1))
            .repartition(partitions, "_part").drop("_part"))


def training_rows(df: DataFrame, name: str, extra: tuple[str, ...] = ()) -> DataFrame:
    """A training table's rows as (id, features, label, split, shard, *extra). `shard` fixes the
    global row order; see udfs/data/blocks.py."""
    check_schema(df, name)
    for column in extra:
        if column not in df.columns:
            raise UserError(f"table {name!r} has no column {column!r}; its columns are "
                            f"{df.columns}")
    sparse = _sparse_features(df.schema["features"].dataType)
    return df.select(
        F.col("id").cast("long").alias("id"),
        F.col("features").cast(SPARSE_FEATURES if sparse else "array<float>").alias("features"),
        F.col("label"),
        F.col("split"),
        F.pmod(F.xxhash64("id"), F.lit(blocks.N_SHARDS)).cast("int").alias("shard"),
        *[F.col(c) for c in extra],
    )


def read_rows(spark: SparkSession, lake_path: str, ref: lake.TableRef,
              splits: tuple[str, ...] = ("train", "test"), extra: tuple[str, ...] = ()
              ) -> tuple[DataFrame, int]:
    """The table's rows of the given splits (training_rows), and the version read."""
    df, version = lake.read(spark, lake_path, ref)
    return training_rows(df, ref.name, extra).filter(F.col("split").isin(*splits)), version


def worker_cache_bytes(sc: SparkContext, total_gb: float) -> int:
    """One Python worker's share of data.worker_cache_gb: the budget is for all the Python workers
    of an executor, which runs as many at once as it has cores (spark.executor.cores; in local mode
    and when unset, the application's cores, which can only make the share smaller)."""
    cores = int(sc.getConf().get("spark.executor.cores", str(sc.defaultParallelism)))
    return int(total_gb * 2 ** 30 / max(cores, 1))


def build(spark: SparkSession, rows: DataFrame, partitions: int, target: Column,
          name: str, cache_gb: float = DEFAULT_CACHE_GB, transform: Transform = NONE
          ) -> tuple[RDD, list[Row]]:
    """Build one block per partition on the executors through Spark's shuffle, features as
    `transform` makes them; the cached handles and their rows.

    Spark sorts each partition by (split, shard, id) before the rows reach Python (an external
    sort that spills to disk), so a block streams to the executor's disk batch by batch and no
    task ever holds a whole partition in memory."""
    key = f"{name}-{uuid.uuid4().hex[:12]}"
    build_fn = partial(blocks.build_partition, key=key,
                       cache_bytes=worker_cache_bytes(spark.sparkContext, cache_gb), transform=transform)
    return collect_handles(name, lambda: (
        place(spark, rows, partitions, target)
        .sortWithinPartitions(F.col("split") == "test", "shard", "id")
        .mapInArrow(build_fn, blocks.HANDLE_SCHEMA).rdd))


def collect_handles(name: str, handles: Callable[[], RDD]) -> tuple[RDD, list[Row]]:
    """The handles `handles()` makes (running any job it needs), cached, and their rows; a bad row
    of table `name` becomes a user error that names it."""
    try:
        made = handles().cache()
        return made, made.collect()
    except Exception as exc:  # noqa: BLE001 - surface a bad row as a user error
        reason = py4j.task_message(exc, blocks.BlockError.__name__)
        if reason is not None:
            raise UserError(f"table {name}: {reason}") from None
        raise


def direct_snapshot(spark: SparkSession, rows: DataFrame, lake_path: str, table: str, version: int,
                    partitions: int, extra: tuple[str, ...], worker_bytes: int
                    ) -> direct.Snapshot | None:
    """The files of the version `rows` read when the executors can build its blocks from them
    (direct.snapshot) and a task's share fits in a worker's memory; else None."""
    snap = direct.snapshot(spark, rows, lake.table_path(lake_path, table), version,
                           (*direct_udfs.COLUMNS, *extra))
    slots = spark.sparkContext.defaultParallelism
    return snap if snap is not None and direct.fits(snap, partitions, slots, worker_bytes) else None


def shape(described: list[Row], name: str) -> tuple[int, int]:
    """(features per row, classes) from the handles: classes = 1 + the largest label, 0 when the
    labels are real numbers."""
    widths = {h.width for h in described if h.rows}
    if len(widths) != 1:
        raise UserError(f"table {name}: features arrays have lengths {sorted(widths)} "
                        "in different partitions; every row needs the same number")
    if any(h.float_label for h in described):
        return widths.pop(), 0
    return widths.pop(), int(max(h.label_max for h in described if h.rows)) + 1


def load_blocks(spark: SparkSession, lake_path: str, ref: lake.TableRef, partitions: int,
                seed: int, validation_fraction: float,
                splits: tuple[str, ...] = ("train", "test"),
                cache_gb: float = DEFAULT_CACHE_GB, block_cache: BlockCache = OFF,
                transform: Transform = NONE) -> Blocks:
    """Read the table version once and build (or take from the block cache), cache and describe
    its blocks, features as `transform` makes them: straight from its files when the executors can
    read them (pipelines/data/direct.py), else through Spark's shuffle."""
    rows, version = read_rows(spark, lake_path, ref, splits)
    worker_bytes = worker_cache_bytes(spark.sparkContext, cache_gb)
    snap = direct_snapshot(spark, rows, lake_path, ref.name, version, partitions, (), worker_bytes)
    if snap is None:
        return blocks_from_rows(spark, rows, ref.name, version, partitions, seed,
                                validation_fraction, splits, cache_gb, transform)
    name = f"{ref.name}@{version}"
    placement = {"rule": "shard mod partitions", "partitions": partitions,
                 "shards": blocks.N_SHARDS}
    source = direct_udfs.Source(snap.files, splits, direct.block_key(snap, splits, placement, transform),
                                transform)
    handles, described = collect_handles(name, lambda: direct.build(
        spark, source, direct_udfs.ByShard(partitions), partitions, name, block_cache,
        worker_bytes))
    return describe_blocks(handles, described, ref.name, version, partitions, seed,
                           validation_fraction, splits)


def blocks_from_rows(spark: SparkSession, rows: DataFrame, table: str, version: int, partitions: int,
                     seed: int, validation_fraction: float,
                     splits: tuple[str, ...] = ("train", "test"),
                     cache_gb: float = DEFAULT_CACHE_GB, transform: Transform = NONE) -> Blocks:
    """Build, cache and describe the blocks of training_rows: rows of shard s in partition s mod P,
    so every shard lives in one partition."""
    name = f"{table}@{version}"
    handles, described = build(spark, rows, partitions, F.pmod(F.col("shard"), F.lit(partitions)),
                               name, cache_gb, transform)
    return describe_blocks(handles, described, table, version, partitions, seed,
                           validation_fraction, splits)


def describe_blocks(handles: RDD, described: list[Row], table: str, version: int, partitions: int,
                    seed: int, validation_fraction: float, splits: tuple[str, ...]) -> Blocks:
    """What the driver knows of built blocks, from their handle rows (one per non-empty
    partition): the global row layout, the shape, the row counts."""
    name = f"{table}@{version}"
    if not described:
        raise UserError(f"table {name} has no rows in split(s) {', '.join(splits)}")
    counts = sum((np.frombuffer(h.shard_counts, dtype=np.int64) for h in described),
                 np.zeros(blocks.N_SHARDS, dtype=np.int64))
    offsets = tuple(int(x) for x in np.concatenate(([0], np.cumsum(counts))))
    layout = blocks.Layout(offsets, seed, validation_fraction)
    if "train" in splits and layout.n_train < 1:
        raise UserError(f"table {name} has no training rows (split = 'train') left "
                        f"after holding out validation_fraction={validation_fraction}")
    n_features, n_classes = shape(described, name)
    return Blocks(handles, layout, table, version, partitions, n_features, n_classes,
                  sum(int(h.test_rows) for h in described),
                  sum(int(h.feature_bytes) for h in described))
