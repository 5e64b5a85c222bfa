"""spark-submit pipelines/generate.py --table NAME --rows N --features D [--classes K]
                                     [--task classification|regression] [--partitions P] [--seed S]
                                     [--density F] [--noise S]

Write a synthetic training table to Delta, generated on the executors (the driver draws only the
true model), and the true model beside it as the table `<NAME>_truth` (one row per model output:
`output` int, `weights` array<double>, `bias` double) so tests and benchmarks can check recovery.
Dense tables have the training-table schema; with --density < 1 `features` is the sparse
struct<size int, indices array<int>, values array<float>>. How rows and labels are drawn:
udfs/data/synthetic.py. The options are stored in the Delta commit like an ingest's: generating the same
table again writes nothing; a table fedspark did not write is never overwritten.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time

from pipelines.core.cli import add_verbose, main_wrapper, print_summary
from pipelines.core.config import DEFAULT_FILE, load_config
from pipelines.core.errors import UserError
from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data.sources import REJECTS_SUFFIX
from pipelines.data.synthetic_tables import TRUTH_SUFFIX, generate_table
from udfs.data import synthetic


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--table", required=True, help="Delta table name under lake.path")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--classes", type=int, help="classes (classification; default 2)")
    p.add_argument("--task", choices=("classification", "regression"), default="classification")
    p.add_argument("--partitions", type=int, default=4, help="Spark tasks (and files) that write it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--density", type=float, default=1.0,
                   help="share of non-zero features per row; < 1 writes a sparse features column")
    p.add_argument("--noise", type=float, default=1.0,
                   help="label noise scale (1 = labels drawn from the true model's probabilities)")
    p.add_argument("--config", help="job config whose lake.path and spark settings apply")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    add_verbose(p)
    args = p.parse_args(argv)
    if args.rows < 1 or args.features < 1 or args.partitions < 1:
        p.error("--rows, --features and --partitions must be at least 1")
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density must be in (0, 1], got {args.density}")
    if args.noise < 0:
        p.error(f"--noise must be >= 0, got {args.noise}")
    if args.task == "regression" and args.classes is not None:
        p.error("--classes is for --task classification")
    if args.task == "classification" and (args.classes or 2) < 2:
        p.error("--classes must be at least 2")
    return args


def spec_of(args: argparse.Namespace) -> synthetic.Spec:
    classes = 0 if args.task == "regression" else (args.classes or 2)
    return synthetic.Spec(args.rows, args.features, classes, args.density, args.noise, args.seed,
                         args.partitions)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    lake.TableRef.parse(args.table)
    if args.table.endswith(TRUTH_SUFFIX) or args.table.endswith(REJECTS_SUFFIX):
        raise UserError(f"--table {args.table!r}: names ending in {TRUTH_SUFFIX} or "
                        f"{REJECTS_SUFFIX} are kept for fedspark's own tables")
    config = load_config(args.config or DEFAULT_FILE, args.sets)
    started = time.perf_counter()
    spark = build_session("fedspark-generate", config.spark.conf, config.spark.delta_packages)
    summary = generate_table(spark, config.lake.path, args.table, spec_of(args))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    print_summary(summary)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
