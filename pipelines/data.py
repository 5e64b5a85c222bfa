"""From a Delta table at a pinned version to one cached numpy block per partition.

The table is read once: Spark assigns each row a shard (a hash of its id), puts whole shards into
`data.partitions` partitions, and hands each partition's rows to `udfs.blocks.build_partition` as
Arrow batches. What stays cached in Spark is one small handle row per partition; see udfs/blocks.py
for why and for how rows get their global order and roles.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import partial

import numpy as np
from pyspark import RDD
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines import lake
from pipelines.errors import UserError
from udfs import blocks

LABEL_TYPES = (T.IntegerType, T.LongType, T.ShortType, T.ByteType, T.FloatType, T.DoubleType)


@dataclass
class Blocks:
    """The cached block handles of one table version and what the driver knows about them."""

    handles: RDD
    layout: blocks.Layout
    table: str
    version: int
    partitions: int
    n_features: int
    n_classes: int          # 1 + the largest label (classification); 0 when labels are real numbers
    test_rows: int

    @property
    def train_rows(self) -> int:
        return self.layout.n_train

    @property
    def validation_rows(self) -> int:
        return self.layout.n_validation

    def release(self) -> None:
        """Delete the block files on the executors and drop the cached handles."""
        self.handles.mapPartitions(blocks.remove_partition).count()
        self.handles.unpersist()


def check_schema(df: DataFrame, table: str) -> None:
    """The training-table contract of CONTRACT.md, with errors that name the column."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    rules = {
        "id": lambda t: isinstance(t, (T.LongType, T.IntegerType)),
        "features": lambda t: isinstance(t, T.ArrayType) and isinstance(
            t.elementType, (T.FloatType, T.DoubleType)),
        "label": lambda t: isinstance(t, LABEL_TYPES),
        "split": lambda t: isinstance(t, T.StringType),
    }
    expected = {"id": "long", "features": "array<float>", "label": "int or double",
                "split": "string ('train' | 'test')"}
    for column, ok in rules.items():
        if column not in fields:
            raise UserError(f"table {table!r} has no column {column!r} (expected {expected[column]}); "
                            f"its columns are {list(fields)}")
        if not ok(fields[column]):
            raise UserError(f"table {table!r}: column {column!r} is {fields[column].simpleString()}, "
                            f"expected {expected[column]}")


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


def place(spark: SparkSession, rows: DataFrame, partitions: int) -> DataFrame:
    """Rows of shard s go to partition s mod P: whole shards per partition, sizes balanced to a
    fraction of a shard (shards are a hash of the id, so about equally full)."""
    keys = F.array(*[F.lit(k) for k in partition_keys(spark, partitions)])
    target = F.element_at(keys, F.pmod(F.col("shard"), F.lit(partitions)) + 1)
    return rows.withColumn("_part", target).repartition(partitions, "_part").drop("_part")


def load_blocks(spark: SparkSession, lake_path: str, ref: lake.TableRef, partitions: int,
                seed: int, validation_fraction: float) -> Blocks:
    """Read the table version once and build, cache and describe its blocks."""
    df, version = lake.read(spark, lake_path, ref)
    check_schema(df, ref.name)
    rows = df.select(
        F.col("id").cast("long").alias("id"),
        F.col("features").cast("array<float>").alias("features"),
        F.col("label"),
        F.col("split"),
        F.pmod(F.xxhash64("id"), F.lit(blocks.N_SHARDS)).cast("int").alias("shard"),
    ).filter(F.col("split").isin("train", "test"))
    key = f"{ref.name}-v{version}-{uuid.uuid4().hex[:12]}"
    handles = (place(spark, rows, partitions)
               .mapInArrow(partial(blocks.build_partition, key=key), blocks.HANDLE_SCHEMA)
               .rdd.cache())
    try:
        described = handles.collect()
    except Exception as exc:  # noqa: BLE001 - surface a bad row as a user error
        if "BlockError" in str(exc):
            reason = str(exc).split("BlockError: ")[-1].splitlines()[0]
            raise UserError(f"table {ref.name}@{version}: {reason}") from None
        raise
    counts = sum((np.frombuffer(h.shard_counts, dtype=np.int64) for h in described),
                 np.zeros(blocks.N_SHARDS, dtype=np.int64))
    offsets = tuple(int(x) for x in np.concatenate(([0], np.cumsum(counts))))
    layout = blocks.Layout(offsets, seed, validation_fraction)
    if layout.n_train < 1:
        raise UserError(f"table {ref.name}@{version} has no training rows (split = 'train') left "
                        f"after holding out validation_fraction={validation_fraction}")
    widths = {h.width for h in described if h.rows}
    if len(widths) != 1:
        raise UserError(f"table {ref.name}@{version}: features arrays have lengths {sorted(widths)} "
                        "in different partitions; every row needs the same number")
    float_labels = any(h.float_label for h in described)
    n_classes = 0 if float_labels else int(max(h.label_max for h in described if h.rows)) + 1
    return Blocks(handles, layout, ref.name, version, partitions, widths.pop(), n_classes,
                  sum(int(h.test_rows) for h in described))
