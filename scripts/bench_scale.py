"""Large-scale benchmark: `sync` full-batch gradient passes over generated tables, against MLlib's
LogisticRegression and a single-process numpy pass (the floor), with memory budgets.

For each size in --rows (binary logistic, --features columns, generated on the executors into
Delta by pipelines/generate.py; an existing identical table is reused):
  * blocks: build time, bytes on the executors' disks, how many the workers hold in memory;
  * ours: seconds per full-batch `sync` step (one barrier stage: every task sums the gradient over
    its training rows in chunks, the tasks all-reduce the sums and step), median of --passes;
  * memory, per size (build and passes): peak RSS of the JVM, peaks of the summed RSS and anonymous
    RSS of the Python workers, the driver Python's peak.
On the largest size (or --compare-rows) also:
  * MLlib LogisticRegression: fit times at two maxIter values (tol=0) and a converged fit (tol 1e-6,
    maxIter --mllib-converge) -> marginal seconds per iteration, fixed cost, the converged model's
    test accuracy;
  * time to accuracy: ours (Adam, full batch, blocks built inside the clock) until test accuracy is
    within 0.5 points of MLlib's converged model, vs MLlib's converged fit time;
  * the numpy floor: a separate process reads the table's Parquet files into one float32 array and
    times the same gradient (udfs.models.loss_and_grad) over it.
Prints one JSON object on stdout; progress on stderr; with --out, also rewrites that file with
what has been measured so far after every part (so a run killed part-way keeps its numbers). Run
through scripts/bench_scale.sh.
"""
from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.session import build_session
from pipelines.data import lake
from pipelines.data.blocks import Blocks, load_blocks
from pipelines.data.synthetic_tables import generate_table
from pipelines.store import artifacts
from pipelines.training.data_parallel import barrier_slots, evaluate, sync_steps
from scripts.benchlib import log, machine, versions
from udfs.core.models import ModelSpec
from udfs.core.optimizers import Optimizer
from udfs.data import blocks
from udfs.data import synthetic as synthetic
from udfs.training import tasks
from udfs.training.collective import PortRange

# --- memory ----------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "PPid"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ppid = _status(int(entry.name)).get("PPid")
            if ppid:
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class MemoryWatch:
    """Samples every `every` seconds: the JVM's RSS, the sum of its Python descendants' RSS (and
    anonymous RSS: memory-mapped block pages are file-backed page cache), the driver's peak."""

    def __init__(self, jvm_pid: int, every: float = 0.5):
        self.jvm_pid, self.every = jvm_pid, every
        self.peak = {"jvm_rss_mb": 0.0, "python_workers_rss_mb": 0.0,
                     "python_workers_anon_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        workers = [_status(p) for p in _descendants(self.jvm_pid)]
        jvm = _status(self.jvm_pid)
        now = {"jvm_rss_mb": jvm.get("VmRSS", 0) / 1024,
               "python_workers_rss_mb": sum(w.get("VmRSS", 0) for w in workers) / 1024,
               "python_workers_anon_mb": sum(w.get("RssAnon", 0) for w in workers) / 1024}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)

    def reset(self) -> None:
        """Start new peaks (per table size) from the current sample."""
        self.peak = dict.fromkeys(self.peak, 0.0)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, float]:
        return {**{k: round(v) for k, v in self.peak.items()},
                "driver_python_peak_mb": round(_status(os.getpid()).get("VmHWM", 0) / 1024)}


# --- our passes ------------------------------------------------------------------------------------

def ensure_table(spark, lake_path: str, rows: int, features: int, partitions: int) -> str:
    name = f"scale_{rows}x{features}"
    spec = synthetic.Spec(rows, features, 2, 1.0, 1.0, 0, partitions)
    started = time.perf_counter()
    out = generate_table(spark, lake_path, name, spec)
    log(f"{name}: {'reused' if out['skipped'] else 'generated'} in {time.perf_counter() - started:.1f}s")
    return name


def gradient_pass(sc, got: Blocks, job: tasks.Job, theta: np.ndarray, state: dict, step: int):
    """One full-batch `sync` step (a barrier stage of one step) from (theta, state): the new pair."""
    theta, state, _, _ = sync_steps(sc, got, job, (theta, state), step, step + 1, PortRange(),
                                    barrier_slots(sc))
    return theta, state


