"""python scripts/bench_fashion_mnist.py [--only numpy,tensorflow,local,sync,mllib] [--sync-epochs N]
                                       [--mllib-iters N] [--tf-seed FILE] [--lake DIR] [--out FILE]

Benchmark the seed's sample job (conf/fashion_mnist.yaml: MLP 784-128-10, Adam lr 0.001, 5 epochs,
batch 64, 20% of the train split held out, tested on the test split) in one run on this machine:

  numpy   the floor: one process, one BLAS thread, the same maths (udfs.core.models / udfs.core.optimizers)
  tensorflow  the seed's own program (../shared/bench/tf_seed.py: Keras, MultiWorkerMirroredStrategy),
          run in a venv of its own (TF_VENV, created with TF_REQUIREMENTS when missing)
  local   spark-submit pipelines/train.py --set trainer.strategy=local
  sync    spark-submit pipelines/train.py --set trainer.strategy=sync (barrier stages, one per epoch)
  sample  scripts/train.sh, what a user runs (the sample job), once per seed of --seeds
  mllib   Spark MLlib's MultilayerPerceptronClassifier (l-bfgs) on the same Delta table

Prints one JSON object (machine, versions, date, results, ratios to the numpy floor) and a markdown
table. Progress and the children's output go to stderr. Run it through scripts/bench_fashion_mnist.sh
so Java, the venv and the dataset are set up first.
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
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from pipelines.core.config import Config, load_config
from pipelines.training.data_parallel import (
    optimizer_from,  # the Optimizer the jobs build from the same config
)
from scripts.benchlib import (
    DATA_DIR,
    BenchError,
    emit,
    load_split,
    log,
    machine,
    peer_venv,
    spark_submit,
    versions,
)
from udfs.core import models
from udfs.core.models import ModelSpec
from udfs.core.seeding import Stream, rng
from udfs.data.blocks import validation_mask
from udfs.training.tasks import steps_per_epoch  # global mini-batch steps, counted as the strategies do

ROOT = Path(__file__).resolve().parents[1]

WAYS = ("numpy", "tensorflow", "local", "sync", "sample", "mllib")
BLAS_DIR = Path("/usr/lib/x86_64-linux-gnu")
MLLIB_JOB_FLAG = "--mllib-job"  # internal: this file re-run under spark-submit as the MLlib job
TF_SEED = ROOT.parent / "shared" / "bench" / "tf_seed.py"   # the seed's program, beside the clone
TF_VENV = Path(os.environ.get("FEDSPARK_TF_VENV", "/tmp/tf-venv"))
TF_REQUIREMENTS = ("tensorflow-cpu==2.21.0",)   # a peer: its own venv, never our dependencies


# --- the job being measured ----------------------------------------------------------------------

def sample_config(lake_path: Path) -> Config:
    """The seed's sample job (conf/fashion_mnist.yaml) with our lake: every way reads its
    hyper-parameters from here, so the benchmark cannot drift from the job it claims to measure."""
    return load_config(None, [f"lake.path={lake_path}"])


def mlp_spec(config: Config, n_features: int, n_classes: int) -> ModelSpec:
    """The layers train.py builds for this config and data (784-128-10 for Fashion-MNIST)."""
    return ModelSpec.build(config.model.kind, n_features, n_classes, config.model.hidden)


def held_out(n_train_split: int, config: Config) -> np.ndarray:
    """Mask of the validation rows among the train split in id order, drawn by the run seed with the
    project's own draw (udfs.blocks.validation_mask). numpy and mllib use it, so both train on
    exactly the same 48,000 rows; local/sync draw the same count over their (shard, id) order."""
    n_validation = int(round(config.data.validation_fraction * n_train_split))
    return validation_mask(n_train_split, n_validation, config.trainer.seed)


# --- 1. numpy floor ------------------------------------------------------------------------------

def accuracy(spec: ModelSpec, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return float((models.predict(spec, theta, X) == y).mean())


def run_numpy(config: Config, _: argparse.Namespace) -> dict[str, Any]:
    """Plain mini-batch Adam in one process with one BLAS thread: what one Spark task could do
    alone, i.e. the time below which no data-parallel strategy on this machine is a win per core."""
    from threadpoolctl import threadpool_limits

    t = config.trainer
    X_all, y_all = load_split("train")
    X_test, y_test = load_split("test")
    mask = held_out(len(y_all), config)
    X, y = X_all[~mask], y_all[~mask]
    spec = mlp_spec(config, X.shape[1], int(y_all.max()) + 1)
    opt = optimizer_from(config)
    theta = models.init_params(spec, rng(t.seed, Stream.INIT), config.model.init, np.dtype(t.dtype))
    state = opt.init_state(theta)
    steps = steps_per_epoch(len(y), t.batch_size)
    losses = []
    with threadpool_limits(1):
        started = time.perf_counter()
        for epoch in range(t.epochs):
            order = rng(t.seed, Stream.SYNC_EPOCH, epoch).permutation(len(y))
            loss_sum = 0.0
            for step in range(steps):
                rows = order[step * t.batch_size:(step + 1) * t.batch_size]
                loss, grad = models.loss_and_grad(spec, theta, X[rows], y[rows])
                opt.step(theta, grad, state, epoch * steps + step + 1)
                loss_sum += loss
            losses.append(round(loss_sum / steps, 4))
        seconds = time.perf_counter() - started
    return {
        "train_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / (t.epochs * steps), 6),
        "epochs": t.epochs,
        "steps": t.epochs * steps,
        "train_rows": int(len(y)),
        "train_loss_per_epoch": losses,
        "validation_accuracy": accuracy(spec, theta, X_all[mask], y_all[mask]),
        "test_accuracy": accuracy(spec, theta, X_test, y_test),
        "test_rows": int(len(y_test)),
    }


def ensure_table(config: Config) -> None:
    """Ingest Fashion-MNIST into the lake when its Delta table is missing (as scripts/train.sh)."""
    table = Path(config.lake.path) / config.data.table
    if (table / "_delta_log").is_dir():
        return
    log(f"no Delta table at {table}: ingesting {DATA_DIR}")
    spark_submit("ingest", "pipelines/ingest.py",
                 ["--source", f"idx:{DATA_DIR}", "--table", config.data.table,
                  "--set", f"lake.path={config.lake.path}"])


# --- 2. our strategies ---------------------------------------------------------------------------

def run_strategy(strategy: str, config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """A real `spark-submit pipelines/train.py` run of the sample job with one strategy."""
    epochs = args.sync_epochs if strategy == "sync" else config.trainer.epochs
    summary = spark_submit(strategy, "pipelines/train.py", [
        "--set", f"trainer.strategy={strategy}",
        "--set", f"trainer.epochs={epochs}",
        "--set", f"lake.path={config.lake.path}",
        "--set", f"runs.path={args.runs_dir}",
    ])
    steps = epochs * steps_per_epoch(summary["data"]["train_rows"], summary["batch_size"])
    result = {key: summary[key] for key in ("train_seconds", "total_seconds", "timings",
                                            "test_accuracy", "test_loss", "epochs")}
    result.update(wall_seconds=summary["wall_seconds"], steps=steps, data=summary["data"])
    if strategy == "sync":
        result["seconds_per_step"] = round(summary["train_seconds"] / steps, 6)
    return result


def run_sample(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """What a user runs: `scripts/train.sh` as it is (the sample job, sync), whole process timed
    from here, once per seed of --seeds, one after another. The earlier ways built the same table
    version's blocks, so these runs find them in the block cache. Reports each run, the median test
    accuracy, and the lines the console showed (stdout and stderr together)."""
    runs = []
    for seed in args.seeds:
        cmd = ["bash", str(ROOT / "scripts" / "train.sh"), "--set", f"trainer.seed={seed}",
               "--set", f"lake.path={config.lake.path}", "--set", f"runs.path={args.runs_dir}"]
        log(f"sample: {' '.join(cmd)}")
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"sample: scripts/train.sh exited with {done.returncode}: {done.stderr[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append({"seed": seed, "total_seconds": round(wall, 3), "train_seconds": summary["train_seconds"],
                     "timings": summary["timings"], "test_accuracy": summary["test_accuracy"],
                     "console_lines": len(done.stdout.splitlines()) + len(done.stderr.splitlines())})
    first = runs[0]
    return {**first, "epochs": config.trainer.epochs, "runs": runs,
            "median_test_accuracy": statistics.median(r["test_accuracy"] for r in runs)}


# --- 3. the seed's TensorFlow program ----------------------------------------------------------

def run_tensorflow(_: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The seed's program as it is (its hyper-parameters are the sample job's), in its own venv on
    the same IDX files; its last stdout line is its JSON. Whole-process seconds are timed from
    here, interpreter start included, like spark-submit's."""
    if not args.tf_seed.is_file():
        raise BenchError(f"--tf-seed {args.tf_seed}: no such file")
    python = peer_venv(TF_VENV, TF_REQUIREMENTS)
    cmd = [str(python), str(args.tf_seed)]
    log(f"tensorflow: {' '.join(cmd)}")
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "FASHION_MNIST_DIR": str(DATA_DIR)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"tensorflow: exited with {done.returncode}: {done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BenchError(f"tensorflow: last stdout line is not its JSON: {lines[-1:]!r}") from exc
    return {"train_seconds": summary["fit_s"], "total_seconds": round(wall, 3),
            "test_accuracy": summary["test_acc"], "test_loss": summary["test_loss"], "epochs": 5,
            "timings": {k: summary[k] for k in ("import_s", "fit_s", "eval_s", "whole_s")},
            "strategy": summary["strategy"], "tensorflow": summary["tf"],
            "requirements": list(TF_REQUIREMENTS)}


