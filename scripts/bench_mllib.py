"""python scripts/bench_mllib.py [--only mlp,softmax] [--mlpc-iters 50,100,200,400]
                               [--lr-iters 50,100,200] [--max-epochs 30] [--lake DIR] [--out FILE]

Our `local` strategy against Spark MLlib on Fashion-MNIST, in one Spark session (local[2]):

  mlp      MLlib's MultilayerPerceptronClassifier [784, 128, 10] (l-bfgs) for each --mlpc-iters
           value, from scratch each time: its best test accuracy over those runs and the fit time of
           the run that got it; then our `local` MLP 784-128-10 (conf/fashion_mnist.yaml), epoch by
           epoch, until its test accuracy reaches MLlib's best: the training seconds that took.
  softmax  the same with MLlib's multinomial LogisticRegression against our softmax regression.

Both train on the train split less 20% held out (MLlib by a hash of the id, ours by the seeded
(shard, id) draw) and are tested on the 10,000 test images. Training seconds exclude the test
evaluations made to watch our accuracy. Prints one JSON object and a markdown table; run it through
scripts/bench_mllib.sh, which sets up Java, the venv and the Fashion-MNIST table first.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python or spark-submit): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime
import json
import time
from functools import partial
from typing import Any

from pyspark.sql import SparkSession

from pipelines.core.config import Config, load_config
from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data.blocks import load_blocks
from pipelines.training import data_parallel, mllib, runners
from scripts.benchlib import log, machine, versions
from udfs.training import tasks

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("mlp", "softmax")


def config_for(kind: str, lake_path: str, sets: tuple[str, ...] = ()) -> Config:
    return load_config(None, [f"lake.path={lake_path}", f"model.kind={kind}", *sets])


def mllib_runs(spark: SparkSession, kind: str, iters: list[int], lake_path: str) -> list[dict]:
    runs = []
    for n in iters:
        config = config_for(kind, lake_path, ("trainer.strategy=mllib", f"mllib.max_iter={n}"))
        result = mllib.fit(spark, config, partial(runners.builtin_spec, config))
        runs.append({"max_iter": n, "iterations": result.iterations,
                     "train_seconds": round(result.train_seconds, 2),
                     "test_accuracy": round(result.test["accuracy"], 4)})
        log(f"mllib {kind}: {runs[-1]}")
    return runs


def local_until(spark: SparkSession, kind: str, target: float, max_epochs: int,
                lake_path: str) -> dict[str, Any]:
    """Our `local` strategy epoch by epoch until the test accuracy reaches `target`."""
    config = config_for(kind, lake_path, ("trainer.strategy=local", f"trainer.epochs={max_epochs}"))
    t, sc = config.trainer, spark.sparkContext
    data = load_blocks(spark, lake_path, lake.TableRef(config.data.table), config.data.partitions,
                       t.seed, config.data.validation_fraction)
    spec = runners.model_spec(config, data.n_features, data.n_classes)
    opt = data_parallel.optimizer_from(config)
    job = tasks.Job(spec, data.layout, t.dtype, t.batch_size, opt)
    theta = runners.initial_theta(config, spec)
    state = data_parallel.TrainState(theta, opt.init_state(theta))
    curve: list[list[float]] = []
    seconds = 0.0
    try:
        for epoch in range(1, max_epochs + 1):
            settings = data_parallel.Settings("local", epoch, t.average_every, t.aggregation_depth)
            started = time.perf_counter()
            state = data_parallel.train(sc, data, job, settings, state, lambda s, r: None)
            seconds += time.perf_counter() - started
            accuracy = data_parallel.evaluate(sc, data, spec, t.dtype, state.theta, ("test",))["test"]["accuracy"]
            curve.append([epoch, round(seconds, 2), round(accuracy, 4)])
            log(f"local {kind}: epoch {epoch} {seconds:.1f} s test_accuracy {accuracy:.4f}")
            if accuracy >= target:
                break
    finally:
        data.release()
    reached = next((c for c in curve if c[2] >= target), None)
    return {"target": target, "reached_at_epoch": reached[0] if reached else None,
            "train_seconds": reached[1] if reached else None, "curve": curve}


def part(spark: SparkSession, kind: str, iters: list[int], args: argparse.Namespace) -> dict[str, Any]:
    runs = mllib_runs(spark, kind, iters, args.lake)
    best = max(runs, key=lambda r: (r["test_accuracy"], -r["train_seconds"]))
    ours = local_until(spark, kind, best["test_accuracy"], args.max_epochs, args.lake)
    speedup = (round(best["train_seconds"] / ours["train_seconds"], 1)
               if ours["train_seconds"] else None)
    return {"mllib_runs": runs, "mllib_best": best, "local": ours, "times_sooner": speedup}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | MLlib best accuracy (max_iter) | MLlib fit s | our local: epochs to that accuracy | "
             "local train s | x sooner |", "|---|---|---:|---|---:|---:|"]
    for kind, r in report["parts"].items():
        b, o = r["mllib_best"], r["local"]
        lines.append(f"| {kind} | {b['test_accuracy']} ({b['max_iter']}) | {b['train_seconds']} | "
                     f"{o['reached_at_epoch'] or 'not in ' + str(len(o['curve']))} | "
                     f"{o['train_seconds'] if o['train_seconds'] is not None else '-'} | "
                     f"{r['times_sooner'] if r['times_sooner'] is not None else '-'} |")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_mllib.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=list(PARTS))
    p.add_argument("--mlpc-iters", type=ints, default=[50, 100, 200, 400])
    p.add_argument("--lr-iters", type=ints, default=[50, 100, 200])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--lake", default=str(ROOT / "lake"))
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = build_session("fedspark-bench-mllib", {"spark.master": "local[2]"})
    spark.sparkContext.setLogLevel("ERROR")
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "versions": versions(), "parts": {}}
    iters = {"mlp": args.mlpc_iters, "softmax": args.lr_iters}
    for kind in args.only:
        report["parts"][kind] = part(spark, kind, iters[kind], args)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    spark.stop()
    print(json.dumps(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
