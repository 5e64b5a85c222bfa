"""python scripts/bench_federated.py [--only overhead,flower,iid,shards,dirichlet,robust,dp,secagg] [--lake DIR]
                                   [--out FILE] [--fedavg-lrs 0.05,0.1,0.02] [--fedsgd-lrs 0.3,0.1,1.0]
                                   [--fedsgd-rounds 1000] [--overhead-rounds N] [--flower-rounds N]
                                   [--flower-venv DIR] [--master local[2]]

Federated training on Fashion-MNIST, the 2NN (784-200-200-10) of McMahan et al. 2017, measured in
one Spark session on this machine:

  overhead   100 IID clients, C=0.1, E=5, B=10: the wall time of a round's Spark job next to the
             same clients' local training (udfs.clients.train_client) run one after another in this
             process with one BLAS thread, and the numpy time the tasks report themselves
  flower     conf/fedavg_iid.yaml with eval_every=1 (every round: the test set and every client's
             hold-out) for --flower-rounds rounds, then Flower 1.42's simulation engine (Ray, its own
             venv at --flower-venv, created when missing) on the same clients, rows, starting weights
             and client code (scripts/flower_fedavg.py), evaluating centrally every round, then the
             numpy floor: per-round seconds (the first apart), rounds to 0.85, whole seconds
  iid        conf/fedavg_iid.yaml and conf/fedsgd_iid.yaml: rounds to 0.85 test accuracy for each
             client learning rate of a grid (the configured one first; a later rate is stopped once
             it has run as many rounds as the best so far, since it can no longer win)
  shards     conf/fedavg_shards.yaml: 2 label-sorted shards per client, rounds to 0.80 within 500
  dirichlet  conf/fed_dirichlet.yaml, 50 clients, alpha 0.1: FedAvg, FedProx and FedAdam to 0.80
  robust     conf/fed_robust.yaml, 50 clients, C=0.2, 20% sending -10x their update: the clean run,
             then FedAvg (mean), median, trimmed mean and Multi-Krum under attack, 40 rounds each
  dp         conf/fed_dp.yaml: no DP, then DP-FedAvg at noise multipliers spending epsilon ~8, 3, 1
  secagg     conf/fedavg_iid.yaml for 20 rounds without and with secure aggregation

Each experiment stops at its target (federated.stop_at_target) or its round cap.
Per-client accuracy on the clients' own hold-outs is measured once, on the final model. One JSON
object per finished experiment is appended to --out as it finishes (so a long run keeps what it has
measured), and the markdown tables are printed at the end. Run it through
scripts/bench_federated.sh, which sets up Java, the venv and the Fashion-MNIST table first.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python or spark-submit): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime
import importlib.metadata
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark.sql import SparkSession
from threadpoolctl import threadpool_limits

from pipelines.core.config import Config, load_config
from pipelines.core.session import build_session
from pipelines.federated import partitioners, privacy, rounds
from pipelines.federated.clients import Clients, partition_report, prepare_clients
from pipelines.federated.server import weighted_mean
from pipelines.training.runners import initial_theta, model_spec
from scripts.benchlib import BenchError, load_split, log, machine, versions
from udfs import EXECUTOR_REQUIREMENTS
from udfs.core.seeding import Stream, rng
from udfs.federated.clients import ClientSplit, train_client
from udfs.training.tasks import metric_sums

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("overhead", "flower", "iid", "shards", "dirichlet", "robust", "dp", "secagg")
# noise multipliers that spend epsilon of about 8, 3 and 1 at delta 1e-5 in conf/fed_dp.yaml's 30
# rounds of Poisson sampling with q = 0.1 (the run reports the epsilon it actually spent)
DP_NOISE = (0.78, 1.3, 2.6)


class RoundFailed(RuntimeError):
    """Training stopped with an error; what was evaluated before it."""

    def __init__(self, message: str, by_round: list[list]) -> None:
        super().__init__(message)
        self.by_round = by_round


@dataclass(frozen=True)
class Experiment:
    group: str          # the client split it shares with others (built once per group)
    name: str
    config: str         # file under conf/
    sets: tuple[str, ...]
    cap: int            # most rounds to run
    lr_grid: bool = False


def experiments(args: argparse.Namespace) -> list[Experiment]:
    """What each part runs, in order; the grid's first rate is the configured one."""
    out: list[Experiment] = []
    if "iid" in args.only:
        for lr in args.fedavg_lrs:
            out.append(Experiment("iid", "fedavg", "fedavg_iid.yaml",
                                  (f"trainer.optimizer.lr={lr}", "federated.eval_every=1"),
                                  args.fedavg_rounds, lr_grid=True))
        for lr in args.fedsgd_lrs:
            out.append(Experiment("iid", "fedsgd", "fedsgd_iid.yaml",
                                  (f"trainer.optimizer.lr={lr}", "federated.eval_every=10"),
                                  args.fedsgd_rounds, lr_grid=True))
    if "shards" in args.only:
        out.append(Experiment("shards", "fedavg", "fedavg_shards.yaml", ("federated.eval_every=5",), 500))
    if "dirichlet" in args.only:
        for strategy in ("fedavg", "fedprox", "fedadam"):
            out.append(Experiment("dirichlet", strategy, "fed_dirichlet.yaml",
                                  (f"federated.strategy={strategy}", "federated.eval_every=5"), 300))
    if "robust" in args.only:
        for name in args.robust_runs:
            sets = ("robust.attack.kind=none",) if name == "clean" else (f"robust.rule={name}",)
            out.append(Experiment("robust", name, "fed_robust.yaml", sets, 40))
    if "dp" in args.only:
        out.append(Experiment("dp", "no-dp", "fed_dp.yaml", ("privacy.dp=none", "privacy.adaptive_clip=false"), 30))
        for z in DP_NOISE:
            out.append(Experiment("dp", f"z={z}", "fed_dp.yaml", (f"privacy.noise_multiplier={z}",), 30))
    if "secagg" in args.only:
        fixed = ("federated.target_accuracy=null", "federated.eval_every=5", "privacy.clip=1000")
        out.append(Experiment("secagg", "plain", "fedavg_iid.yaml", fixed, 20))
        out.append(Experiment("secagg", "secure", "fedavg_iid.yaml",
                              (*fixed, "privacy.secure_aggregation=true"), 20))
    return out