def measure_passes(spark, lake_path: str, table: str, args) -> dict:
    sc = spark.sparkContext
    started = time.perf_counter()
    got = load_blocks(spark, lake_path, lake.TableRef(table), args.block_partitions, 0, 0.0,
                           cache_gb=args.cache_gb)
    build = time.perf_counter() - started
    spec = ModelSpec("logistic", (got.n_features, 1))
    job = tasks.Job(spec, got.layout, "float32", got.layout.n_train, Optimizer("sgd", 1.0))
    theta = np.zeros(spec.n_params, dtype=np.float32)
    seconds = []
    for step in range(args.passes):
        t0 = time.perf_counter()
        theta, _ = gradient_pass(sc, got, job, theta, {}, step)
        seconds.append(time.perf_counter() - t0)
    held = got.handles.mapPartitions(blocks.residency).collect()
    cached: dict[int, int] = {}   # what each Python worker's block cache keeps, by process
    for h in held:
        cached[h["worker_pid"]] = max(cached.get(h["worker_pid"], 0), h["worker_resident_bytes"])
    out = {"table": table, "train_rows": got.train_rows, "partitions": args.block_partitions,
           "depth": args.depth,
           "build_seconds": round(build, 2), "feature_gb_on_disk": round(got.feature_bytes / 2**30, 2),
           "blocks_in_memory": sum(h["in_memory"] for h in held), "blocks": len(held),
           "workers_cache_mb": round(sum(cached.values()) / 2**20), "cache_budget_mb": round(args.cache_gb * 1024),
           "pass_seconds": [round(s, 3) for s in seconds],
           "pass_median_seconds": round(statistics.median(seconds[1:] or seconds), 3),
           "rebuilds": got.rebuilds}
    got.release()
    return out


def time_to_accuracy(spark, lake_path: str, table: str, target: float, args) -> dict:
    """Adam on full batches from zeros, blocks built inside the clock; test accuracy after every
    pass (its job counted in the clock) until within 0.5 points of `target`."""
    sc = spark.sparkContext
    started = time.perf_counter()
    got = load_blocks(spark, lake_path, lake.TableRef(table), args.block_partitions, 0, 0.0,
                           cache_gb=args.cache_gb)
    spec = ModelSpec("logistic", (got.n_features, 1))
    opt = Optimizer("adam", args.adam_lr, 0.9, 0.999, 1e-7, 0.9)
    job = tasks.Job(spec, got.layout, "float32", got.layout.n_train, opt)
    theta = np.zeros(spec.n_params, dtype=np.float32)
    state = opt.init_state(theta)
    history = []
    for step in range(1, args.max_passes + 1):
        theta, state = gradient_pass(sc, got, job, theta, state, step - 1)
        acc = evaluate(sc, got, spec, "float32", theta, ("test",), args.depth)["test"]["accuracy"]
        history.append([step, round(time.perf_counter() - started, 2), acc])
        if acc >= target - 0.005:
            break
    got.release()
    return {"seconds": history[-1][1], "passes": len(history), "reached": history[-1][2] >= target - 0.005,
            "history": history}


# --- MLlib -----------------------------------------------------------------------------------------

def mllib_fit(spark, lake_path: str, table: str, max_iter: int, tol: float) -> dict:
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    df, _ = lake.read(spark, lake_path, lake.TableRef(table))
    rows = df.select(array_to_vector(F.col("features")).alias("features"),
                     F.col("label").cast("double").alias("label"), "split")
    train = rows.filter("split = 'train'")
    started = time.perf_counter()
    model = LogisticRegression(maxIter=max_iter, tol=tol, regParam=0.0).fit(train)
    seconds = time.perf_counter() - started
    test = model.transform(rows.filter("split = 'test'"))
    acc = test.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]
    return {"max_iter": max_iter, "iterations": model.summary.totalIterations, "seconds": round(seconds, 2),
            "test_accuracy": acc}


