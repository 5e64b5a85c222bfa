"""Ingest's library half: sources (IDX, CSV, Parquet, LibSVM), validation into good rows and
rejects with a reason, and the Delta writes that keep an ingest atomic and idempotent
(`pipelines/ingest.py` is the entry point).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.errors import UserError
from pipelines.data import encoding, idx, lake
from pipelines.data.encoding import Encoding
from pipelines.store import locks

REJECTS_SUFFIX = "_rejects"
# Rows without a `split` column: this fraction goes to `test`, chosen by a hash of the row id.
DEFAULT_TEST_FRACTION = 0.2
METADATA_KEY = "fedspark_ingest"
# Options that change what a source becomes: a re-run with other values is not "unchanged".
CONTENT_OPTIONS = ("label", "features", "features_prefix", "classes", "client_column", "num_features")
# ...and those that only count when given (a table ingested before they existed stays unchanged)
GIVEN_OPTIONS = ("categorical", "hash_buckets", "allow_missing", "encoding_from")
KINDS = ("idx", "csv", "parquet", "libsvm")


@dataclass(frozen=True)
class Source:
    kind: str   # one of KINDS
    path: str

    @classmethod
    def parse(cls, text: str) -> Source:
        kind, sep, path = text.partition(":")
        if not sep or kind not in KINDS or not path:
            raise UserError(f"--source {text!r}: expected idx:DIR, csv:PATH, parquet:PATH or "
                            "libsvm:PATH")
        if not Path(path).exists():
            raise UserError(f"--source {text!r}: {path} does not exist")
        return cls(kind, path)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum(path: str) -> str:
    """SHA-256 over the source's files (sorted by name when it is a directory)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        digest.update(file_digest(f).encode())
    return digest.hexdigest()


def data_files(source: Source) -> dict[str, str]:
    """A directory source's data files (relative name -> SHA-256), skipping hidden files and
    Spark's _SUCCESS markers; Parquet sources count only *.parquet files."""
    root = Path(source.path)
    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or any(part.startswith((".", "_")) for part in rel.parts):
            continue
        if source.kind == "parquet" and f.suffix != ".parquet":
            continue
        files[str(rel)] = file_digest(f)
    if not files:
        raise UserError(f"--source {source.kind}:{source.path}: the directory holds no data files")
    return files


# --- sources -------------------------------------------------------------------------------------

def idx_table(directory: str) -> pa.Table:
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
    return pa.concat_tables(tables)


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
    for i, name in enumerate(header):
        if name in header[:i]:
            raise UserError(f"{path}: the header names column {name!r} twice (columns "
                            f"{header.index(name) + 1} and {i + 1}); rename one of them")
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
    """The parsed pieces of a source row, as Spark expressions over its string cells; `names`:
    the numeric feature columns' names (when the source names them), `categorical`: (name, cell)
    of each --categorical column."""

    label: Column
    features: list[Column]
    split: Column | None
    client: Column | None
    names: tuple[str, ...] = ()
    categorical: tuple[tuple[str, Column], ...] = ()


def content_options(args: argparse.Namespace) -> dict:
    """The options a re-run must repeat for the source to count as unchanged."""
    given = {k: getattr(args, k, None) for k in GIVEN_OPTIONS}
    return {**{k: getattr(args, k) for k in CONTENT_OPTIONS}, **{k: v for k, v in given.items() if v}}