def experiment_config(e: Experiment, lake_path: str, rounds: int) -> Config:
    """The experiment's config, stopping at its target accuracy when it has one."""
    config = load_config(ROOT / "conf" / e.config,
                         [f"lake.path={lake_path}", f"federated.rounds={rounds}", *e.sets])
    fed = config.federated
    if fed.target_accuracy is None:
        return config
    return config.model_copy(update={"federated": fed.model_copy(update={"stop_at_target": True})})


# --- convergence -------------------------------------------------------------------------------

def converge(spark: SparkSession, config: Config, clients: Clients, test: Any,
             label: str) -> dict[str, Any]:
    """Train until the config's target accuracy or its round cap; what the benchmark reports."""
    sc = spark.sparkContext
    spec = model_spec(config, clients.n_features, clients.n_classes)
    fed, t = config.federated, config.trainer
    state = rounds.initial_state(config, initial_theta(config, spec), clients.count)
    target = fed.target_accuracy

    seen: list[dict] = []

    def on_round(_: rounds.FedState, record: dict) -> None:
        seen.append(record)
        if "test_accuracy" in record and record["round"] % (10 * fed.eval_every) == 0:
            log(f"{label}: round {record['round']} test_accuracy {record['test_accuracy']:.4f}")

    started = time.perf_counter()
    try:
        state = rounds.fit(sc, config, clients, test, spec, state, on_round, client_eval=False,
                           run_id=f"bench-{label}", noise_secret=privacy.fresh_secret(config))
    except RuntimeError as exc:  # e.g. every client's update overflowed under an attack
        raise RoundFailed(str(exc), [[h["round"], h["test_accuracy"]] for h in seen
                                     if "test_accuracy" in h]) from exc
    wall = time.perf_counter() - started
    history = state.history
    evaluated = [h for h in history if "test_accuracy" in h]
    first = rounds.reached_target(fed, history)
    split = ClientSplit(t.seed, fed.holdout_fraction)
    by_client, _ = rounds.federated_eval(sc, clients, spec, t.dtype, split, state.theta)
    train_seconds = [h["seconds"] - h.get("eval_seconds", 0.0) for h in history[1:]] or [0.0]
    log(f"{label}: rounds_to_target {first} after {state.round} rounds, {wall:.0f} s")
    return {
        "rounds_run": state.round, "rounds_to_target": first, "target_accuracy": target,
        "final_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
        "best_accuracy": max((h["test_accuracy"] for h in evaluated), default=None),
        "seconds_per_round": round(statistics.median(train_seconds), 3),
        "eval_seconds": round(statistics.median(h["eval_seconds"] for h in evaluated), 3)
        if evaluated else None,
        "client_numpy_seconds_per_round": round(statistics.median(
            h["client_seconds"] for h in history), 3),
        "client_accuracy": by_client, "dropped": state.dropped, "wall_seconds": round(wall, 1),
        "epsilon": history[-1].get("epsilon") if history else None,
    }