def numpy_floor(lake_path: str, table: str, passes: int) -> dict:
    """In a fresh process (so its memory is its own): the table's Parquet files into one float32
    array, then `passes` gradient passes over it."""
    code = f"""
import glob, json, time, numpy as np, pyarrow.parquet as pq
from udfs.core.models import ModelSpec, loss_and_grad
files = sorted(glob.glob({(lake_path.removeprefix('file:') + '/' + table)!r} + '/*.parquet'))
meta = [pq.ParquetFile(f).metadata for f in files]
n = sum(m.num_rows for m in meta)
X = y = None
at = 0
for f in files:
    t = pq.read_table(f, columns=['features', 'label'])
    arr = t.column('features').combine_chunks()
    d = len(arr[0])
    if X is None:
        X = np.empty((n, d), np.float32); y = np.empty(n, np.int32)
    k = len(t)
    X[at:at + k] = np.asarray(arr.values).reshape(k, d); y[at:at + k] = t.column('label').to_numpy()
    at += k
    del t, arr
spec = ModelSpec('logistic', (d, 1))
theta = np.zeros(d + 1, np.float32)
secs = []
for _ in range({passes}):
    t0 = time.perf_counter(); loss, g = loss_and_grad(spec, theta, X, y); secs.append(time.perf_counter() - t0)
print(json.dumps({{'rows': n, 'pass_seconds': [round(s, 3) for s in secs]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["pass_median_seconds"] = round(statistics.median(out["pass_seconds"][1:] or out["pass_seconds"]), 3)
    return out


def save(result: dict, out: str | None) -> None:
    """Write what has been measured so far, atomically (a reader never sees half a file)."""
    if out:
        artifacts.atomic_write(Path(out), json.dumps(result, indent=1).encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lake", default="lake")
    p.add_argument("--rows", default="2500000,5000000,10000000,20000000")
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--block-partitions", type=int, default=0,
                   help="data.partitions of the blocks (default: --partitions, the table's files)")
    p.add_argument("--depth", type=int, default=2, help="reduction tree depth (trainer.aggregation_depth)")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--cache-gb", type=float, default=4.0)
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--mllib-iters", default="5,15",
                   help="maxIter values of the short fits (tol 0); the marginal cost comes from the "
                        "last of them and the converged fit")
    p.add_argument("--mllib-converge", type=int, default=100)
    p.add_argument("--adam-lr", type=float, default=0.05)
    p.add_argument("--max-passes", type=int, default=200)
    p.add_argument("--compare-rows", type=int, default=0,
                   help="table size for MLlib, time to accuracy and the floor (default: the largest)")
    p.add_argument("--skip", default="", help="comma-separated: mllib, floor, accuracy")
    p.add_argument("--out", help="JSON file rewritten with the results so far after every part")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.block_partitions = args.block_partitions or args.partitions
    sizes = [int(r) for r in args.rows.split(",")]
    lake_path = str(Path(args.lake).resolve())
    load_before = os.getloadavg()
    spark = build_session("fedspark-bench-scale", {"spark.master": "local[2]",
                                                   "spark.driver.memory": args.driver_memory})
    gateway = spark.sparkContext._gateway
    if gateway is None:
        raise RuntimeError("the Spark session has no Py4J gateway: cannot find the JVM to watch")
    jvm_pid = gateway.proc.pid
    result: dict[str, Any] = {"machine": machine(), "versions": versions(), "load_before": load_before,
              "settings": {k: v for k, v in vars(args).items()}, "sizes": []}
    with MemoryWatch(jvm_pid) as watch:
        for rows in sizes:
            table = ensure_table(spark, lake_path, rows, args.features, args.partitions)
            watch.reset()
            measured = measure_passes(spark, lake_path, table, args)
            measured["memory"] = watch.report()   # peaks while building and passing this size
            log(f"{table}: {measured}")
            result["sizes"].append(measured)
            save(result, args.out)
        compare_rows = args.compare_rows or sizes[-1]
        largest = ensure_table(spark, lake_path, compare_rows, args.features, args.partitions)
        if "mllib" not in skip:
            fits = [mllib_fit(spark, lake_path, largest, int(it), 0.0)
                    for it in args.mllib_iters.split(",")]
            log(f"mllib: {fits}")
            converged = mllib_fit(spark, lake_path, largest, args.mllib_converge, 1e-6)
            log(f"mllib converged: {converged}")
            # the first fit also pays the JVM's warm-up: the marginal cost comes from the last short
            # fit and the converged one when that ran more iterations, otherwise from the short fits
            hi, lo = ((converged, fits[-1]) if converged["iterations"] > fits[-1]["iterations"]
                      else (fits[-1], fits[0]))
            per_iter = (hi["seconds"] - lo["seconds"]) / (hi["iterations"] - lo["iterations"])
            result["mllib"] = {"table": largest, "fits": fits, "converged": converged,
                               "marginal_iteration_seconds": round(per_iter, 3),
                               "fixed_seconds": round(lo["seconds"] - per_iter * lo["iterations"], 2)}
            save(result, args.out)
            if "accuracy" not in skip:
                result["ours_to_accuracy"] = time_to_accuracy(spark, lake_path, largest,
                                                              converged["test_accuracy"], args)
                log(f"ours to accuracy: {result['ours_to_accuracy']}")
                save(result, args.out)
    result["memory"] = watch.report()
    spark.stop()
    if len(sizes) > 1:
        x = np.array([s["train_rows"] for s in result["sizes"]], dtype=np.float64)
        t = np.array([s["pass_median_seconds"] for s in result["sizes"]])
        slope, intercept = np.polyfit(x, t, 1)
        fit = slope * x + intercept
        result["scaling"] = {"seconds_per_million_rows": round(slope * 1e6, 4),
                             "intercept_seconds": round(intercept, 3),
                             "largest_deviation_seconds": round(float(np.abs(t - fit).max()), 3),
                             "largest_relative_deviation": round(float((np.abs(t - fit) / t).max()), 3)}
        save(result, args.out)
    if "floor" not in skip:
        result["numpy_floor"] = numpy_floor(lake_path, largest, args.passes)
        log(f"numpy floor: {result['numpy_floor']}")
    result["load_after"] = os.getloadavg()
    save(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
