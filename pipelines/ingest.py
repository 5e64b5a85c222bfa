"""spark-submit pipelines/ingest.py --source idx:DIR | csv:PATH | parquet:PATH --table NAME ...

Validate raw data and write it to a Delta training table (id long, features array<float>, label int
or double, split string, optional client_id string). Bad rows go to `<NAME>_rejects` with their row
number, raw text and reason, never silently dropped. The source's SHA-256 is stored in the commit's
userMetadata: re-ingesting an unchanged source writes nothing; a changed one writes a new version
(earlier versions stay readable as NAME@VERSION). A table that fedspark did not write is never
overwritten.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines import idx, lake
from pipelines.cli import main_wrapper, print_summary
from pipelines.config import DEFAULT_FILE, load_config
from pipelines.errors import UserError
from pipelines.session import build_session

REJECTS_SUFFIX = "_rejects"
# Rows without a `split` column: this fraction goes to `test`, chosen by a hash of the row id.
DEFAULT_TEST_FRACTION = 0.2
METADATA_KEY = "fedspark_ingest"
# Options that change what a source becomes: a re-run with other values is not "unchanged".
CONTENT_OPTIONS = ("label", "features", "features_prefix", "classes", "client_column")


@dataclass(frozen=True)
class Source:
    kind: str   # idx | csv | parquet
    path: str

    @classmethod
    def parse(cls, text: str) -> "Source":
        kind, sep, path = text.partition(":")
        if not sep or kind not in ("idx", "csv", "parquet") or not path:
            raise UserError(f"--source {text!r}: expected idx:DIR, csv:PATH or parquet:PATH")
        if not Path(path).exists():
            raise UserError(f"--source {text!r}: {path} does not exist")
        return cls(kind, path)


def checksum(path: str) -> str:
    """SHA-256 over the source's files (sorted by name when it is a directory)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --- sources -------------------------------------------------------------------------------------

def idx_frame(spark: SparkSession, directory: str) -> DataFrame:
    """Fashion-MNIST / MNIST IDX files: train ids 0..n-1, test ids after them, pixels / 255."""
    tables, first_id = [], 0
    for split in ("train", "test"):
        images, labels = idx.read_split(Path(directory), split)
        n, width = images.shape
        values = pa.array((images.astype(np.float32) / 255.0).ravel(), pa.float32())
        offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
        tables.append(pa.table({
            "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
            "features": pa.ListArray.from_arrays(offsets, values),
            "label": pa.array(labels.astype(np.int32)),
            "split": pa.array([split] * n),
        }))
        first_id += n
    return spark.createDataFrame(pa.concat_tables(tables))


def _numbered(df: DataFrame) -> DataFrame:
    """Add `row_number` (1-based, in file order). One partition for the window: the files are read
    once, and row numbers must match the lines a user sees in an editor."""
    from pyspark.sql.window import Window

    return df.withColumn("_order", F.monotonically_increasing_id()).withColumn(
        "row_number", F.row_number().over(Window.orderBy("_order")).cast("long")).drop("_order")


def csv_frame(spark: SparkSession, path: str) -> tuple[DataFrame, list[str]]:
    """Every data line of a CSV file with a header: row_number, raw line, and its cells as strings."""
    lines = _numbered(spark.read.text(path)).cache()
    header_row = lines.filter("row_number = 1").first()
    if header_row is None:
        raise UserError(f"{path}: empty file (a header line is required)")
    header = [h.strip() for h in header_row.value.split(",")]
    cells = lines.filter("row_number > 1").filter(F.trim("value") != "").select(
        "row_number", F.col("value").alias("raw"), F.split("value", ",").alias("cells"))
    return cells, header


def _feature_columns(header: list[str], label: str, features: list[str] | None, prefix: str | None,
                     extra: set[str], source: str) -> list[str]:
    if features:
        missing = [c for c in features if c not in header]
        if missing:
            raise UserError(f"{source}: feature column(s) {missing} not found; columns are {header}")
        return features
    if prefix:
        cols = [c for c in header if c.startswith(prefix)]
        if not cols:
            raise UserError(f"{source}: no column starts with --features-prefix {prefix!r}")
        return cols
    return [c for c in header if c != label and c not in extra]


@dataclass(frozen=True)
class Columns:
    """The parsed pieces of a source row, as Spark expressions over its string cells."""

    label: Column
    features: list[Column]
    split: Column | None
    client: Column | None


