"""The run and metric records: two append-only Delta tables under `lake.path`.

    runs     one row per event of a run: `running` when an attempt starts, then `completed` or
             `failed` (a killed attempt leaves only its `running` row; the resumed attempt adds its
             own). A run's state is its newest row.
    metrics  one row per (run, unit, step, name): every number of every epoch, step or round.

Every write is a blind append, so jobs that write at the same time never conflict on data; the one
race left, two jobs creating a table at once, is retried. Appends carry Delta's idempotent-write
options (`txnAppId`, `txnVersion`): a job killed after a record landed and resumed writes it again
and Delta skips it, so a kill and a resume leave no duplicate rows.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from pipelines.core import py4j
from pipelines.core.errors import UserError
from pipelines.data import lake

RUNS, METRICS = "runs", "metrics"
RUNS_SCHEMA = ("run_id string, run_name string, attempt int, status string, strategy string, "
               "data_table string, data_version long, started_at timestamp, ended_at timestamp, "
               "model_path string, run_dir string, metrics map<string,double>, config string, "
               "summary string, error string")
METRICS_SCHEMA = "run_id string, unit string, step long, name string, value double"
RETRIES = 8


@dataclass(frozen=True)
class RunInfo:
    """What every `runs` row of one attempt repeats."""

    run_id: str
    run_name: str | None
    attempt: int
    strategy: str
    data_table: str
    data_version: int
    started_at: datetime
    run_dir: str
    config: str


def _is_conflict(exc: Exception) -> bool:
    """A Delta commit that lost a race (a concurrent append, or two writers creating the table:
    DELTA_PROTOCOL_CHANGED is a ProtocolChangedException), worth retrying."""
    return any(k in n for n in py4j.names(exc)
               for k in ("Concurrent", "ProtocolChanged", "MetadataChanged", "FileAlreadyExists"))


def append(spark: SparkSession, lake_path: str, table: str, rows: list[tuple], schema: str,
           txn: tuple[str, int]) -> None:
    """Append rows once: retried on a creation race, skipped by Delta when (app id, version) already
    committed."""
    if not rows:
        return
    path = lake.table_path(lake_path, table)
    for attempt in range(RETRIES):
        try:
            (spark.createDataFrame(rows, schema).coalesce(1).write.format("delta").mode("append")
             .option("txnAppId", txn[0]).option("txnVersion", txn[1]).save(path))
            return
        except Exception as exc:  # noqa: BLE001 - py4j wraps Delta's conflict exceptions
            if not _is_conflict(exc) or attempt == RETRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def next_attempt(spark: SparkSession, lake_path: str, run_id: str) -> int:
    """1 for a new run; one more than the attempts `runs` holds for a resumed one."""
    path = lake.table_path(lake_path, RUNS)
    if not lake.exists(spark, path):
        return 1
    row = (spark.read.format("delta").load(path).filter(F.col("run_id") == run_id)
           .agg(F.max("attempt")).first())
    assert row is not None  # a global aggregate has exactly one row
    return (row[0] or 0) + 1


def started(spark: SparkSession, lake_path: str, info: RunInfo) -> None:
    _write_run(spark, lake_path, info, "running", None, None, {}, None, None)


def ended(spark: SparkSession, lake_path: str, info: RunInfo, status: str,
          summary: dict[str, Any] | None = None, error: str | None = None) -> None:
    numbers = {k: float(v) for k, v in (summary or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"}
    _write_run(spark, lake_path, info, status, _now(),
               (summary or {}).get("model_path"), numbers,
               json.dumps(summary) if summary else None, error)


def _write_run(spark: SparkSession, lake_path: str, info: RunInfo, status: str,
               ended_at: datetime | None, model_path: str | None, numbers: dict[str, float],
               summary: str | None, error: str | None) -> None:
    row = (info.run_id, info.run_name, info.attempt, status, info.strategy, info.data_table,
           info.data_version, info.started_at, ended_at, model_path, info.run_dir, numbers,
           info.config, summary, error)
    # one version per (attempt, event): 2a for the start, 2a + 1 for the end
    version = 2 * info.attempt + (status != "running")
    append(spark, lake_path, RUNS, [row], RUNS_SCHEMA, (f"fedspark-runs:{info.run_id}", version))


def metric_rows(run_id: str, unit: str, records: Iterable[dict[str, Any]],
                names: dict[int, str] | None = None) -> list[tuple]:
    """Flatten per-epoch/round records into (run_id, unit, step, name, value) rows: nested dicts as
    `outer.inner`, a list of per-client numbers as `outer/<client>`; text is left out."""
    rows = []
    for record in records:
        step = int(record[unit])
        for name, value in _numbers(record, names or {}):
            if name != unit:
                rows.append((run_id, unit, step, name, value))
    return rows


def _numbers(record: dict[str, Any], names: dict[int, str], prefix: str = ""
             ) -> Iterable[tuple[str, float]]:
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            yield name, float(value)
        elif isinstance(value, dict):
            yield from _numbers(value, names, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            yield from ((f"{name}/{names.get(i, i)}", float(v)) for i, v in enumerate(value))


def append_metrics(spark: SparkSession, lake_path: str, run_id: str, unit: str,
                   records: list[dict[str, Any]], names: dict[int, str] | None = None) -> None:
    """The records after the last step `metrics` already holds for this run, as one idempotent
    append keyed by the run and its last step."""
    if records:
        last = int(records[-1][unit])
        append(spark, lake_path, METRICS, metric_rows(run_id, unit, records, names), METRICS_SCHEMA,
               (f"fedspark-metrics:{run_id}", last))


# --- reading ---------------------------------------------------------------------------------------

def _table(spark: SparkSession, lake_path: str, name: str) -> DataFrame:
    path = lake.table_path(lake_path, name)
    if not lake.exists(spark, path):
        raise UserError(f"no run records yet: no Delta table at {path} (train a model first)")
    return spark.read.format("delta").load(path)


def latest_rows(spark: SparkSession, lake_path: str) -> DataFrame:
    """Each run's newest row: its current state."""
    newest = Window.partitionBy("run_id").orderBy(F.desc("attempt"), F.desc_nulls_last("ended_at"))
    return (_table(spark, lake_path, RUNS).withColumn("_n", F.row_number().over(newest))
            .filter("_n = 1").drop("_n"))


