"""Delta tables under `lake.path`: naming, time travel (`NAME@VERSION`) and version lookup."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from pipelines.core.errors import UserError
from udfs.core import worker

# Arrow data made on the driver travels to the executors in broadcasts of about this size: inside
# the tasks (what createDataFrame does) it would make tasks of many MB, over Spark's recommended
# 1,000 KiB, and every task of the stage would carry its share through the scheduler.
ARROW_CHUNK_BYTES = 16 << 20

_REF = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<version>\d+))?$")


@dataclass(frozen=True)
class TableRef:
    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> TableRef:
        m = _REF.match(text)
        if not m:
            raise UserError(f"table {text!r}: expected NAME or NAME@VERSION, NAME made of letters, "
                            "digits and underscores")
        version = m.group("version")
        return cls(m.group("name"), int(version) if version is not None else None)


def table_path(lake_path: str, name: str) -> str:
    return f"{lake_path.rstrip('/')}/{name}"


def _commit_versions(spark: SparkSession, path: str) -> list[int]:
    """Versions with a commit file in the table's _delta_log (any Hadoop URI), without a Spark job."""
    jvm = spark.sparkContext._jvm
    if jvm is None:
        raise RuntimeError("the SparkContext has no JVM gateway (it was stopped); cannot list "
                           f"{path}/_delta_log")
    log = jvm.org.apache.hadoop.fs.Path(f"{path.rstrip('/')}/_delta_log")
    fs = log.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if not fs.exists(log):
        return []
    names = [status.getPath().getName() for status in fs.listStatus(log)]
    return [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]


def exists(spark: SparkSession, path: str) -> bool:
    return bool(_commit_versions(spark, path))


def latest_version(spark: SparkSession, path: str) -> int:
    versions = _commit_versions(spark, path)
    if not versions:
        raise UserError(f"no Delta table at {path}")
    return max(versions)


def read(spark: SparkSession, lake_path: str, ref: TableRef) -> tuple[DataFrame, int]:
    """The table at the pinned version (latest when none is given) and that version number."""
    path = table_path(lake_path, ref.name)
    if not exists(spark, path):
        raise UserError(f"table {ref.name!r} not found: no Delta table at {path} "
                        "(ingest it first: spark-submit pipelines/ingest.py --table ...)")
    latest = latest_version(spark, path)
    version = latest if ref.version is None else ref.version
    if version > latest:
        raise UserError(f"table {ref.name!r} has no version {version}; latest is {latest}")
    try:
        df = spark.read.format("delta").option("versionAsOf", version).load(path)
    except Exception as exc:  # noqa: BLE001 - a vacuumed version surfaces here
        raise UserError(f"table {ref.name}@{version} cannot be read (vacuumed?): {exc}") from exc
    return df, version


@dataclass(frozen=True)
class Pinned:
    """The table version a run reads, and the Delta table's id: a resume reads exactly this
    version, and only of this table (one deleted and ingested again has a new id)."""

    name: str
    version: int
    table_id: str


def table_id(spark: SparkSession, path: str) -> str:
    from delta.tables import DeltaTable

    row = DeltaTable.forPath(spark, path).detail().select("id").first()
    assert row is not None  # detail() is one row per table
    return str(row[0])


def pin(spark: SparkSession, lake_path: str, ref: TableRef) -> Pinned:
    """The version `ref` names (the latest when it names none) and the table's id."""
    _, version = read(spark, lake_path, ref)
    return Pinned(ref.name, version, table_id(spark, table_path(lake_path, ref.name)))


def check_pinned(spark: SparkSession, lake_path: str, pinned: Pinned) -> None:
    """Raise, naming what changed, unless the pinned version of the same table is still there
    whole: a resume on other data would mix two versions in one model."""
    path = table_path(lake_path, pinned.name)
    where = f"table {pinned.name!r} (version {pinned.version}, which this run is pinned to)"
    if not exists(spark, path):
        raise UserError(f"{where} no longer exists at {path}; the run cannot be resumed on its "
                        "data: start a new run")
    now = table_id(spark, path)
    if now != pinned.table_id:
        raise UserError(f"{where} was deleted and created again since the run started (Delta "
                        f"table id {pinned.table_id}, now {now}); the run cannot be resumed on its "
                        "data: start a new run")
    df, _ = read(spark, lake_path, TableRef(pinned.name, pinned.version))
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # read() above went through the JVM
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    files = [jvm.org.apache.hadoop.fs.Path(f) for f in df.inputFiles()]
    missing = [str(f) for f in files if not f.getFileSystem(conf).exists(f)]
    if missing:
        raise UserError(f"{where} lost {len(missing)} of its {len(files)} data files (removed by "
                        f"VACUUM?), e.g. {missing[0]}; the run cannot be resumed on its data: "
                        "start a new run")


@contextmanager
def arrow_frame(spark: SparkSession, table: pa.Table,
                chunk_bytes: int = ARROW_CHUNK_BYTES) -> Iterator[DataFrame]:
    """A DataFrame of an Arrow table held by the driver, one partition per chunk of about
    `chunk_bytes`, the chunks shipped as broadcasts (cluster-safe: no driver-local file) and
    destroyed when the block ends, so use the frame (write it, cache and count it) inside."""
    rows = max(1, int(table.num_rows * chunk_bytes / max(table.nbytes, 1)))
    sink = []
    for start in range(0, max(table.num_rows, 1), rows):
        buffer = pa.BufferOutputStream()
        with pa.ipc.new_stream(buffer, table.schema) as writer:
            writer.write_table(table.slice(start, rows))
        sink.append(spark.sparkContext.broadcast(buffer.getvalue().to_pybytes()))
    try:
        yield (spark.range(0, len(sink), numPartitions=len(sink))
               .mapInArrow(partial(worker.arrow_chunks, chunks=sink), from_arrow_schema(table.schema)))
    finally:
        for bc in sink:
            bc.destroy(blocking=False)
