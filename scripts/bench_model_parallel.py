"""python scripts/bench_model_parallel.py [--features 2000000] [--classes 10] [--rows 20000]
                                      [--shards 1,2,4,8] [--row-blocks 1] [--batch-size 256]
                                      [--lake DIR] [--out FILE] [--master local[2]]

Model parallelism on a wide sparse table: softmax regression over `--features` hashed-style
features and `--classes` classes (features x classes first-layer parameters), trained with
`trainer.strategy: model_parallel` for one epoch at each number of feature blocks S, in one Spark
session on this machine.

The table (id, indices, values, label, split) is generated on the executors (udfs/data/synthetic.py, vocabulary_rows)
into `<lake>/sparse_<features>x<rows>` unless it is there already. Each run is the ordinary train
job (pipelines/train.py) with Adam, float32 and no validation hold-out; reported per S: seconds per
step (the epoch's wall time over its steps, which includes the one forward-only job an epoch
starts with), the run's train_seconds, test accuracy, and what Spark measured: the most parameters
any task held (max_param_block) against the layer's size over S, and the largest array bytes a task
received and returned. One JSON object per run is appended to --out as it finishes; the markdown
table is printed at the end. Run it through scripts/bench_model_parallel.sh, wrapped in
`flock /tmp/fedspark-bench.lock`.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python or spark-submit): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime
import json
import os
import tempfile
import time
from functools import partial
from typing import Any

from pyspark.sql import SparkSession

from pipelines import train
from pipelines.core.cli import main_wrapper
from pipelines.core.session import build_session
from pipelines.data import lake
from scripts.benchlib import log, machine, versions
from udfs.data import synthetic

ROOT = Path(__file__).resolve().parents[1]


def ensure_table(spark: SparkSession, lake_path: str, args: argparse.Namespace) -> str:
    name = f"sparse_{args.features}x{args.rows}"
    path = lake.table_path(lake_path, name)
    if lake.exists(spark, path):
        log(f"table {name} exists")
        return name
    started = time.perf_counter()
    (spark.range(0, args.rows, numPartitions=4)
     .mapInArrow(partial(synthetic.vocabulary_rows, features=args.features, classes=args.classes,
                         informative=args.informative, noise=args.noise, seed=args.seed),
                 synthetic.VOCABULARY_SCHEMA)
     .write.format("delta").mode("overwrite").save(path))
    log(f"generated {name} in {time.perf_counter() - started:.1f} s")
    return name


def run(table: str, shards: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    name = f"mp-s{shards}-r{args.row_blocks}-{int(time.time())}"
    sets = {"lake.path": args.lake, "runs.path": str(runs), "data.table": table,
            "data.partitions": args.row_blocks, "data.validation_fraction": 0.0,
            "model.kind": "softmax", "trainer.strategy": "model_parallel", "trainer.epochs": 1,
            "trainer.batch_size": args.batch_size, "trainer.dtype": "float32",
            "model_parallel.shards": shards}
    argv = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")] + ["--run-name", name]
    started = time.perf_counter()
    code = main_wrapper(train.main, argv)
    wall = time.perf_counter() - started
    if code:
        return {"shards": shards, "error": f"exit {code}", "wall_seconds": round(wall, 1)}
    run_dir = next(runs.glob(f"{name}-*"))   # a named run's directory is <name>-<UTC time>
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    steps = -(-summary["data"]["train_rows"] // args.batch_size)
    layer = args.features * args.classes
    return {"shards": shards, "row_blocks": args.row_blocks, "steps": steps,
            "seconds_per_step": round(epoch["seconds"] / steps, 3),
            "train_seconds": summary["train_seconds"], "test_accuracy": summary["test_accuracy"],
            "max_param_block": summary["max_param_block"], "layer_over_s": -(-layer // shards),
            "max_task_bytes": summary["max_task_bytes"], "blocks_seconds": summary["timings"]["blocks"],
            "wall_seconds": round(wall, 1)}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| S | steps | s/step | train s | test acc. | max_param_block | layer/S | max bytes in / out |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['shards']} | {r['error']} | | | | | | |")
            continue
        b = r["max_task_bytes"]
        lines.append(f"| {r['shards']} | {r['steps']} | {r['seconds_per_step']} | {r['train_seconds']} | "
                     f"{r['test_accuracy']:.4f} | {r['max_param_block']:,} | {r['layer_over_s']:,} | "
                     f"{b['received']:,} / {b['returned']:,} |")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_model_parallel.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--features", type=int, default=2_000_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--informative", type=int, default=10)
    p.add_argument("--noise", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=ints, default=[1, 2, 4, 8])
    p.add_argument("--row-blocks", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lake", default=str(ROOT / "lake"))
    p.add_argument("--out", type=Path)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="6g")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = build_session("fedspark-bench-model-parallel", {
        "spark.master": args.master, "spark.driver.memory": args.driver_memory})
    spark.sparkContext.setLogLevel("ERROR")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "load_before": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "runs": []}
    table = ensure_table(spark, args.lake, args)
    with tempfile.TemporaryDirectory(prefix="bench-mp-") as runs:
        for shards in args.shards:
            log(f"S={shards}")
            result = run(table, shards, args, Path(runs))
            log(json.dumps(result))
            report["runs"].append(result)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps({**result, "date": report["date"]}) + "\n")
    report["load_after"] = os.getloadavg()
    print(json.dumps(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
