"""spark-submit pipelines/stats.py --table NAME[@VERSION] [--config FILE] [--set KEY=VALUE ...]

Federated feature statistics of a training table's train split (count, mean, variance, missing
values, a fixed-bin histogram; min and max unless privacy.secure_aggregation), computed per client
and combined from sums only (pipelines/data/stats.py), written to the Delta table `<NAME>_stats`
keyed by the table version (a re-run replaces that version's rows). Prints one JSON line.
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
from pipelines.core.progress import progress
from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data import stats as feature_stats


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stats.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--table", required=True, metavar="NAME[@VERSION]",
                   help="the training table (default version: the latest)")
    p.add_argument("--config", help="job config: lake.path, the clients (trainer.strategy, "
                   "federated.*), privacy.secure_aggregation and stats.* (default: conf/default.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set stats.bins=20")
    add_verbose(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    ref = lake.TableRef.parse(args.table)
    config = load_config(args.config or DEFAULT_FILE, args.sets)
    started = time.perf_counter()
    spark = build_session("fedspark-stats", config.spark.conf, config.spark.delta_packages)
    with progress(spark.sparkContext, f"federated statistics of {ref.name}"):
        stats = feature_stats.compute(spark, config, ref)
        stats_version = feature_stats.write(spark, config.lake.path, stats)
    print_summary({**stats.summary(), "output": feature_stats.stats_table(ref.name),
                   "output_version": stats_version, "seconds": round(time.perf_counter() - started, 3)})


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
