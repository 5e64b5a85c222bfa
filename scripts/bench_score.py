"""python scripts/bench_score.py [--rows 10000000] [--features 100] [--classes 10] [--partitions 8]
                                [--lake DIR] [--out FILE]

Batch scoring throughput: `spark-submit pipelines/score.py` on a synthetic table (written by
pipelines/generate.py when missing) in local[2] with `spark.driver.maxResultSize=1m`, so the job can
only succeed if nothing is collected on the driver, against a single-process numpy predict of the
same rows with the same maths (udfs.core.models: one decision, then labels and probabilities from it;
one BLAS thread). The
model is a softmax regression with random weights: scoring cost does not depend on their values.

Prints one JSON object (machine, versions, date, results, ratio) and a markdown table; progress on
stderr. Run it through scripts/bench_score.sh so Java and the venv are set up first.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python or spark-submit): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime
import json
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from pipelines.store import artifacts, rundir
from scripts.benchlib import log, machine, spark_submit, versions
from udfs.core import models
from udfs.core.models import ModelSpec, init_params

ROOT = Path(__file__).resolve().parents[1]

SPARK_CONF = {"spark.master": "local[2]", "spark.driver.memory": "4g",
              "spark.driver.maxResultSize": "1m"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_score.py")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--lake", default=str(ROOT / "lake"))
    p.add_argument("--out", help="also write the JSON object to this file")
    return p.parse_args(argv)


def write_model(runs: Path, spec: ModelSpec) -> Path:
    path = runs / "bench-score-model"
    path.mkdir(parents=True)
    theta = init_params(spec, np.random.default_rng(0), "glorot_uniform", np.dtype("float32"))
    artifacts.save_model(rundir.open_run(path), spec, theta,
                         {"run_id": path.name, "table": "synthetic", "version": 0,
                          "n_classes": spec.n_classes})
    return path


def table_files(table: Path) -> list[Path]:
    """The Parquet files of the table's latest version, from its Delta log (adds minus removes)."""
    live: set[str] = set()
    for commit in sorted((table / "_delta_log").glob("*.json")):
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                live.add(action["add"]["path"])
            elif "remove" in action:
                live.discard(action["remove"]["path"])
    return [table / path for path in sorted(live)]


def numpy_floor(table: Path, spec: ModelSpec, theta: np.ndarray) -> dict[str, Any]:
    """Read each file with pyarrow (not timed as scoring), then predict it as score.py's UDF does."""
    rows, predict_seconds, read_seconds = 0, 0.0, 0.0
    with threadpool_limits(1):
        for path in table_files(table):
            started = time.perf_counter()
            column = pq.read_table(path, columns=["features"]).column("features").combine_chunks()
            X = np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1)
            read_seconds += time.perf_counter() - started
            started = time.perf_counter()
            out = models.decision(spec, theta, X)
            labels = models.labels_from_decision(spec, out).astype(np.float64)
            proba = models.probabilities(spec, out)
            predict_seconds += time.perf_counter() - started
            assert proba.shape[0] == len(labels)
            rows += len(labels)
    return {"rows": rows, "predict_seconds": round(predict_seconds, 3),
            "read_seconds": round(read_seconds, 3),
            "rows_per_second": round(rows / predict_seconds, 1)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    name = f"score_bench_{args.rows}x{args.features}"
    lake_set = ["--set", f"lake.path={args.lake}"]
    generated = spark_submit("generate", "pipelines/generate.py", [
        "--table", name, "--rows", str(args.rows), "--features", str(args.features),
        "--classes", str(args.classes), "--partitions", str(args.partitions), *lake_set],
        {"spark.master": "local[2]", "spark.driver.memory": "4g"})
    spec = ModelSpec.build("softmax", args.features, args.classes, [])
    with tempfile.TemporaryDirectory(prefix="fedspark-bench-score-") as tmp:
        run_dir = write_model(Path(tmp), spec)
        _, theta, _ = artifacts.load_model(run_dir)
        scored = spark_submit("score", "pipelines/score.py", [
            "--model", str(run_dir), "--input", name, "--output", f"{name}_scores", *lake_set],
            SPARK_CONF)
        log("numpy floor: predicting the same rows in one process")
        floor = numpy_floor(Path(args.lake) / name, spec, theta)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(),
        "table": {"name": name, "rows": args.rows, "features": args.features,
                  "classes": args.classes, "partitions": args.partitions,
                  "generate_skipped": generated.get("skipped")},
        "spark_conf": SPARK_CONF,
        "score_py": {k: scored[k] for k in ("rows", "seconds", "rows_per_second", "wall_seconds")},
        "numpy": floor,
        "ratio_numpy_to_score_py": round(floor["rows_per_second"] / scored["rows_per_second"], 2),
    }
    print(json.dumps(report, indent=2))
    print(f"\n| way | rows | seconds | rows/s |\n|---|---|---|---|\n"
          f"| score.py (local[2], maxResultSize=1m) | {scored['rows']:,} | {scored['seconds']:.1f} "
          f"| {scored['rows_per_second']:,.0f} |\n"
          f"| numpy predict (1 process, 1 thread) | {floor['rows']:,} | {floor['predict_seconds']:.1f} "
          f"| {floor['rows_per_second']:,.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
