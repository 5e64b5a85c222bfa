"""spark-submit pipelines/evaluate.py --model RUN_DIR [--table NAME[@VERSION]] [--split test]

Reload a saved model's weights and recompute its metrics on the executors from the table (by default
the table and version the run trained on, with the run's lake path and partitions), its features
transformed as the model's spec.json records. It never echoes a stored number: change a weight and
the result changes. Prints one JSON line.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from pipelines.core.cli import add_verbose, main_wrapper, print_summary
from pipelines.core.config import load_config
from pipelines.core.errors import UserError
from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data.blocks import load_blocks
from pipelines.data.direct import BlockCache
from pipelines.store import artifacts, rundir
from pipelines.training.data_parallel import evaluate
from udfs.data.transform import Transform

SPLITS = {"test": "test", "validation": "validation", "train": "train"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="a run directory (a path or a Hadoop URI)")
    p.add_argument("--table", help="NAME or NAME@VERSION (default: what the run trained on)")
    p.add_argument("--split", default="test", choices=sorted(SPLITS))
    add_verbose(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    run_dir = rundir.open_run(args.model)
    try:
        spec, theta, meta = artifacts.load_model(run_dir.uri)
        config_file = run_dir.fetch("config.yaml")
        if config_file is None:
            raise UserError(f"--model {run_dir}: not a run directory (no config.yaml)")
        config = load_config(config_file)
    finally:
        run_dir.close()
    ref = lake.TableRef.parse(args.table) if args.table else lake.TableRef(meta["table"], meta["version"])
    spark = build_session("fedspark-evaluate", config.spark.conf, config.spark.delta_packages)
    data = load_blocks(spark, config.lake.path, ref, config.data.partitions, config.trainer.seed,
                       config.data.validation_fraction, cache_gb=config.data.worker_cache_gb,
                       block_cache=BlockCache.of(config.data),
                       transform=Transform.from_dict(meta.get("transform")))
    if data.n_features != spec.n_features:
        raise UserError(f"table {ref.name}@{data.version} has {data.n_features} features; the model "
                        f"expects {spec.n_features}")
    role = SPLITS[args.split]
    metrics = evaluate(spark.sparkContext, data, spec, str(theta.dtype), theta, (role,)).get(role, {})
    data.release()
    if not metrics.get("rows"):
        raise UserError(f"table {ref.name}@{data.version} has no {args.split} rows")
    print_summary({"run_id": meta.get("run_id", run_dir.name), "table": ref.name,
                   "version": data.version, "split": args.split,
                   **{f"{args.split}_{k}": v for k, v in metrics.items()}})


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