def run_group(spark: SparkSession, group: list[Experiment], args: argparse.Namespace
              ) -> Iterator[dict[str, Any]]:
    """The experiments sharing one client split, with the split built once."""
    base = experiment_config(group[0], args.lake, group[0].cap)
    clients, test = prepare_clients(spark, base)
    report = partition_report(clients)
    log(f"{group[0].group}: {report}")
    best: dict[str, int] = {}
    try:
        for e in group:
            cap = min(e.cap, best.get(e.name, e.cap)) if e.lr_grid else e.cap
            config = experiment_config(e, args.lake, cap)
            label = f"{e.group}/{e.name} lr={config.trainer.optimizer.lr}"
            try:
                result = converge(spark, config, clients, test, label)
            except RoundFailed as exc:  # e.g. a learning rate so high every client diverged
                log(f"{label}: failed: {exc} (test accuracy by round before: {exc.by_round})")
                result = {"rounds_run": None, "rounds_to_target": None, "failed": str(exc)[:300],
                          "test_accuracy_by_round": exc.by_round,
                          "target_accuracy": config.federated.target_accuracy, "best_accuracy": None,
                          "seconds_per_round": None, "client_numpy_seconds_per_round": None,
                          "client_accuracy": None}
            if e.lr_grid and result["rounds_to_target"] is not None:
                best[e.name] = min(best.get(e.name, cap), result["rounds_to_target"])
            fed = config.federated
            yield {"group": e.group, "experiment": e.name, "config": f"conf/{e.config}",
                   "sets": list(e.sets), "round_cap": cap, "partition_report": report,
                   "max_labels_per_client": int(clients.labels.max()),
                   "client_lr": config.trainer.optimizer.lr, "strategy": fed.strategy,
                   "clients": clients.count, "fraction": fed.fraction, "mu": fed.mu,
                   "server_lr": fed.server_lr, "tau": fed.tau, **result}
    finally:
        clients.release()
        if test is not None:
            test.release()


# --- round overhead ----------------------------------------------------------------------------

