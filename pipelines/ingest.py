"""spark-submit pipelines/ingest.py --source idx:DIR | csv:PATH | parquet:PATH | libsvm:PATH --table NAME

Validate raw data and write it to a Delta training table (id long, features array<float> -- or, from
LibSVM, sparse struct<size, indices, values> --, label int or double, split string, optional
client_id string). Bad rows go to `<NAME>_rejects` with their row
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
import time
from pathlib import Path

from pipelines.core.cli import add_verbose, main_wrapper, print_summary
from pipelines.core.config import DEFAULT_FILE, load_config
from pipelines.core.progress import progress
from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data.sources import REJECTS_SUFFIX, Source, ingest


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ingest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="idx:DIR | csv:PATH | parquet:PATH | libsvm:PATH")
    p.add_argument("--table", required=True, help="Delta table name under lake.path")
    p.add_argument("--label", default="label", help="label column (csv, parquet)")
    p.add_argument("--features", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="feature columns, comma-separated (default: every other column)")
    p.add_argument("--features-prefix", help="take the columns whose names start with this")
    p.add_argument("--classes", type=int, help="number of classes: labels must be 0..N-1 "
                   "(without it the label is a regression target)")
    p.add_argument("--client-column", help="column to keep as client_id (federated data)")
    p.add_argument("--num-features", type=int, help="LibSVM: the dimension, indices 1..N (default: "
                   "the largest index in the file; required for a directory)")
    p.add_argument("--categorical", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   metavar="COL,...", help="one-hot encode these columns after the numeric features: "
                   "vocabulary from the train split, plus an 'other' slot for unseen values")
    p.add_argument("--hash-buckets", type=int, metavar="N",
                   help="with --categorical: hash each value into one of N slots instead (high cardinality)")
    p.add_argument("--encoding-from", metavar="TABLE",
                   help="encode the categorical columns as TABLE's ingest did (rows to score with a "
                   "model trained on TABLE)")
    p.add_argument("--allow-missing", action="store_true",
                   help="keep an empty numeric cell as a missing value (NaN) instead of rejecting "
                   "the row; train with data.impute")
    p.add_argument("--config", help="job config whose lake.path and spark.conf apply "
                   "(default: conf/default.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lake.path=/data/lake")
    add_verbose(p)
    args = p.parse_args(argv)
    if args.classes is not None and args.classes < 2:
        p.error("--classes must be at least 2")
    if args.num_features is not None and args.num_features < 1:
        p.error("--num-features must be at least 1")
    if args.hash_buckets is not None and (args.hash_buckets < 1 or not args.categorical):
        p.error("--hash-buckets needs --categorical and must be at least 1")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    source = Source.parse(args.source)
    lake.TableRef.parse(args.table)
    config = load_config(args.config or DEFAULT_FILE, args.sets)
    started = time.perf_counter()
    spark = build_session("fedspark-ingest", config.spark.conf, config.spark.delta_packages)
    with progress(spark.sparkContext, f"ingest {args.source} into {args.table}"):
        summary = ingest(spark, source, args.table, config.lake.path, args)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if summary["rejected"]:
        print(f"{summary['rejected']} row(s) rejected: see table {args.table}{REJECTS_SUFFIX}",
              flush=True)
    print_summary(summary)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