def csv_columns(header: list[str], args: argparse.Namespace, source: str) -> Columns:
    if args.label not in header:
        raise UserError(f"{source}: label column {args.label!r} not found; columns are {header}")
    extra = {"split", "id"} | ({args.client_column} if args.client_column else set())
    feats = _feature_columns(header, args.label, args.features, args.features_prefix, extra, source)
    if args.client_column and args.client_column not in header:
        raise UserError(f"{source}: client column {args.client_column!r} not found")
    cell = {name: F.trim(F.col("cells")[i]) for i, name in enumerate(header)}
    return Columns(cell[args.label], [cell[c] for c in feats], cell.get("split"),
                   cell[args.client_column] if args.client_column else None)


def parquet_frame(spark: SparkSession, path: str, args: argparse.Namespace
                  ) -> tuple[DataFrame, Columns, int | None]:
    """Every row of a Parquet source with row_number and raw (as JSON); with an array `features`
    column, `cells` holds the array and the returned width is the length rows must have."""
    df = spark.read.parquet(path)
    header = df.columns
    if args.label not in header:
        raise UserError(f"{path}: label column {args.label!r} not found; columns are {header}")
    extra = {"split", "id"} | ({args.client_column} if args.client_column else set())
    numbered = _numbered(df.withColumn("raw", F.to_json(F.struct(*[F.col(c) for c in header]))))
    width = None
    if args.features is None and args.features_prefix is None and "features" in header and \
            isinstance(df.schema["features"].dataType, T.ArrayType):
        width = _array_width(df)
        numbered = numbered.withColumn("cells", F.col("features").cast("array<string>"))
        features = [F.get(F.col("cells"), i) for i in range(width)]
    else:
        cols = _feature_columns(header, args.label, args.features, args.features_prefix, extra, path)
        numbered = numbered.withColumn("cells", F.array())
        features = [F.col(c).cast("string") for c in cols]
    return numbered, Columns(F.col(args.label).cast("string"), features,
                             F.col("split") if "split" in header else None,
                             F.col(args.client_column).cast("string") if args.client_column else None
                             ), width


def _array_width(df: DataFrame) -> int:
    """The most common length of the `features` arrays: the one every row must have."""
    row = (df.groupBy(F.size("features").alias("n")).count().filter("n >= 0")
           .orderBy(F.desc("count"), F.desc("n")).first())
    return int(row["n"]) if row else 0


# --- validation ----------------------------------------------------------------------------------

def _as_float(text: Column) -> Column:
    return text.try_cast("float")


def validate(rows: DataFrame, cols: Columns, n_columns: int | None, classes: int | None,
             unit: str = "columns") -> tuple[DataFrame, DataFrame]:
    """Split parsed rows into good rows (training schema) and rejects (row_number, raw, reason).

    The first failing rule names the reason: wrong width, a non-numeric or NaN feature (with its
    position), a missing or out-of-range label, or an unknown split value."""
    feats = [_as_float(c) for c in cols.features]
    bad_feature = F.lit(None).cast("string")
    for i in range(len(feats) - 1, -1, -1):
        bad_feature = F.when(feats[i].isNull(), F.format_string(
            "feature %d is not a number: '%s'", F.lit(i), F.coalesce(cols.features[i], F.lit(""))))\
            .when(F.isnan(feats[i]), F.format_string("feature %d is NaN", F.lit(i)))\
            .otherwise(bad_feature)
    if classes:
        number = cols.label.try_cast("double")
        label = number.cast("int")
        label_bad = F.when(number.isNull() | F.isnan(number) | (number != F.floor(number)),
                           F.format_string("label is not an integer: '%s'",
                                           F.coalesce(cols.label, F.lit(""))))\
            .when((label < 0) | (label >= classes), F.format_string(
                "label %d outside the declared classes 0..%d", label, F.lit(classes - 1)))
    else:
        label = cols.label.try_cast("double")
        label_bad = F.when(label.isNull() | F.isnan(label), F.format_string(
            "label is not a number: '%s'", F.coalesce(cols.label, F.lit(""))))
    split = F.lower(F.trim(cols.split)) if cols.split is not None else F.when(
        F.abs(F.xxhash64("row_number")) % 1000 < int(DEFAULT_TEST_FRACTION * 1000), F.lit("test"))\
        .otherwise(F.lit("train"))
    split_bad = F.when(~split.isin("train", "test") | split.isNull(), F.format_string(
        "split must be train or test, got '%s'", F.coalesce(split, F.lit(""))))
    width_bad = F.when(F.col("cells").isNull(), F.lit(f"{unit} is null")).when(
        F.size("cells") != n_columns, F.format_string(
            f"expected %d {unit}, got %d", F.lit(n_columns), F.size("cells"))) if n_columns else None
    reasons = [r for r in (width_bad, label_bad, bad_feature, split_bad) if r is not None]
    checked = rows.withColumn("reason", F.coalesce(*reasons))
    good = checked.filter(F.col("reason").isNull()).select(
        (F.col("row_number") - 1).alias("id"),
        F.array(*feats).alias("features"), label.alias("label"), split.alias("split"),
        *([cols.client.alias("client_id")] if cols.client is not None else []))
    bad = checked.filter(F.col("reason").isNotNull()).select("row_number", "raw", "reason")
    return good, bad


