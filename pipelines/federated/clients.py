"""Federated clients on the driver side: one cached block per client (partition i = client i),
from a column (`federated.partitioner: column`, one client per distinct value of
`federated.client_column`) or a partitioner over the train split (iid, dirichlet, shards, quantity;
pipelines/federated/partitioners.py)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark import RDD
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from pipelines.core.config import Config, FederatedSection
from pipelines.core.errors import UserError
from pipelines.data import direct, lake
from pipelines.data.blocks import (
    Blocks,
    BlockSet,
    build,
    collect_handles,
    direct_snapshot,
    load_blocks,
    read_rows,
    shape,
    worker_cache_bytes,
)
from pipelines.data.direct import BlockCache
from pipelines.federated import partitioners
from udfs.core.seeding import Stream, rng
from udfs.data import direct as direct_udfs
from udfs.data.transform import NONE, Transform


@dataclass
class Clients(BlockSet):
    """One cached block per client (partition i = client i) and what the driver knows of them."""

    table: str
    version: int
    names: list[str]
    sizes: np.ndarray          # training-table rows per client (before the local hold-out)
    labels: np.ndarray         # distinct labels per client
    n_features: int
    n_classes: int

    @property
    def count(self) -> int:
        return len(self.names)


def _column_clients(rows: DataFrame, column: str, table: str) -> tuple[DataFrame, list[str]]:
    nulls = rows.filter(F.col(column).isNull()).count()
    if nulls:
        raise UserError(f"table {table}: column {column!r} (federated.client_column) has {nulls} "
                        "null value(s); every training row needs a client id")
    names = sorted(r[0] for r in rows.select(F.col(column).cast("string")).distinct().collect())
    index = rows.sparkSession.createDataFrame(
        pa.table({"_name": pa.array(names), "client": pa.array(np.arange(len(names), dtype=np.int32))}))
    joined = rows.join(F.broadcast(index), F.col(column).cast("string") == F.col("_name"))
    return joined.drop("_name", column), names


def _assignment(ids: np.ndarray, labels: np.ndarray, fed: FederatedSection, seed: int,
                table: str) -> np.ndarray:
    """The client of each training row, the rows in id order (ids sorted)."""
    try:
        return partitioners.assign(fed.partitioner, labels, fed.clients, rng(seed, Stream.PARTITION),
                                   fed.alpha, fed.shards_per_client)
    except ValueError as exc:
        raise UserError(f"federated.partitioner={fed.partitioner} on table {table}: {exc}") from None


def _partitioned_clients(rows: DataFrame, fed: FederatedSection, seed: int,
                         table: str) -> tuple[DataFrame, list[str]]:
    """Assign clients on the driver from (id, label), in id order, then join the assignment."""
    keys = rows.select("id", "label").orderBy("id").toArrow()
    ids = keys.column("id").to_numpy()
    client = _assignment(ids, keys.column("label").to_numpy(), fed, seed, table)
    assignment = rows.sparkSession.createDataFrame(
        pa.table({"id": pa.array(ids), "client": pa.array(client.astype(np.int32))}))
    return rows.join(F.broadcast(assignment), "id"), client_names(fed)


def client_names(fed: FederatedSection) -> list[str]:
    return [f"client-{i:05d}" for i in range(fed.clients)]


def prepare_clients(spark: SparkSession, config: Config, transform: Transform = NONE
                    ) -> tuple[Clients, Blocks | None]:
    """Client blocks from the table's train split, and blocks of its test split for global
    evaluation (None when the table has no test rows), both with `transform` applied."""
    clients = train_clients(spark, config, transform)
    pinned = lake.TableRef(clients.table, clients.version)
    has_test = read_rows(spark, config.lake.path, pinned, ("test",))[0].limit(1).count() > 0
    test = load_blocks(spark, config.lake.path, pinned, config.data.partitions, config.trainer.seed,
                       0.0, ("test",), config.data.worker_cache_gb,
                       BlockCache.of(config.data), transform) if has_test else None
    return clients, test


def train_clients(spark: SparkSession, config: Config, transform: Transform = NONE) -> Clients:
    """One block per client of the table's train split. Partitioned clients of a table the
    executors can read directly are built from its files and kept in the block cache
    (pipelines/data/direct.py); clients by column, and other tables, through Spark's shuffle."""
    fed = config.federated
    ref = lake.TableRef(config.data.table, config.data.version)
    extra = (fed.client_column,) if fed.partitioner == partitioners.COLUMN else ()
    rows, version = read_rows(spark, config.lake.path, ref, ("train",), extra)
    worker_bytes = worker_cache_bytes(spark.sparkContext, config.data.worker_cache_gb)
    snap = None if extra else direct_snapshot(spark, rows, config.lake.path, ref.name, version,
                                              fed.clients, (), worker_bytes)
    if snap is None:
        return clients_from_rows(spark, config, rows, ref.name, version, transform)
    return _direct_clients(spark, config, snap, ref.name, worker_bytes, transform)