def client_arrays(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, client) of the train split in id order, clients assigned as prepare_clients does.
    Read from the IDX files only to time the same training in one process."""
    X, y = load_split("train")
    fed = config.federated
    client = partitioners.assign(fed.partitioner, y, fed.clients, rng(config.trainer.seed, Stream.PARTITION),
                                 fed.alpha, fed.shards_per_client)
    return X.reshape(len(y), -1), y, client


def client_train_rows(client: np.ndarray, k: int, split: ClientSplit) -> np.ndarray:
    """Client k's training rows (indices in id order): its rows less a hold-out of the size its
    block keeps (udfs.federated.clients.client_rows), drawn from the same stream."""
    rows = np.flatnonzero(client == k)
    n_hold = int(round(split.holdout_fraction * len(rows))) if len(rows) > 1 else 0
    return rows[rng(split.seed, Stream.HOLDOUT, k).permutation(len(rows))[n_hold:]]


def one_process(task: Any, theta: np.ndarray, sampled: list[int], data: tuple, split: ClientSplit) -> float:
    """Seconds to train the sampled clients one after another here, each on as many rows as its
    task trains (its rows less the same-size hold-out), with one BLAS thread as in the tasks."""
    X, y, client = data
    started = time.perf_counter()
    with threadpool_limits(1):
        for k in sampled:
            keep = client_train_rows(client, k, split)
            train_client(task, k, theta, X[keep].astype(task.dtype), y[keep])
    return time.perf_counter() - started


def overhead(spark: SparkSession, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of FedAvg on 100 IID clients: Spark round wall time, the tasks' own numpy time, and
    the same training in one process. Round 1 (Python workers start, blocks load) is kept apart."""
    config = experiment_config(Experiment("iid", "fedavg", "fedavg_iid.yaml", (), 1), args.lake, 1)
    clients, test = prepare_clients(spark, config)
    spec = model_spec(config, clients.n_features, clients.n_classes)
    data = client_arrays(config)
    fed, t = config.federated, config.trainer
    split = ClientSplit(t.seed, fed.holdout_fraction)
    rule = rounds.server_rule(fed)
    theta = initial_theta(config, spec)
    server_state = rule.init_state(theta)
    rows: list[dict[str, float]] = []
    try:
        for r in range(1, args.overhead_rounds + 1):
            sampled = rounds.sample(fed, r, clients.count, t.seed)
            task = rounds.client_round(config, spec, r)
            started = time.perf_counter()
            reports, dropped = rounds.run_round(spark.sparkContext, clients, task, theta, sampled)
            wall = time.perf_counter() - started
            local = one_process(task, theta, sampled, data, split)
            rows.append({"round": r, "clients": len(sampled), "round_seconds": wall,
                         "task_numpy_seconds": sum(d.seconds for d in reports),
                         "one_process_seconds": local})
            log(f"overhead: round {r} spark {wall:.2f} s, tasks' numpy "
                f"{rows[-1]['task_numpy_seconds']:.2f} s, one process {local:.2f} s")
            theta = rule.apply(theta, weighted_mean([d.update for d in reports],
                                                    [d.n for d in reports]), server_state)
    finally:
        clients.release()
        if test is not None:
            test.release()
    steady = rows[1:] or rows

    def med(key: str) -> float:
        return round(statistics.median(row[key] for row in steady), 3)

    slots = spark.sparkContext.defaultParallelism
    result: dict[str, Any] = {"rounds": len(rows), "clients_per_round": rows[0]["clients"], "task_slots": slots,
              "first_round_seconds": round(rows[0]["round_seconds"], 3),
              "round_seconds": med("round_seconds"), "task_numpy_seconds": med("task_numpy_seconds"),
              "one_process_seconds": med("one_process_seconds"), "per_round": rows}
    # the round's cost beyond the numpy work, with that work spread ideally over the task slots
    result["overhead_seconds"] = round(med("round_seconds") - med("one_process_seconds") / slots, 3)
    return result


# --- Flower's simulation of the same job ---------------------------------------------------------

FLOWER = "flwr[simulation]==1.42.0"
FLOWER_TARGET = 0.85


def flower_venv(path: Path) -> Path:
    """Flower's own venv at `path` (created when missing): FLOWER, plus udfs' executor requirements
    at this environment's versions, so its clients run our client code on the same numpy. Never in
    our dependencies: a peer runs in a venv of its own. Returns its python."""
    wanted = [FLOWER, *(f"{p}=={importlib.metadata.version(p)}" for p in EXECUTOR_REQUIREMENTS)]
    stamp, python = path / ".fedspark-requirements", path / "bin" / "python"
    if python.exists() and stamp.is_file() and stamp.read_text().split() == wanted:
        return python
    log(f"flower: installing {' '.join(wanted)} into {path}")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted], check=True)
    stamp.write_text("\n".join(wanted))
    return python