# --- writing -------------------------------------------------------------------------------------

def last_ingest(spark: SparkSession, path: str) -> dict | None:
    """The fedspark metadata of the table's latest commit; raises when the table is not ours."""
    from delta.tables import DeltaTable

    row = DeltaTable.forPath(spark, path).history(1).select("userMetadata").first()
    meta = json.loads(row[0]) if row and row[0] else {}
    if METADATA_KEY not in meta:
        raise UserError(f"{path} holds a Delta table that fedspark ingest did not write; refusing to "
                        "overwrite it. Choose another --table name.")
    return meta[METADATA_KEY]


def write(df: DataFrame, path: str, metadata: dict) -> None:
    """One atomic Delta commit replacing the table's contents (earlier versions stay readable)."""
    (df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
     .option("userMetadata", json.dumps({METADATA_KEY: metadata})).save(path))


def ingest(spark: SparkSession, source: Source, table: str, lake_path: str,
           args: argparse.Namespace) -> dict:
    path = lake.table_path(lake_path, table)
    rejects_path = lake.table_path(lake_path, table + REJECTS_SUFFIX)
    digest = checksum(source.path)
    options = {k: getattr(args, k) for k in CONTENT_OPTIONS}
    if lake.exists(spark, rejects_path):
        last_ingest(spark, rejects_path)  # refuses a rejects table fedspark did not write
    if lake.exists(spark, path):
        previous = last_ingest(spark, path)
        if previous.get("checksum") == digest and previous.get("options") == options:
            version = lake.latest_version(spark, path)
            return {"table": table, "version": version, "skipped": True, "rows": previous["rows"],
                    "rejected": previous["rejected"], "source": f"{source.kind}:{source.path}",
                    "checksum": digest}
    if source.kind == "idx":
        good, bad = idx_frame(spark, source.path), None
    elif source.kind == "csv":
        rows, header = csv_frame(spark, source.path)
        good, bad = validate(rows, csv_columns(header, args, source.path), len(header), args.classes)
    else:
        rows, cols, width = parquet_frame(spark, source.path, args)
        good, bad = validate(rows, cols, width, args.classes, unit="feature values")
    good = good.cache()
    n_good = good.count()
    n_bad = 0
    if bad is not None:
        bad = bad.select(F.lit(f"{source.kind}:{source.path}").alias("source"), "row_number", "raw",
                         "reason").cache()
        n_bad = bad.count()
        if n_bad or lake.exists(spark, rejects_path):
            write(bad, rejects_path, {"checksum": digest, "options": options, "rows": n_bad,
                                      "rejected": 0})
    if n_good == 0:
        raise UserError(f"{source.path}: no valid rows ({n_bad} rejected; reasons in table "
                        f"{table}{REJECTS_SUFFIX})")
    meta = {"checksum": digest, "options": options, "source": f"{source.kind}:{source.path}",
            "rows": n_good, "rejected": n_bad}
    write(good, path, meta)
    return {"table": table, "version": lake.latest_version(spark, path), "skipped": False,
            "rows": n_good, "rejected": n_bad, "source": meta["source"], "checksum": digest}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ingest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="idx:DIR | csv:PATH | parquet:PATH")
    p.add_argument("--table", required=True, help="Delta table name under lake.path")
    p.add_argument("--label", default="label", help="label column (csv, parquet)")
    p.add_argument("--features", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="feature columns, comma-separated (default: every other column)")
    p.add_argument("--features-prefix", help="take the columns whose names start with this")
    p.add_argument("--classes", type=int, help="number of classes: labels must be 0..N-1 "
                   "(without it the label is a regression target)")
    p.add_argument("--client-column", help="column to keep as client_id (federated data)")
    p.add_argument("--config", help="job config whose lake.path and spark.conf apply "
                   "(default: conf/default.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lake.path=/data/lake")
    args = p.parse_args(argv)
    if args.classes is not None and args.classes < 2:
        p.error("--classes must be at least 2")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    source = Source.parse(args.source)
    lake.TableRef.parse(args.table)
    config = load_config(args.config or DEFAULT_FILE, args.sets)
    started = time.perf_counter()
    spark = build_session("fedspark-ingest", config.spark.conf, config.spark.delta_packages)
    summary = ingest(spark, source, args.table, config.lake.path, args)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if summary["rejected"]:
        print(f"{summary['rejected']} row(s) rejected: see table {args.table}{REJECTS_SUFFIX}",
              flush=True)
    print_summary(summary)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