# --- 4. Spark MLlib ------------------------------------------------------------------------------

def native_blas_files() -> list[str]:
    """System BLAS libraries netlib-java could load; without one MLlib falls back to Java BLAS."""
    if not BLAS_DIR.is_dir():
        return []
    return sorted(p.name for p in BLAS_DIR.iterdir()
                  if p.name.startswith("libblas.so.3") or p.name.startswith("libopenblas"))


def run_mllib(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """MLlib's MultilayerPerceptronClassifier as its own spark-submit job (this file, MLLIB_JOB_FLAG),
    so its JVM, like the strategies', starts from nothing and is gone afterwards."""
    summary = spark_submit("mllib", str(Path(__file__).resolve()),
                           [MLLIB_JOB_FLAG, "--lake", str(config.lake.path),
                            "--mllib-iters", str(args.mllib_iters)])
    summary["total_seconds"] = summary["wall_seconds"]  # spark-submit start to exit, as train.py's
    files = native_blas_files()
    summary["native_blas_files"] = files
    # what the JVM loaded decides; the file check stands in when the JVM could not be asked
    known = summary["jvm_blas"] != "unknown"
    summary["native_blas"] = "JNIBLAS" in summary["jvm_blas"] if known else bool(files)
    return summary


def jvm_blas(spark: Any) -> str:
    """The BLAS class MLlib's MLP multiplies with. Spark's `BLAS.nativeBLAS` (not reachable from
    py4j) is netlib's NativeBLAS when a system library loads and JavaBLAS otherwise; ask the same
    two in the same order."""
    netlib = spark.sparkContext._jvm.dev.ludovic.netlib.blas
    for getter in (netlib.NativeBLAS.getInstance, netlib.JavaBLAS.getInstance):
        try:
            return str(getter().getClass().getName())
        except Exception:  # noqa: BLE001 - no native library: try the Java one
            continue
    return "unknown"


def mllib_job(args: argparse.Namespace) -> None:
    """Runs inside spark-submit: fit the MLP with l-bfgs on the numpy floor's 48,000 rows of the
    Delta table and test it on the test split; print the summary JSON as the last stdout line."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from pipelines.core.session import build_session
    from pipelines.data import lake

    config = sample_config(args.lake)
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    spark = build_session("fedspark-bench-mllib", config.spark.conf)
    timings["session"] = time.perf_counter() - mark

    mark = time.perf_counter()
    df, version = lake.read(spark, config.lake.path, lake.TableRef(config.data.table,
                                                                   config.data.version))
    rows = df.select("id", array_to_vector(F.col("features")).alias("features"),
                     F.col("label").cast("double").alias("label"), "split")
    train_ids = np.array(sorted(r.id for r in df.filter("split = 'train'").select("id").collect()))
    held = spark.createDataFrame([(int(i),) for i in train_ids[held_out(len(train_ids), config)]],
                                 "id long")
    parts = config.data.partitions  # as many tasks as the strategies use
    train = (rows.filter("split = 'train'").join(held, "id", "left_anti")
             .repartition(parts).cache())
    test = rows.filter("split = 'test'").repartition(parts).cache()
    n_train, n_test = train.count(), test.count()
    first = train.first()
    if first is None:
        raise BenchError(f"table {config.data.table!r} has no training rows")
    n_features = len(first.features)
    top = train.agg(F.max("label")).first()
    assert top is not None  # a global aggregate has exactly one row
    n_classes = int(top[0]) + 1
    timings["data"] = time.perf_counter() - mark

    layers = list(mlp_spec(config, n_features, n_classes).layers)
    mlp = MultilayerPerceptronClassifier(layers=layers, solver="l-bfgs", maxIter=args.mllib_iters,
                                         seed=config.trainer.seed)
    mark = time.perf_counter()
    model = mlp.fit(train)
    timings["fit"] = time.perf_counter() - mark

    mark = time.perf_counter()
    test_accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        model.transform(test))
    timings["evaluate"] = time.perf_counter() - mark
    iterations = None
    if model.hasSummary:
        iterations = int(model.summary().totalIterations)
    print(json.dumps({
        "train_seconds": round(timings["fit"], 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "test_accuracy": test_accuracy,
        "layers": layers, "solver": "l-bfgs", "max_iter": args.mllib_iters, "iterations": iterations,
        "table": config.data.table, "version": version, "partitions": parts,
        "train_rows": n_train, "test_rows": n_test,
        "jvm_blas": jvm_blas(spark),
    }), flush=True)
    spark.stop()


# --- report --------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Config, argparse.Namespace], dict[str, Any]]] = {
    "numpy": run_numpy, "tensorflow": run_tensorflow, "local": partial(run_strategy, "local"),
    "sync": partial(run_strategy, "sync"), "sample": run_sample, "mllib": run_mllib}


def job_description(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    t, o = config.trainer, config.trainer.optimizer
    return {"config": "conf/fashion_mnist.yaml", "table": config.data.table,
            "lake": str(config.lake.path), "model": config.model.kind,
            "hidden": config.model.hidden, "optimizer": {"name": o.name, "lr": o.lr, "eps": o.eps},
            "epochs": t.epochs, "sync_epochs": args.sync_epochs, "batch_size": t.batch_size,
            "validation_fraction": config.data.validation_fraction, "seed": t.seed,
            "partitions": config.data.partitions, "mllib_max_iter": args.mllib_iters}


def ratio(value: float | None, floor: float | None) -> float | None:
    return round(value / floor, 2) if value is not None and floor else None


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each way's training seconds over the numpy floor's, with its test accuracy beside it. Per
    step too where a step is the same global mini-batch (numpy, sync): that ratio still holds when
    sync ran fewer epochs than the floor."""
    floor = results.get("numpy", {})
    out = {}
    for way, r in results.items():
        if "train_seconds" not in r:
            continue
        out[way] = {"train_seconds": r["train_seconds"],
                    "x_numpy": ratio(r["train_seconds"], floor.get("train_seconds")),
                    "test_accuracy": r.get("test_accuracy")}
        if "seconds_per_step" in r:
            out[way]["x_numpy_per_step"] = ratio(r["seconds_per_step"], floor.get("seconds_per_step"))
    return out


def notes(config: Config, args: argparse.Namespace, results: dict[str, Any]) -> list[str]:
    """Caveats a reader of the numbers must see next to them."""
    found = []
    if "sync" in results and args.sync_epochs != config.trainer.epochs:
        found.append(f"sync ran {args.sync_epochs} of {config.trainer.epochs} epochs: its training "
                     "time and test accuracy are not comparable with the other ways "
                     "(seconds_per_step is)")
    if "mllib" in results and "native_blas" in results["mllib"]:
        if not results["mllib"]["native_blas"]:
            found.append("no native BLAS (libblas.so.3 / libopenblas not in /usr/lib/x86_64-linux-gnu): "
                         f"MLlib ran with its Java fallback ({results['mllib'].get('jvm_blas')})")
        found.append(f"mllib is a different optimizer (full-batch l-bfgs, maxIter={args.mllib_iters}), "
                     "not Adam on mini-batches: compare its time-to-accuracy, not per-step cost")
    strategies = {"local", "sync"} & set(results)
    if strategies and {"numpy", "mllib"} & set(results):
        found.append("numpy and mllib hold out the same 20% of the train split (seeded, id order); "
                     "local and sync hold out as many rows, drawn by the same seed over their "
                     "(shard, id) order")
    if strategies:
        found.append("train seconds of local and sync include their per-epoch validation pass")
    if "tensorflow" in results:
        found.append("tensorflow is the seed's program unchanged: Keras's validation_split holds out the "
                     "last 20% of the train split (not a seeded draw), its train seconds are `fit` "
                     "(with its per-epoch validation) and its total seconds the whole process, "
                     "interpreter start included; TensorFlow uses every core it finds")
    return found


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    rows = ["| way | train s | x numpy | test accuracy | epochs / iters | ms per step (x numpy) "
            "| total s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for way, r in report["results"].items():
        if "error" in r:
            rows.append(f"| {way} | failed: {r['error'].splitlines()[0]} | | | | | |")
            continue
        rel = report["ratios"].get(way, {})
        length = r.get("epochs", f"{r.get('iterations')} it")
        per_step = "-"
        if "seconds_per_step" in r:
            per_step = (f"{r['seconds_per_step'] * 1000:.2f} "
                        f"({fmt(rel.get('x_numpy_per_step'), '.0f')}x)")
        rows.append(f"| {way} | {fmt(r['train_seconds'], '.2f')} | {fmt(rel.get('x_numpy'), '.2f')} "
                    f"| {fmt(r.get('test_accuracy'), '.4f')} | {length} "
                    f"| {per_step} | {fmt(r.get('total_seconds'), '.1f')} |")
    return "\n".join(rows + [""] + [f"- {n}" for n in report["notes"]])


# --- main ----------------------------------------------------------------------------------------

def parse_ways(text: str) -> list[str]:
    ways = [w.strip() for w in text.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown or not ways:
        raise argparse.ArgumentTypeError(f"choose from {','.join(WAYS)}, got {text!r}")
    return [w for w in WAYS if w in ways]  # always the same order: floor first


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_fashion_mnist.py", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=parse_ways, default=list(WAYS), metavar="WAYS",
                   help=f"comma-separated subset of {','.join(WAYS)} (default: all)")
    p.add_argument("--sync-epochs", type=positive, default=5,
                   help="epochs for sync (default 5, the full job; 1 for a smoke run)")
    p.add_argument("--mllib-iters", type=positive, default=100, help="MLlib l-bfgs maxIter")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2],
                   help="seeds the sample way runs scripts/train.sh with (default 0,1,2)")
    p.add_argument("--tf-seed", type=Path, default=TF_SEED,
                   help=f"the seed's TensorFlow program (default: {TF_SEED})")
    p.add_argument("--lake", type=Path, default=ROOT / "lake",
                   help="lake directory holding the fashion_mnist Delta table (default: ./lake)")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument(MLLIB_JOB_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lake = args.lake.resolve()
    return args


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    config = sample_config(args.lake)
    report: dict[str, Any] = {
        "benchmark": "fashion_mnist sample job",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "job": job_description(config, args),
        "results": {}}
    if any(way != "numpy" for way in args.only):
        ensure_table(config)
    with tempfile.TemporaryDirectory(prefix="fedspark-bench-runs-") as runs_dir:
        args.runs_dir = runs_dir
        for way in args.only:
            log(f"{way}: starting")
            try:
                report["results"][way] = RUNNERS[way](config, args)
            except (BenchError, OSError, KeyError, ValueError) as exc:
                log(f"{way}: FAILED: {exc}")
                report["results"][way] = {"error": str(exc)}
            log(f"{way}: {json.dumps(report['results'][way])[:300]}")
    report["ratios"] = ratios(report["results"])
    report["notes"] = notes(config, args, report["results"])
    return report


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.mllib_job:
        mllib_job(args)
        return 0
    return emit(run_all(args), args.out, markdown)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