def write_flower_job(config: Config, spec: Any, theta0: np.ndarray, job_dir: Path, n_rounds: int,
                     slots: int) -> None:
    """job.json and data.npz for scripts/flower_fedavg.py: the clients as prepare_clients assigns
    them (client_arrays), each with its training rows (client_train_rows), stored client after
    client, and the test split."""
    X, y, client = client_arrays(config)
    fed, t = config.federated, config.trainer
    split = ClientSplit(t.seed, fed.holdout_fraction)
    rows = [client_train_rows(client, k, split) for k in range(fed.clients)]
    order = np.concatenate(rows)
    X_test, y_test = load_split("test")
    job_dir.mkdir(parents=True, exist_ok=True)
    np.savez(job_dir / "data.npz", X=X[order], y=y[order],
             offsets=np.concatenate([[0], np.cumsum([len(r) for r in rows])]),
             X_test=X_test.reshape(len(y_test), -1), y_test=y_test, theta0=theta0)
    o = config.trainer.optimizer
    (job_dir / "job.json").write_text(json.dumps({
        "spec": {"kind": spec.kind, "layers": list(spec.layers)},
        "optimizer": {"name": o.name, "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
                      "momentum": o.momentum},
        "dtype": t.dtype, "seed": t.seed, "holdout_fraction": fed.holdout_fraction,
        "local_epochs": fed.local_epochs, "batch_size": fed.local_batch_size, "clients": fed.clients,
        "fraction": fed.fraction, "rounds": n_rounds, "cpus": slots}))


def run_flower(python: Path, job_dir: Path) -> dict[str, Any]:
    """scripts/flower_fedavg.py on `job_dir`, one BLAS thread a process; its JSON line. Flower's
    and Ray's logs are kept aside and shown only when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    started = time.perf_counter()
    proc = subprocess.run([str(python), "-m", "scripts.flower_fedavg", str(job_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"flower: exited with {proc.returncode}; end of its output:\n"
                         + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 3)
    return result


def round_times(seconds: list[float], by_round: list[list], whole: float) -> dict[str, Any]:
    """What the flower part reports of one way: the first round, the median of the others, rounds
    to FLOWER_TARGET."""
    return {"first_round_seconds": round(seconds[0], 3),
            "round_seconds": round(statistics.median(seconds[1:] or seconds), 3),
            "rounds_to_target": next((r for r, acc in by_round if acc >= FLOWER_TARGET), None),
            "final_accuracy": by_round[-1][1], "whole_seconds": round(whole, 1)}


def ours_beside_flower(spark: SparkSession, config: Config) -> dict[str, Any]:
    """conf/fedavg_iid.yaml with eval_every=1: every round evaluated on the test set and on every
    client's hold-out, as train.py runs it; the blocks' build counts in the whole."""
    started = time.perf_counter()
    clients, test = prepare_clients(spark, config)
    blocks = time.perf_counter() - started
    spec = model_spec(config, clients.n_features, clients.n_classes)
    state = rounds.initial_state(config, initial_theta(config, spec), clients.count)
    try:
        state = rounds.fit(spark.sparkContext, config, clients, test, spec, state, lambda s, r: None,
                           run_id="bench-beside-flower")
    finally:
        clients.release()
        if test is not None:
            test.release()
    h = state.history
    out = round_times([r["seconds"] for r in h], [[r["round"], r["test_accuracy"]] for r in h],
                      time.perf_counter() - started)
    test_eval = [r["eval_seconds"] - r["client_eval_seconds"] for r in h[1:]]
    return {**out, "blocks_seconds": round(blocks, 1),
            "round_with_test_eval_seconds": round(statistics.median(
                r["seconds"] - r["client_eval_seconds"] for r in h[1:]), 3),
            "test_eval_seconds": round(statistics.median(test_eval), 3),
            "client_eval_seconds": round(statistics.median(r["client_eval_seconds"] for r in h[1:]), 3)}


def numpy_floor(config: Config, n_rounds: int, slots: int) -> float:
    """The round's numpy work spread ideally over the task slots: the sampled clients' training
    (one_process) and the test set's forward pass, one BLAS thread, median of rounds 2-4."""
    spec = model_spec(config, 784, 10)
    theta = initial_theta(config, spec)
    fed, t = config.federated, config.trainer
    split = ClientSplit(t.seed, fed.holdout_fraction)
    data = client_arrays(config)
    X_test, y_test = load_split("test")
    X_test = X_test.reshape(len(y_test), -1)
    with threadpool_limits(1):
        started = time.perf_counter()
        metric_sums(spec, theta, X_test, y_test)
        test_seconds = time.perf_counter() - started
    train = [one_process(rounds.client_round(config, spec, r), theta, rounds.sample(fed, r, fed.clients, t.seed),
                         data, split) for r in range(2, min(n_rounds, 4) + 1)]
    return round((statistics.median(train) + test_seconds) / slots, 3)