def _categorical(header: list[str], args: argparse.Namespace, source: str) -> list[str]:
    """The --categorical columns, each in the header and not also a numeric feature."""
    columns = list(getattr(args, "categorical", None) or [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{source}: categorical column(s) {missing} not found; columns are {header}")
    doubled = [c for c in columns if c in (args.features or []) or c == args.label]
    if doubled:
        raise UserError(f"{source}: column(s) {doubled} are given as --categorical and as a feature "
                        "or the label; a column is one of them")
    return columns


def csv_columns(header: list[str], args: argparse.Namespace, source: str) -> Columns:
    if args.label not in header:
        raise UserError(f"{source}: label column {args.label!r} not found; columns are {header}")
    categorical = _categorical(header, args, source)
    extra = {"split", "id", *categorical} | ({args.client_column} if args.client_column else set())
    feats = _feature_columns(header, args.label, args.features, args.features_prefix, extra, source)
    if args.client_column and args.client_column not in header:
        raise UserError(f"{source}: client column {args.client_column!r} not found")
    cell = {name: F.trim(F.col("cells")[i]) for i, name in enumerate(header)}
    return Columns(cell[args.label], [cell[c] for c in feats], cell.get("split"),
                   cell[args.client_column] if args.client_column else None, tuple(feats),
                   tuple((c, cell[c]) for c in categorical))


def parquet_frame(spark: SparkSession, path: str, args: argparse.Namespace
                  ) -> tuple[DataFrame, Columns, int | None]:
    """Every row of a Parquet source with row_number and raw (as JSON); with an array `features`
    column, `cells` holds the array and the returned width is the length rows must have."""
    df = spark.read.parquet(path)
    header = df.columns
    if args.label not in header:
        raise UserError(f"{path}: label column {args.label!r} not found; columns are {header}")
    categorical = _categorical(header, args, path)
    extra = {"split", "id", *categorical} | ({args.client_column} if args.client_column else set())
    numbered = _numbered(df.withColumn("raw", F.to_json(F.struct(*[F.col(c) for c in header]))))
    width = None
    if args.features is None and args.features_prefix is None and "features" in header and \
            isinstance(df.schema["features"].dataType, T.ArrayType):
        width = _array_width(df)
        numbered = numbered.withColumn("cells", F.col("features").cast("array<string>"))
        features = [F.get(F.col("cells"), i) for i in range(width)]
        names: tuple[str, ...] = tuple(f"features[{i}]" for i in range(width))
    else:
        cols = _feature_columns(header, args.label, args.features, args.features_prefix, extra, path)
        numbered = numbered.withColumn("cells", F.array())
        features = [F.col(c).cast("string") for c in cols]
        names = tuple(cols)
    return numbered, Columns(F.col(args.label).cast("string"), features,
                             F.col("split") if "split" in header else None,
                             F.col(args.client_column).cast("string") if args.client_column else None,
                             names, tuple((c, F.col(c)) for c in categorical)), width


def _array_width(df: DataFrame) -> int:
    """The most common length of the `features` arrays: the one every row must have."""
    row = (df.groupBy(F.size("features").alias("n")).count().filter("n >= 0")
           .orderBy(F.desc("count"), F.desc("n")).first())
    return int(row["n"]) if row else 0


# --- validation ----------------------------------------------------------------------------------

def _as_float(text: Column) -> Column:
    return text.try_cast("float")


def _infinite(number: Column) -> Column:
    """`inf`, `-inf`, and a float32 overflow (`1e39`, a run of digits), which parse to infinity."""
    return F.abs(number) == F.lit(float("inf"))


def _shown(text: Column) -> Column:
    """A cell as a reason quotes it: at most 40 characters (the raw row is in the rejects anyway)."""
    text = F.coalesce(text, F.lit(""))
    return F.when(F.length(text) > 40, F.concat(F.substring(text, 1, 40), F.lit("..."))).otherwise(text)


def _label_rule(text: Column, classes: int | None) -> tuple[Column, Column]:
    """The label parsed from its text, and the reason it is bad (null when good). The range is
    checked on the parsed double, before the cast to int, so a label past the int range is a
    reject rather than a cast overflow that fails the whole ingest."""
    number = text.try_cast("double")
    if classes:
        in_range = (number >= 0) & (number < classes)
        return F.when(in_range, number.cast("int")), F.when(
            number.isNull() | F.isnan(number) | _infinite(number) | ((number % 1) != 0),
            F.format_string("label is not an integer: '%s'", _shown(text)))\
            .when(~in_range, F.format_string("label %s outside the declared classes 0..%d",
                                             _shown(F.trim(text)), F.lit(classes - 1)))
    return number, F.when(number.isNull() | F.isnan(number) | _infinite(number), F.format_string(
        "label is not a finite number: '%s'", _shown(text)))


def _split_rule(text: Column | None, id_base: int) -> tuple[Column, Column]:
    """The row's split (without a split column: drawn by a hash of the row id), and the reason it
    is bad."""
    split = F.lower(F.trim(text)) if text is not None else F.when(
        F.abs(F.xxhash64(F.col("row_number") + id_base)) % 1000 < int(DEFAULT_TEST_FRACTION * 1000),
        F.lit("test")).otherwise(F.lit("train"))
    return split, F.when(~split.isin("train", "test") | split.isNull(), F.format_string(
        "split must be train or test, got '%s'", F.coalesce(split, F.lit(""))))


def _checked(rows: DataFrame, features: Column, reasons: list[Column], label: Column,
             split: Column, client: Column | None, id_base: int,
             categorical: tuple[tuple[str, Column], ...] = ()) -> tuple[DataFrame, DataFrame]:
    """Good rows in the training schema (plus each categorical cell, for the encoding) and rejects
    (row_number, raw, reason): the first non-null of `reasons` names a row's fault."""
    checked = rows.withColumn("reason", F.coalesce(*reasons))
    good = checked.filter(F.col("reason").isNull()).select(
        (F.col("row_number") - 1 + id_base).alias("id"), features.alias("features"),
        label.alias("label"), split.alias("split"),
        *([client.alias("client_id")] if client is not None else []),
        *[encoding.cell(c).alias(encoding.CATEGORY_PREFIX + name) for name, c in categorical])
    bad = checked.filter(F.col("reason").isNotNull()).select("row_number", "raw", "reason")
    return good, bad


def validate(rows: DataFrame, cols: Columns, n_columns: int | None, classes: int | None,
             unit: str = "columns", id_base: int = 0, allow_missing: bool = False
             ) -> tuple[DataFrame, DataFrame]:
    """Split parsed rows into good rows (training schema) and rejects (row_number, raw, reason).
    A row's id is `id_base + row_number - 1` (`id_base` > 0 for the later files of a directory).

    The first failing rule names the reason: wrong width, a missing, non-integer or out-of-range
    label, a non-numeric, NaN or infinite feature (with its position; a value past float32's range
    parses to infinity), or an unknown split value. With `allow_missing` an empty (or null)
    feature cell is kept as a missing value, NaN, for data.impute to fill."""
    feats = [_as_float(c) for c in cols.features]
    empty = [c.isNull() | (F.trim(c) == "") for c in cols.features]
    bad_feature = F.lit(None).cast("string")
    for i in range(len(feats) - 1, -1, -1):
        unparsed = feats[i].isNull() & ~empty[i] if allow_missing else feats[i].isNull()
        bad_feature = F.when(unparsed, F.format_string(
            "feature %d is not a number: '%s'", F.lit(i), _shown(cols.features[i])))\
            .when(F.isnan(feats[i]), F.format_string("feature %d is NaN", F.lit(i)))\
            .when(_infinite(feats[i]), F.format_string(
                "feature %d is not a finite float32: '%s'", F.lit(i), _shown(cols.features[i])))\
            .otherwise(bad_feature)
    if allow_missing:
        feats = [F.when(e, F.lit(float("nan")).cast("float")).otherwise(f) for f, e in zip(feats, empty, strict=True)]
    label, label_bad = _label_rule(cols.label, classes)
    split, split_bad = _split_rule(cols.split, id_base)
    width_bad = F.when(F.col("cells").isNull(), F.lit(f"{unit} is null")).when(
        F.size("cells") != n_columns, F.format_string(
            f"expected %d {unit}, got %d", F.lit(n_columns), F.size("cells"))) if n_columns else None
    reasons = [r for r in (width_bad, label_bad, bad_feature, split_bad) if r is not None]
    return _checked(rows, F.array(*feats), reasons, label, split, cols.client, id_base,
                    cols.categorical)


# --- LibSVM --------------------------------------------------------------------------------------
# `label index:value index:value ...`, indices 1-based and ascending, `#` starts a comment. Rows
# become sparse features struct<size, indices (0-based), values> (Spark's SparseVector layout), never
# densified.

def libsvm_frame(spark: SparkSession, path: str) -> DataFrame:
    """Every non-blank line: row_number (the line in the file), raw text, label text and pairs."""
    lines = _numbered(spark.read.text(path))
    body = F.trim(F.regexp_replace("value", "#.*$", ""))
    tokens = F.split(body, r"\s+")
    return (lines.withColumn("_body", body).filter(F.col("_body") != "")
            .select("row_number", F.col("value").alias("raw"),
                    F.get(tokens, 0).alias("label_text"),
                    F.slice(tokens, 2, F.size(tokens) - 1).alias("pairs")))


def _pair_index(p: Column) -> Column:
    return F.when(F.size(F.split(p, ":")) == 2, F.substring_index(p, ":", 1).try_cast("int"))


def _pair_value(p: Column) -> Column:
    return F.when(F.size(F.split(p, ":")) == 2, F.substring_index(p, ":", -1).try_cast("float"))


def libsvm_width(rows: DataFrame) -> int:
    """The largest index of a LibSVM source (its dimension when --num-features is not given)."""
    row = rows.select(F.max(F.array_max(F.transform("pairs", _pair_index)))).first()
    assert row is not None  # a global aggregate has exactly one row
    return int(row[0] or 0)


def validate_libsvm(rows: DataFrame, width: int, classes: int | None,
                    id_base: int = 0) -> tuple[DataFrame, DataFrame]:
    """LibSVM rows as good rows with sparse features, and rejects naming the pair at fault: not
    `index:value`, an index outside 1..width, indices not ascending, a non-numeric or NaN value.
    With --classes 2 a label of -1 (LibSVM's usual negative class) becomes 0."""
    def pair_fault(p: Column, i: Column) -> Column:
        index, value = _pair_index(p), _pair_value(p)
        where = F.format_string("pair %d '%s'", i + 1, _shown(p))
        previous = _pair_index(F.get(F.col("pairs"), i - 1))
        return (F.when(index.isNull() | value.isNull(),
                       F.format_string("%s is not index:value with an integer index and a number",
                                       where))
                .when((index < 1) | (index > width), F.format_string(
                    f"%s: index %d outside 1..{width} (LibSVM indices start at 1; "
                    f"--num-features is {width})", where, index))
                .when((i > 0) & (index <= previous), F.format_string(
                    "%s: indices must be ascending, %d follows %d", where, index, previous))
                .when(F.isnan(value), F.format_string("%s: value is NaN", where))
                .when(_infinite(value), F.format_string("%s: value is not a finite float32", where)))

    text = F.col("label_text")
    if classes == 2:
        text = F.when(F.trim(text).try_cast("double") == -1, F.lit("0")).otherwise(text)
    label, label_bad = _label_rule(text, classes)
    split, split_bad = _split_rule(None, id_base)
    faults = F.filter(F.transform("pairs", pair_fault), lambda r: r.isNotNull())
    features = F.struct(F.lit(width).alias("size"),
                        F.transform("pairs", lambda p: _pair_index(p) - 1).alias("indices"),
                        F.transform("pairs", _pair_value).alias("values"))
    return _checked(rows, features, [label_bad, F.get(faults, 0), split_bad], label, split, None,
                    id_base)


# --- writing -------------------------------------------------------------------------------------

def last_ingest(spark: SparkSession, path: str) -> dict:
    """The fedspark metadata of the table's latest ingest commit, passing over commits fedspark did
    not write (an OPTIMIZE, a VACUUM, another writer); raises when no commit is an ingest's (the
    table is not ours)."""
    from delta.tables import DeltaTable

    rows = (DeltaTable.forPath(spark, path).history().filter(F.col("userMetadata").isNotNull())
            .orderBy(F.desc("version")).select("userMetadata").collect())
    for row in rows:
        try:
            meta = json.loads(row[0])
        except ValueError:
            continue
        if isinstance(meta, dict) and METADATA_KEY in meta:
            return meta[METADATA_KEY]
    raise UserError(f"{path} holds a Delta table that fedspark ingest did not write; refusing to "
                    "overwrite it. Choose another --table name.")


def write(df: DataFrame, path: str, metadata: dict, mode: str = "overwrite",
          txn: tuple[str, int] | None = None) -> None:
    """One atomic Delta commit replacing (or appending to) the table's contents; earlier versions
    stay readable."""
    writer = df.write.format("delta").mode(mode).option("userMetadata",
                                                        json.dumps({METADATA_KEY: metadata}))
    if mode == "overwrite":
        writer = writer.option("overwriteSchema", "true")
    if txn is not None:
        writer = writer.option("txnAppId", txn[0]).option("txnVersion", txn[1])
    writer.save(path)


def read_source(spark: SparkSession, kind: str, path: str, args: argparse.Namespace,
                id_base: int = 0, reused: Encoding | None = None
                ) -> tuple[DataFrame, DataFrame, Encoding | None]:
    """One source file (CSV, Parquet, LibSVM) as good rows and rejects, ids from `id_base`, and
    the encoding of its categorical columns (`reused`, another table's, or fitted from its train
    split; None without categorical columns)."""
    allow_missing = bool(getattr(args, "allow_missing", False))
    if reused is not None and not getattr(args, "categorical", None):   # the other table's columns
        args = argparse.Namespace(**{**vars(args), "categorical": [c.column for c in reused.categorical]})
    if kind == "libsvm":
        if getattr(args, "categorical", None) or allow_missing or reused is not None:
            raise UserError(f"{path}: --categorical, --encoding-from and --allow-missing apply to CSV "
                            "and Parquet sources, not LibSVM")
        rows = libsvm_frame(spark, path).cache()
        good, bad = validate_libsvm(rows, args.num_features or libsvm_width(rows), args.classes,
                                    id_base)
        cols = None
    elif kind == "csv":
        rows, header = csv_frame(spark, path)
        cols = csv_columns(header, args, path)
        good, bad = validate(rows, cols, len(header), args.classes, id_base=id_base,
                             allow_missing=allow_missing)
    else:
        rows, cols, width = parquet_frame(spark, path, args)
        good, bad = validate(rows, cols, width, args.classes, unit="feature values", id_base=id_base,
                             allow_missing=allow_missing)
    bad = bad.select(F.lit(f"{kind}:{path}").alias("source"), "row_number", "raw", "reason")
    if cols is None or (not cols.categorical and reused is None):
        return good, bad, None
    columns = [name for name, _ in cols.categorical]
    if reused is not None:
        encoding.check_reused(reused, list(cols.names), columns, path, args.encoding_from)
        fitted = reused
    else:
        fitted = encoding.fit(good, list(cols.names), columns, getattr(args, "hash_buckets", None))
    return fitted.apply(good), bad, fitted


def _line_count(spark: SparkSession, kind: str, path: str) -> int:
    """How many ids a file takes: its lines (CSV and LibSVM, header, comment and blank lines
    included, as row_number counts them) or its rows (Parquet)."""
    return (spark.read.parquet(path) if kind == "parquet" else spark.read.text(path)).count()


def ingest(spark: SparkSession, source: Source, table: str, lake_path: str,
           args: argparse.Namespace) -> dict:
    """Ingest `source` into `table`, holding the table's ingest lock: two ingests at once could
    both see a file as new and append it twice."""
    with locks.lock_table(lake_path, table):
        return _ingest(spark, source, table, lake_path, args)


def _ingest(spark: SparkSession, source: Source, table: str, lake_path: str,
            args: argparse.Namespace) -> dict:
    path = lake.table_path(lake_path, table)
    rejects_path = lake.table_path(lake_path, table + REJECTS_SUFFIX)
    if lake.exists(spark, rejects_path):
        last_ingest(spark, rejects_path)  # refuses a rejects table fedspark did not write
    if source.kind != "idx" and Path(source.path).is_dir():
        return ingest_new_files(spark, source, table, path, rejects_path, args)
    digest = checksum(source.path)
    options = content_options(args)
    if lake.exists(spark, path):
        previous = last_ingest(spark, path)
        if "files" in previous:
            raise UserError(f"table {table!r} was ingested from a directory, file by file; a single "
                            f"source would replace all of it. Put {source.path} in that directory, "
                            "or ingest it into another --table")
        if previous.get("checksum") == digest and previous.get("options") == options:
            version = lake.latest_version(spark, path)
            return {"table": table, "version": version, "skipped": True, "rows": previous["rows"],
                    "rejected": previous["rejected"], "source": f"{source.kind}:{source.path}",
                    "checksum": digest}
    meta = {"checksum": digest, "options": options, "source": f"{source.kind}:{source.path}"}
    if source.kind == "idx":   # read on the driver: every image is valid or the file is corrupt
        with lake.arrow_frame(spark, idx_table(source.path)) as good:
            n_good, n_bad = _write_ingest(spark, good, None, path, rejects_path, "overwrite", meta)
    else:
        good, bad, fitted = read_source(spark, source.kind, source.path, args,
                                        reused=reused_encoding(spark, lake_path, args))
        if fitted is not None:
            meta["encoding"] = fitted.to_dict()
        n_good, n_bad = _write_ingest(spark, good, bad, path, rejects_path, "overwrite", meta)
    if n_good == 0:
        raise UserError(f"{source.path}: no valid rows ({n_bad} rejected; reasons in table "
                        f"{table}{REJECTS_SUFFIX})")
    return {"table": table, "version": lake.latest_version(spark, path), "skipped": False,
            "rows": n_good, "rejected": n_bad, "source": meta["source"], "checksum": digest}


def reused_encoding(spark: SparkSession, lake_path: str, args: argparse.Namespace) -> Encoding | None:
    """--encoding-from TABLE: the encoding that table's latest ingest recorded."""
    table = getattr(args, "encoding_from", None)
    if not table:
        return None
    path = lake.table_path(lake_path, table)
    if not lake.exists(spark, path):
        raise UserError(f"--encoding-from {table}: no Delta table at {path}")
    recorded = last_ingest(spark, path).get("encoding")
    if recorded is None:
        raise UserError(f"--encoding-from {table}: that table was ingested without --categorical; "
                        "it has no encoding to reuse")
    return Encoding.from_dict(recorded)


def table_encoding(spark: SparkSession, lake_path: str, table: str) -> Encoding | None:
    """The encoding of `table`'s categorical columns, if its latest ingest made one."""
    path = lake.table_path(lake_path, table)
    try:
        recorded = last_ingest(spark, path).get("encoding")
    except UserError:   # not a table fedspark ingested: no encoding of ours
        return None
    return None if recorded is None else Encoding.from_dict(recorded)


def _write_ingest(spark: SparkSession, good: DataFrame, bad: DataFrame | None, path: str,
                  rejects_path: str, mode: str, meta: dict, txn: tuple[str, int] | None = None
                  ) -> tuple[int, int]:
    """Rejects first, then the good rows in one commit: the counts. An overwrite with no good rows
    writes nothing; an append to an existing table still commits, to record which files it read.
    With `txn`, both appends are idempotent (a rerun after a crash between them adds nothing
    twice)."""
    good = good.cache()
    n_good, n_bad = good.count(), 0
    if bad is not None:
        bad = bad.cache()
        n_bad = bad.count()
        if n_bad or (mode == "overwrite" and lake.exists(spark, rejects_path)):
            write(bad, rejects_path, {**meta, "rows": n_bad, "rejected": 0}, mode, txn)
    if n_good or (mode == "append" and lake.exists(spark, path)):  # an append records its files
        write(good, path, {**meta, "rows": n_good, "rejected": n_bad}, mode, txn)
    return n_good, n_bad


def ingest_new_files(spark: SparkSession, source: Source, table: str, path: str, rejects_path: str,
                     args: argparse.Namespace) -> dict:
    """A directory of CSV or Parquet files, ingested incrementally: only files not ingested before
    are read, validated and appended in one commit, their ids after the table's. A file that changed
    after it was ingested is an error (append new data as new files)."""
    if source.kind == "libsvm" and not args.num_features:
        raise UserError(f"--source {source.kind}:{source.path} is a directory: give --num-features "
                        "(files added later cannot widen the table)")
    if getattr(args, "categorical", None) or getattr(args, "encoding_from", None):
        raise UserError(f"--source {source.kind}:{source.path} is a directory: --categorical and "
                        "--encoding-from apply to a single file for now")
    files = data_files(source)
    options = content_options(args)
    label = f"{source.kind}:{source.path}"
    previous = last_ingest(spark, path) if lake.exists(spark, path) else {}
    if previous and "files" not in previous:
        raise UserError(f"table {table!r} was ingested from a single source, not a directory; "
                        "ingest the directory into a new --table")
    if previous and previous["options"] != options:
        raise UserError(f"table {table!r} was ingested with options {previous['options']}; new files "
                        "must use the same ones (or go to a new --table)")
    seen: dict[str, str] = previous.get("files", {})
    changed = sorted(f for f in files if f in seen and seen[f] != files[f])
    if changed:
        raise UserError(f"{source.path}: file(s) {changed} changed since they were ingested; files of "
                        "an incremental source are append-only: put new rows in new files")
    new = [f for f in files if f not in seen]
    summary = {"table": table, "source": label, "files": len(new), "skipped": not new}
    if not new:
        version = lake.latest_version(spark, path)
        return {**summary, "version": version, "rows": 0, "rejected": 0}
    next_id, goods, bads = previous.get("next_id", 0), [], []
    for name in new:
        file_path = str(Path(source.path) / name)
        good, bad, _ = read_source(spark, source.kind, file_path, args, id_base=next_id)
        goods.append(good)
        bads.append(bad)
        next_id += _line_count(spark, source.kind, file_path)
    meta = {"options": options, "source": label, "files": {**seen, **{f: files[f] for f in new}},
            "next_id": next_id}
    n_good, n_bad = _write_ingest(spark, _union(goods), _union(bads), path, rejects_path, "append",
                                  meta, (f"fedspark-ingest:{table}", len(meta["files"])))
    if n_good == 0 and not lake.exists(spark, path):
        raise UserError(f"{source.path}: no valid rows in {new} ({n_bad} rejected; reasons in table "
                        f"{table}{REJECTS_SUFFIX})")
    return {**summary, "version": lake.latest_version(spark, path), "rows": n_good, "rejected": n_bad}


def _union(frames: list[DataFrame]) -> DataFrame:
    out = frames[0]
    for frame in frames[1:]:
        out = out.unionByName(frame, allowMissingColumns=True)
    return out


