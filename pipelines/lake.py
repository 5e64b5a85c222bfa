"""Delta tables under `lake.path`: naming, time travel (`NAME@VERSION`) and version lookup."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession

from pipelines.errors import UserError

_REF = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<version>\d+))?$")


@dataclass(frozen=True)
class TableRef:
    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> "TableRef":
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