def beside_flower(spark: SparkSession, args: argparse.Namespace) -> dict[str, Any]:
    """Our rounds and Flower's simulation of the same job, one after the other, and the numpy floor."""
    config = experiment_config(Experiment("iid", "fedavg", "fedavg_iid.yaml",
                                          ("federated.eval_every=1", "federated.target_accuracy=null"), 1),
                               args.lake, args.flower_rounds)
    slots = spark.sparkContext.defaultParallelism
    log(f"flower: ours, {args.flower_rounds} rounds of conf/fedavg_iid.yaml with eval_every=1")
    ours = ours_beside_flower(spark, config)
    log(f"flower: ours {ours}")
    python = flower_venv(args.flower_venv)
    spec = model_spec(config, 784, 10)
    with tempfile.TemporaryDirectory(prefix="fedspark-flower-") as job_dir:
        write_flower_job(config, spec, initial_theta(config, spec), Path(job_dir), args.flower_rounds, slots)
        log(f"flower: Flower's simulation, {args.flower_rounds} rounds")
        got = run_flower(python, Path(job_dir))
    flower = {**round_times(got["round_seconds"], got["test_accuracy_by_round"], got["process_seconds"]),
              "setup_seconds": got["setup_seconds"], "process_seconds": got["process_seconds"]}
    log(f"flower: Flower {flower}")
    floor = numpy_floor(config, args.flower_rounds, slots)
    return {"rounds": args.flower_rounds, "slots": slots, "flower_requirement": FLOWER, "ours": ours,
            "flower": flower, "numpy_floor_round_seconds": floor,
            "ours_over_flower_round": round(ours["round_seconds"] / flower["round_seconds"], 2),
            "ours_over_flower_round_with_test_eval": round(
                ours["round_with_test_eval_seconds"] / flower["round_seconds"], 2)}


# --- report ------------------------------------------------------------------------------------

