"""spark-submit pipelines/score.py --model RUN_DIR | latest[:RUN_NAME] --input NAME[@VERSION] --output NAME

Score a Delta table (features array<float> or sparse struct<size, indices, values>) with a saved
model, its features transformed as the model's spec.json records, on the executors (mapInArrow:
one matrix per Arrow batch, the weights broadcast once) and write `id, prediction, probability,
model_id, input_table, input_version, scored_at` to the output Delta table. The output keeps every
model's and input's scores side by side; re-running the same job (same model, same input version)
replaces its own rows in one atomic commit (`replaceWhere`), never duplicating them. Nothing is
collected on the driver. Prints one JSON line.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core import py4j
from pipelines.core.cli import add_verbose, main_wrapper, print_summary
from pipelines.core.config import DEFAULT_FILE, load_config
from pipelines.core.errors import UserError
from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data.blocks import SPARSE_FEATURES, _dense_features, _sparse_features
from pipelines.ml.scoring import score_rows
from pipelines.store import artifacts, records, rundir
from pipelines.store.rundir import RunDir
from udfs.data.transform import Transform
from udfs.ml.scoring import Scoring

OUTPUT_SCHEMA = T.StructType([
    T.StructField("id", T.LongType()),
    T.StructField("prediction", T.DoubleType()),
    T.StructField("probability", T.ArrayType(T.DoubleType())),
    T.StructField("model_id", T.StringType()),
    T.StructField("input_table", T.StringType()),
    T.StructField("input_version", T.LongType()),
    T.StructField("scored_at", T.TimestampType()),
])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="score.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, metavar="RUN_DIR|latest[:RUN_NAME]",
                   help="a run directory (or its model/), or the newest completed run (of that name)")
    p.add_argument("--input", required=True, metavar="NAME[@VERSION]", help="the table to score")
    p.add_argument("--output", required=True, metavar="NAME", help="the Delta table to write")
    p.add_argument("--config", help="job config whose lake.path and spark.conf apply "
                   "(default: conf/default.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lake.path=/data/lake")
    add_verbose(p)
    return p.parse_args(argv)


def model_dir(spark: SparkSession, lake_path: str, model: str) -> RunDir:
    """The run directory --model names (a path or a Hadoop URI); `latest[:NAME]` is looked up in
    the runs table."""
    name, sep, run_name = model.partition(":")
    if name == "latest":
        return rundir.open_run(records.latest_completed(spark, lake_path, run_name if sep else None)["run_dir"])
    run_dir = rundir.open_run(model)
    if not run_dir.exists(""):
        raise UserError(f"--model {model}: no such run directory")
    return run_dir


def check_input(df: DataFrame, ref: lake.TableRef, width: int) -> None:
    """The input's `id` and `features` columns, and the width of its first row, against the model."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    if "id" not in fields or not isinstance(fields["id"], (T.LongType, T.IntegerType)):
        raise UserError(f"table {ref.name!r}: needs an integer 'id' column to key the scores; "
                        f"its columns are {list(fields)}")
    features = fields.get("features")
    if features is None or not (_dense_features(features) or _sparse_features(features)):
        raise UserError(f"table {ref.name!r}: needs a 'features' column of array<float> or sparse "
                        f"{SPARSE_FEATURES}; its columns are {list(fields)}")
    size = F.col("features.size") if _sparse_features(features) else F.size("features")
    first = df.select(size.alias("n")).first()
    if first is None:
        raise UserError(f"table {ref.name!r} is empty: nothing to score")
    if first["n"] != width:
        raise UserError(f"table {ref.name!r} has rows of {first['n']} features; the model expects "
                        f"{width}")


def check_output(spark: SparkSession, path: str, name: str, input_name: str) -> None:
    """An existing output must be a scores table (same columns and types): anything else is left
    untouched."""
    if name == input_name:
        raise UserError(f"--output {name} is the input table: write the scores to another table")
    if not lake.exists(spark, path):
        return
    schema = spark.read.format("delta").load(path).schema
    have = {f.name: f.dataType.simpleString() for f in schema.fields}
    want = {f.name: f.dataType.simpleString() for f in OUTPUT_SCHEMA.fields}
    if have != want:
        raise UserError(f"output table {name!r} exists with another schema {have}; scores need "
                        f"{want}. Choose another --output (the existing table was not changed)")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def score(spark: SparkSession, lake_path: str, model: str, input_ref: lake.TableRef, output: str
          ) -> dict:
    run_dir = model_dir(spark, lake_path, model)
    spec, theta, meta = artifacts.load_model(run_dir.uri)
    model_id = meta.get("run_id", run_dir.name)
    df, version = lake.read(spark, lake_path, input_ref)
    scoring = Scoring(spec, "features", "features", ("id",), "id",
                      transform=Transform.from_dict(meta.get("transform")))
    check_input(df, input_ref, scoring.width)
    out_path = lake.table_path(lake_path, output)
    check_output(spark, out_path, output, input_ref.name)
    sparse = _sparse_features(df.schema["features"].dataType)
    rows = df.select(F.col("id").cast("long").alias("id"),
                     F.col("features").cast(SPARSE_FEATURES if sparse else "array<float>"))
    scores, weights = score_rows(spark, scoring, theta, rows)
    scored = scores.select(
        "id", "prediction",
        (F.col("probability") if spec.is_classifier else F.lit(None).cast("array<double>")
         ).alias("probability"),
        F.lit(model_id).alias("model_id"), F.lit(input_ref.name).alias("input_table"),
        F.lit(version).cast("long").alias("input_version"),
        F.current_timestamp().alias("scored_at"))
    own_rows = (f"model_id = {_quote(model_id)} AND input_table = {_quote(input_ref.name)} "
                f"AND input_version = {version}")
    try:
        (scored.write.format("delta").mode("overwrite").option("replaceWhere", own_rows)
         .partitionBy("model_id").save(out_path))
    except Exception as exc:  # noqa: BLE001 - a row the model cannot read fails the task
        message = py4j.task_message(exc, ValueError.__name__)
        if message is not None and message.startswith("features column"):
            raise UserError(f"table {input_ref.name}@{version}: {message}") from exc
        raise
    finally:
        weights.destroy()
    from delta.tables import DeltaTable

    commit = DeltaTable.forPath(spark, out_path).history(1).first()
    if commit is None:
        raise RuntimeError(f"{out_path} has no commit after writing the scores")
    return {"model_id": model_id, "model": str(run_dir), "input": input_ref.name,
            "input_version": version, "output": output, "output_version": commit["version"],
            "rows": int(commit["operationMetrics"].get("numOutputRows", 0))}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    input_ref = lake.TableRef.parse(args.input)
    lake.TableRef.parse(args.output)
    config = load_config(args.config or DEFAULT_FILE, args.sets)
    spark = build_session("fedspark-score", config.spark.conf, config.spark.delta_packages)
    started = time.perf_counter()
    summary = score(spark, config.lake.path, args.model, input_ref, args.output)
    seconds = time.perf_counter() - started
    summary.update(seconds=round(seconds, 3), rows_per_second=round(summary["rows"] / seconds, 1))
    print_summary(summary)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
