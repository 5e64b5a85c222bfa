"""Federated clients on the driver side: one cached block per client (partition i = client i),
from a column (`federated.partitioner: column`, one client per distinct value of
`federated.client_column`) or a partitioner over the train split (iid, dirichlet, shards, quantity;
pipelines/federated/partitioners.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.config import Config, FederatedSection
from pipelines.core.errors import UserError
from pipelines.data import lake
from pipelines.data.blocks import Blocks, BlockSet, build, load_blocks, read_rows, shape
from pipelines.federated import partitioners
from udfs.core.seeding import Stream, rng


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


def _partitioned_clients(rows: DataFrame, fed: FederatedSection, seed: int,
                         table: str) -> tuple[DataFrame, list[str]]:
    """Assign clients on the driver from (id, label), in id order, then join the assignment."""
    keys = rows.select("id", "label").orderBy("id").toArrow()
    ids = keys.column("id").to_numpy()
    labels = keys.column("label").to_numpy()
    try:
        client = partitioners.assign(fed.partitioner, labels, fed.clients, rng(seed, Stream.PARTITION),
                                     fed.alpha, fed.shards_per_client)
    except ValueError as exc:
        raise UserError(f"federated.partitioner={fed.partitioner} on table {table}: {exc}") from None
    assignment = rows.sparkSession.createDataFrame(
        pa.table({"id": pa.array(ids), "client": pa.array(client.astype(np.int32))}))
    names = [f"client-{i:05d}" for i in range(fed.clients)]
    return rows.join(F.broadcast(assignment), "id"), names


def prepare_clients(spark: SparkSession, config: Config) -> tuple[Clients, Blocks | None]:
    """Client blocks from the table's train split, and blocks of its test split for global
    evaluation (None when the table has no test rows)."""
    fed = config.federated
    ref = lake.TableRef(config.data.table, config.data.version)
    extra = (fed.client_column,) if fed.partitioner == partitioners.COLUMN else ()
    rows, version = read_rows(spark, config.lake.path, ref, ("train",), extra)
    clients = clients_from_rows(spark, config, rows, ref.name, version)
    pinned = lake.TableRef(ref.name, version)
    has_test = read_rows(spark, config.lake.path, pinned, ("test",))[0].limit(1).count() > 0
    test = load_blocks(spark, config.lake.path, pinned, config.data.partitions, config.trainer.seed,
                       0.0, ("test",), config.data.worker_cache_gb) if has_test else None
    return clients, test


def clients_from_rows(spark: SparkSession, config: Config, rows: DataFrame, table: str,
                      version: int) -> Clients:
    """One block per client from training rows (data.training_rows, plus the client column when
    federated.partitioner is column)."""
    fed = config.federated
    name = f"{table}@{version}"
    if fed.partitioner == partitioners.COLUMN:
        assigned, names = _column_clients(rows, fed.client_column, name)
    else:
        assigned, names = _partitioned_clients(rows, fed, config.trainer.seed, name)
    if len(names) < fed.min_clients:
        raise UserError(f"table {name} has {len(names)} client(s), fewer than "
                        f"federated.min_clients={fed.min_clients}")
    handles, described = build(spark, assigned, len(names), F.col("client"), name,
                               config.data.worker_cache_gb)
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