def fmt(value: Any, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = []
    f = report.get("flower")
    if f:
        o, fl = f["ours"], f["flower"]
        lines += [f"| way ({f['rounds']} rounds) | first round s | s/round (median of rounds 2-) | "
                  "round with test eval only s | test eval s | all clients' eval s | rounds to 0.85 | "
                  "final acc | whole s | s/round over Flower's |", "|---|---|---|---|---|---|---|---|---|---|",
                  f"| numpy floor ({f['slots']} slots) | — | {f['numpy_floor_round_seconds']} | — | — | — | — | — | "
                  f"— | {round(f['numpy_floor_round_seconds'] / fl['round_seconds'], 2)} |",
                  f"| Flower ({f['flower_requirement']}) | {fl['first_round_seconds']} | {fl['round_seconds']} | "
                  f"{fl['round_seconds']} | — | — | {fmt(fl['rounds_to_target'])} | {fl['final_accuracy']:.4f} | "
                  f"{fl['whole_seconds']} | 1.0 |",
                  f"| fedspark | {o['first_round_seconds']} | {o['round_seconds']} | "
                  f"{o['round_with_test_eval_seconds']} | {o['test_eval_seconds']} | {o['client_eval_seconds']} | "
                  f"{fmt(o['rounds_to_target'])} | "
                  f"{o['final_accuracy']:.4f} | {o['whole_seconds']} (blocks {o['blocks_seconds']}) | "
                  f"{f['ours_over_flower_round']} ({f['ours_over_flower_round_with_test_eval']} with the test "
                  "eval only) |", ""]
    o = report.get("overhead")
    if o:
        lines += ["| clients/round | task slots | Spark round s | tasks' numpy s (sum) | one process s | "
                  "overhead s | first round s |", "|---|---|---|---|---|---|---|",
                  f"| {o['clients_per_round']} | {o['task_slots']} | {o['round_seconds']} | "
                  f"{o['task_numpy_seconds']} | {o['one_process_seconds']} | {o['overhead_seconds']} | "
                  f"{o['first_round_seconds']} |", ""]
    runs = report.get("experiments", [])
    if runs:
        lines += ["| part | run | strategy | client lr | target | rounds to target | rounds run | "
                  "final acc | best acc | epsilon | s/round (train) | clients' numpy s/round | "
                  "client acc mean/p10/min |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            ca = r["client_accuracy"] or {}
            cas = "/".join(f"{ca[k]:.3f}" for k in ("mean", "p10", "min")) if ca else "—"
            lines.append(f"| {r['group']} | {r['experiment']} | {r['strategy']} | {r['client_lr']} | "
                         f"{fmt(r['target_accuracy'])} | {fmt(r['rounds_to_target'])} | {fmt(r['rounds_run'])} | "
                         f"{fmt(r.get('final_accuracy'), '.4f')} | {fmt(r['best_accuracy'], '.4f')} | "
                         f"{fmt(r.get('epsilon'), '.2f')} | {fmt(r['seconds_per_round'])} | "
                         f"{fmt(r['client_numpy_seconds_per_round'])} | {cas} |")
    return "\n".join(lines)


def ratio_fedavg_fedsgd(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Best FedSGD rounds over best FedAvg rounds on the IID split (None while either is missing)."""
    def best(name: str) -> int | None:
        found = [r["rounds_to_target"] for r in runs if r["group"] == "iid" and r["experiment"] == name
                 and r["rounds_to_target"] is not None]
        return min(found) if found else None
    fedavg, fedsgd = best("fedavg"), best("fedsgd")
    if fedavg is None:
        return None
    return {"fedavg_rounds": fedavg, "fedsgd_rounds": fedsgd,
            "fedsgd_over_fedavg": round(fedsgd / fedavg, 1) if fedsgd else None}


def append(out: Path | None, record: dict[str, Any]) -> None:
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


def floats(text: str) -> list[float]:
    if text == "none":  # skip that grid
        return []
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
    return values


def parts(text: str) -> list[str]:
    chosen = [p for p in text.split(",") if p]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return chosen


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_federated.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--only", type=parts, default=list(PARTS), help=f"parts to run ({','.join(PARTS)})")
    p.add_argument("--lake", default=str(ROOT / "lake"), help="lake.path holding fashion_mnist")
    p.add_argument("--out", type=Path, help="append one JSON object per finished experiment here")
    p.add_argument("--fedavg-lrs", type=floats, default=[0.05, 0.1, 0.02])
    p.add_argument("--fedsgd-lrs", type=floats, default=[0.3, 0.1, 1.0])
    p.add_argument("--fedavg-rounds", type=positive, default=100)
    p.add_argument("--fedsgd-rounds", type=positive, default=1000)
    p.add_argument("--overhead-rounds", type=positive, default=10)
    p.add_argument("--flower-rounds", type=positive, default=20)
    p.add_argument("--flower-venv", type=Path, default=Path(os.environ.get("FLWR_VENV", "/tmp/flwr-venv")),
                   help="Flower's own venv (created when missing)")
    p.add_argument("--robust-runs", type=lambda text: [v for v in text.split(",") if v],
                   default=["clean", "mean", "median", "trimmed_mean", "multi_krum"],
                   help="robust part: 'clean' (no attack) and the rules to run under attack")
    p.add_argument("--master", default="local[2]")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = build_session("fedspark-bench-federated", {"spark.master": args.master})
    spark.sparkContext.setLogLevel("ERROR")
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "versions": versions(), "master": args.master}
    append(args.out, {"kind": "header", **report})
    if "overhead" in args.only:
        report["overhead"] = overhead(spark, args)
        append(args.out, {"kind": "overhead", **report["overhead"]})
    if "flower" in args.only:
        report["flower"] = beside_flower(spark, args)
        append(args.out, {"kind": "flower", **report["flower"]})
    report["experiments"] = []
    todo = experiments(args)
    for group in dict.fromkeys(e.group for e in todo):
        for record in run_group(spark, [e for e in todo if e.group == group], args):
            report["experiments"].append(record)
            append(args.out, {"kind": "experiment", **record})
    report["iid_ratio"] = ratio_fedavg_fedsgd(report["experiments"])
    spark.stop()
    print(json.dumps(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