def _direct_clients(spark: SparkSession, config: Config, snap: direct.Snapshot, table: str,
                    worker_bytes: int, transform: Transform) -> Clients:
    """Clients straight from the table's files: the assignment made on the driver from the train
    rows' (id, label), read through Arrow, and shipped by broadcast; the blocks' key holds a digest
    of it, so another partitioner, seed or client count makes other blocks."""
    fed = config.federated
    name = f"{table}@{snap.version}"
    keys = pa.Table.from_batches(list(direct_udfs.read_columns(snap.files, ("id", "label"),
                                                               ("train",))))
    ids = keys.column("id").to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    client = _assignment(ids, keys.column("label").to_numpy()[order], fed, config.trainer.seed,
                         name).astype(np.int64)
    assignment = np.stack([ids, client])
    placement = {"rule": "client assignment",
                 "digest": hashlib.sha256(assignment.tobytes()).hexdigest()}
    source = direct_udfs.Source(snap.files, ("train",), direct.block_key(snap, ("train",), placement, transform),
                                transform)
    # kept while the blocks are: a rebuild (data.Blocks.run) places the rows again
    bc = spark.sparkContext.broadcast(assignment)
    handles, described = collect_handles(name, lambda: direct.build(
        spark, source, direct_udfs.ByAssignment(bc), fed.clients, name,
        BlockCache.of(config.data), worker_bytes))
    return describe_clients(handles, described, client_names(fed), table, snap.version, fed)


def clients_from_rows(spark: SparkSession, config: Config, rows: DataFrame, table: str,
                      version: int, transform: Transform = NONE) -> Clients:
    """One block per client from training rows (data.training_rows, plus the client column when
    federated.partitioner is column), through Spark's shuffle."""
    fed = config.federated
    name = f"{table}@{version}"
    if fed.partitioner == partitioners.COLUMN:
        assigned, names = _column_clients(rows, fed.client_column, name)
    else:
        assigned, names = _partitioned_clients(rows, fed, config.trainer.seed, name)
    handles, described = build(spark, assigned, len(names), F.col("client"), name,
                               config.data.worker_cache_gb, transform)
    return describe_clients(handles, described, names, table, version, fed)


def describe_clients(handles: RDD, described: list[Row], names: list[str], table: str,
                     version: int, fed: FederatedSection) -> Clients:
    """The clients of built blocks (partition i = client i), every client holding rows."""
    name = f"{table}@{version}"
    if len(names) < fed.min_clients:
        raise UserError(f"table {name} has {len(names)} client(s), fewer than "
                        f"federated.min_clients={fed.min_clients}")
    by_part = {int(h.part): h for h in described}
    missing = [names[i] for i in range(len(names)) if i not in by_part]
    if missing:
        raise UserError(f"table {name}: client(s) {missing[:5]} have no training rows")
    n_features, n_classes = shape(described, name)
    sizes = np.array([by_part[i].rows for i in range(len(names))])
    labels = np.array([by_part[i].distinct_labels for i in range(len(names))])
    return Clients(handles, table, version, names, sizes, labels, n_features, n_classes)


def partition_report(c: Clients) -> str:
    """One line: how many clients, and rows and labels per client (min/median/max)."""
    def stats(a: np.ndarray) -> str:
        return f"{a.min()}/{int(np.median(a))}/{a.max()}"
    return (f"clients {c.count}  rows per client (min/median/max) {stats(c.sizes)}  "
            f"labels per client {stats(c.labels)}")