def latest_completed(spark: SparkSession, lake_path: str, run_name: str | None) -> dict[str, Any]:
    """The newest completed run, of that name when one is given (`score.py --model latest:NAME`)."""
    done = _table(spark, lake_path, RUNS).filter(F.col("status") == "completed")
    if run_name is not None:
        done = done.filter(F.col("run_name") == run_name)
    row = done.orderBy(F.desc("ended_at")).select("run_id", "run_dir", "model_path").first()
    if row is None:
        what = f"named {run_name!r}" if run_name is not None else "at all"
        raise UserError(f"no completed run {what} in the runs table under {lake_path}")
    return row.asDict()


def run_rows(spark: SparkSession, lake_path: str, run_id: str) -> tuple[list[dict], list[dict]]:
    """Every `runs` row of one run (oldest first) and its metrics ordered by step and name."""
    runs = (_table(spark, lake_path, RUNS).filter(F.col("run_id") == run_id)
            .orderBy("attempt", F.asc_nulls_first("ended_at")).collect())
    if not runs:
        raise UserError(f"no run {run_id!r} in the runs table under {lake_path}")
    metrics_path = lake.table_path(lake_path, METRICS)
    metrics = []
    if lake.exists(spark, metrics_path):
        metrics = (spark.read.format("delta").load(metrics_path).filter(F.col("run_id") == run_id)
                   .orderBy("unit", "step", "name").collect())
    return [r.asDict() for r in runs], [m.asDict() for m in metrics]
