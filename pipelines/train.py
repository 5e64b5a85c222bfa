"""spark-submit pipelines/train.py --config FILE [--set KEY=VALUE ...] [--run-name NAME]
                                  [--resume RUN_DIR | --resume-if-exists]

Train a model on a Delta table with the configured strategy, save it in a run directory and print
one progress line per epoch, then the summary JSON object as the last line of stdout.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pyspark.sql import SparkSession

from pipelines import artifacts, federated, lake, mllib, model_parallel
from pipelines.cli import main_wrapper, print_summary, process_start_time
from pipelines.config import Config, ConfigError, dump_yaml, load_config
from pipelines.data import load_blocks
from pipelines.errors import UserError
from pipelines.session import build_session
from pipelines.strategies import Settings, TrainState, evaluate, optimizer_from, train
from udfs import tasks
from udfs.models import ModelSpec, init_params
from udfs.seeding import Stream, rng

AVAILABLE = ("local", "sync", "federated", "mllib", "model_parallel")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", help="experiment YAML (default: conf/fashion_mnist.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set trainer.epochs=2")
    p.add_argument("--run-name", help="run id to use (default: a timestamp and the config name)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    resume.add_argument("--resume-if-exists", action="store_true",
                        help="with --run-name: continue that run if it exists, or report it if it "
                             "finished; start it otherwise")
    args = p.parse_args(argv)
    if args.resume_if_exists and not args.run_name:
        p.error("--resume-if-exists needs --run-name (the run to look for)")
    return args


def model_spec(config: Config, n_features: int, n_classes: int) -> ModelSpec:
    kind, table = config.model.kind, config.data.table
    if kind != "linear" and n_classes == 0:
        raise UserError(f"model.kind={kind} needs integer class labels, but table {table!r} "
                        "has real-valued labels; use model.kind=linear")
    if kind == "logistic" and n_classes > 2:
        raise UserError(f"model.kind=logistic is binary, but table {table!r} has "
                        f"{n_classes} classes; use softmax or mlp")
    return ModelSpec.build(kind, n_features, max(n_classes, 1), config.model.hidden)


def initial_theta(config: Config, spec: ModelSpec) -> np.ndarray:
    return init_params(spec, rng(config.trainer.seed, Stream.INIT), config.model.init,
                       np.dtype(config.trainer.dtype))


def checkpoint(run_dir: Path, unit: str, number: int, theta: np.ndarray,
               state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    arrays = {"theta": theta, **{f"state_{k}": v for k, v in state.items()}}
    artifacts.save_checkpoint(run_dir, f"{unit}-{number:04d}", arrays, meta)


def restore(run_dir: Path, n_params: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict] | None:
    """(theta, optimizer or server state, metadata) of the run's last checkpoint, if any."""
    found = artifacts.latest_checkpoint(run_dir)
    if found is None:
        return None
    arrays, meta = found
    theta = arrays.pop("theta")
    if theta.shape != (n_params,):
        raise UserError(f"{run_dir}: checkpoint has {theta.shape} parameters, the model {n_params}")
    return theta, {k.removeprefix("state_"): v for k, v in arrays.items()}, meta


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path | None, bool]:
    """The config and, when resuming, the existing run directory; True when that run already
    finished (its summary is printed again, nothing is trained)."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        if args.config or args.sets:
            raise UserError("--resume continues a run with its own config.yaml; drop --config/--set")
        return load_config(run_dir / "config.yaml"), run_dir, (run_dir / "summary.json").is_file()
    config = load_config(args.config, args.sets)
    if args.resume_if_exists:
        run_dir = Path(config.runs.path) / args.run_name
        if (run_dir / "config.yaml").is_file():
            stored = load_config(run_dir / "config.yaml")
            if stored != config:
                raise ConfigError(f"run {run_dir} exists with a different configuration; resume it "
                                  "with the same --config/--set, or choose another --run-name")
            return stored, run_dir, (run_dir / "summary.json").is_file()
    return config, None, False


def summary_metrics(spec: ModelSpec, test: dict[str, float]) -> dict[str, Any]:
    if spec.is_classifier:
        return {"test_loss": test.get("loss"), "test_accuracy": test.get("accuracy")}
    return {"test_loss": test.get("loss"), "test_rmse": test.get("rmse"), "test_r2": test.get("r2")}


def progress_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_")]
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)


def open_run(config: Config, args: argparse.Namespace, run_dir: Path | None) -> Path:
    """The run directory: the resumed one, or a new one holding the resolved config."""
    if run_dir is not None:
        return run_dir
    label = Path(args.config).stem if args.config else "fashion_mnist"
    run_dir = artifacts.new_run_dir(config.runs.path, args.run_name,
                                    f"{label}-{config.trainer.strategy}-s{config.trainer.seed}")
    artifacts.atomic_write(run_dir / "config.yaml", dump_yaml(config).encode())
    return run_dir


def log_step(run_dir: Path, record: dict[str, Any], line: str) -> None:
    print(line, flush=True)
    artifacts.append_metrics(run_dir, record)


def train_data_parallel(spark: SparkSession, config: Config, args: argparse.Namespace,
                        run_dir: Path | None, timings: dict[str, float]) -> tuple[dict, Path]:
    """`local` and `sync`: returns the summary's strategy-specific part and the run directory."""
    t = config.trainer
    mark = time.perf_counter()
    ref = lake.TableRef(config.data.table, config.data.version)
    data = load_blocks(spark, config.lake.path, ref, config.data.partitions, t.seed,
                       config.data.validation_fraction)
    timings["blocks"] = time.perf_counter() - mark
    spec = model_spec(config, data.n_features, data.n_classes)
    opt = optimizer_from(config)
    job = tasks.Job(spec, data.layout, t.dtype, t.batch_size, opt)
    run_dir = open_run(config, args, run_dir)
    theta = initial_theta(config, spec)
    state = TrainState(theta, opt.init_state(theta))
    restored = restore(run_dir, spec.n_params)
    if restored:
        theta, opt_state, meta = restored
        state = TrainState(theta, opt_state, meta["epoch"], meta["step"], meta["history"])
        print(f"resuming {run_dir} after epoch {state.epoch}", flush=True)

    def on_epoch(s: TrainState, record: dict[str, Any]) -> None:
        log_step(run_dir, record, progress_line(record, t.epochs))
        if t.checkpoint_every and s.epoch % t.checkpoint_every == 0 and s.epoch < t.epochs:
            checkpoint(run_dir, "epoch", s.epoch, s.theta, s.opt_state,
                       {"epoch": s.epoch, "step": s.step, "history": s.history})

    mark = time.perf_counter()
    settings = Settings(t.strategy, t.epochs, t.average_every, t.aggregation_depth)
    state = train(spark.sparkContext, data, job, settings, state, on_epoch)
    timings["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    test = evaluate(spark.sparkContext, data, spec, t.dtype, state.theta, ("test",),
                    t.aggregation_depth).get("test", {})
    timings["evaluate"] = time.perf_counter() - mark
    data.release()
    finish_model(run_dir, config, spec, state.theta, data.table, data.version)
    return {
        "data": {"table": data.table, "version": data.version, "train_rows": data.train_rows,
                 "validation_rows": data.validation_rows, "test_rows": data.test_rows,
                 "partitions": data.partitions},
        "epochs": t.epochs,
        **summary_metrics(spec, test),
        "model": {"kind": spec.kind, "layers": list(spec.layers)},
    }, run_dir


def round_line(record: dict[str, Any], rounds: int) -> str:
    parts = [f"round {record['round']}/{rounds}", f"clients {record['reported']}/{record['clients']}"]
    if "train_loss" in record:
        parts.append(f"train_loss {record['train_loss']:.4f}")
    if "test_accuracy" in record:
        parts.append(f"test_accuracy {record['test_accuracy']:.4f}")
    ca = record.get("client_accuracy") or {}
    if ca:
        parts.append(f"client_accuracy mean {ca['mean']:.4f} p10 {ca['p10']:.4f} min {ca['min']:.4f}")
    if "epsilon" in record:
        parts.append(f"epsilon {record['epsilon']:.3f}")
    if record["dropped"]:
        parts.append(f"dropped {len(record['dropped'])}")
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)


def train_federated(spark: SparkSession, config: Config, args: argparse.Namespace,
                    run_dir: Path | None, timings: dict[str, float]) -> tuple[dict, Path]:
    """`federated`: returns the summary's strategy-specific part and the run directory."""
    t, fed = config.trainer, config.federated
    mark = time.perf_counter()
    clients, test = federated.prepare_clients(spark, config)
    timings["blocks"] = time.perf_counter() - mark
    print(federated.partition_report(clients), flush=True)
    federated.check_setup(config, clients.count)
    spec = model_spec(config, clients.n_features, clients.n_classes)
    run_dir = open_run(config, args, run_dir)
    state = federated.initial_state(config, initial_theta(config, spec), clients.count)
    restored = restore(run_dir, spec.n_params)
    if restored:
        theta, server_state, meta = restored
        state = federated.FedState(theta, server_state, meta["round"], meta["history"],
                                   meta["dropped"])
        print(f"resuming {run_dir} after round {state.round}", flush=True)

    def on_round(s: federated.FedState, record: dict[str, Any]) -> None:
        log_step(run_dir, record, round_line(record, fed.rounds))
        if t.checkpoint_every and s.round % t.checkpoint_every == 0 and s.round < fed.rounds:
            checkpoint(run_dir, "round", s.round, s.theta, s.server_state,
                       {"round": s.round, "history": s.history, "dropped": s.dropped})

    mark = time.perf_counter()
    state = federated.fit(spark.sparkContext, config, clients, test, spec, state, on_round)
    timings["train"] = time.perf_counter() - mark
    last = state.history[-1] if state.history else {}
    test_metrics = {k.removeprefix("test_"): v for k, v in last.items() if k.startswith("test_")}
    clients.release()
    if test is not None:
        test.release()
    finish_model(run_dir, config, spec, state.theta, clients.table, clients.version)
    return {
        "data": {"table": clients.table, "version": clients.version,
                 "train_rows": int(clients.sizes.sum()),
                 "test_rows": test.test_rows if test is not None else 0,
                 "partitions": clients.count},
        **federated.summary_fields(config, clients, state),
        **summary_metrics(spec, test_metrics),
        "model": {"kind": spec.kind, "layers": list(spec.layers)},
    }, run_dir


def finish_model(run_dir: Path, config: Config, spec: ModelSpec, theta: np.ndarray | None, table: str,
                 version: int, chunks: Any = None) -> None:
    """model/weights.npz + spec.json; spec.json alone when there are no weights of ours (MLlib's
    MLP, saved by MLlib under model/mllib). `chunks`: the weights in consecutive pieces instead
    of `theta` (model_parallel, never whole on the driver)."""
    meta = {"run_id": run_dir.name, "table": table, "version": version, "n_classes": spec.n_classes,
            "strategy": config.trainer.strategy, "seed": config.trainer.seed}
    if chunks is not None:
        artifacts.save_model_chunks(run_dir, spec, config.trainer.dtype, chunks, meta)
    else:
        artifacts.save_model(run_dir, spec, theta, meta)


def train_model_parallel(spark: SparkSession, config: Config, args: argparse.Namespace,
                         run_dir: Path | None, timings: dict[str, float]) -> tuple[dict, Path]:
    """`model_parallel`: the first layer sharded by feature blocks (pipelines/model_parallel.py)."""
    t, mp = config.trainer, model_parallel
    mark = time.perf_counter()
    cells = mp.prepare(spark, config)
    timings["blocks"] = time.perf_counter() - mark
    spec = model_spec(config, cells.n_features, cells.n_classes)
    grid = mp.grid_for(config, cells, spec)
    run_dir = open_run(config, args, run_dir)
    names = tuple(grid.optimizer.init_state(np.zeros(1)))
    head = mp.initial_head(config, spec, grid)
    restored = mp.restore(spark.sparkContext, run_dir, spec, grid, names)
    if restored:
        restored, head = restored
        print(f"resuming {run_dir} after epoch {head.epoch}", flush=True)
    mark = time.perf_counter()
    carrier = mp.Carrier(spark.sparkContext, grid, cells.handles, mp.Wire(spark.sparkContext, mp.WIRE_LOG),
                         run_dir / "rdd-checkpoints", restored or None)

    def on_epoch(s: mp.HeadState, record: dict[str, Any]) -> None:
        log_step(run_dir, record, progress_line(record, t.epochs))
        if t.checkpoint_every and s.epoch % t.checkpoint_every == 0 and s.epoch < t.epochs:
            artifacts.save_checkpoint_chunks(
                run_dir, f"epoch-{s.epoch:04d}", mp.save_chunks(carrier, spec, s.head, names, s.opt),
                {"epoch": s.epoch, "step": s.step, "history": s.history})

    head = mp.train_epochs(carrier, cells, spec, grid.optimizer, head, t.epochs, on_epoch)
    timings["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    test = mp.evaluate_role(carrier, cells, spec, head.head, "test") if cells.test_rows else {}
    timings["evaluate"] = time.perf_counter() - mark
    finish_model(run_dir, config, spec, None, cells.table, cells.version,
                 chunks=mp.save_chunks(carrier, spec, head.head)["theta"][2])
    summary = mp.summary_fields(carrier, cells)
    carrier.release()
    cells.release()
    return {
        "data": {"table": cells.table, "version": cells.version, "train_rows": cells.layout.n_train,
                 "validation_rows": cells.layout.n_validation, "test_rows": cells.test_rows,
                 "partitions": cells.row_blocks},
        "epochs": t.epochs,
        **summary_metrics(spec, test),
        **summary,
        "model": {"kind": spec.kind, "layers": list(spec.layers)},
    }, run_dir


def train_mllib(spark: SparkSession, config: Config, args: argparse.Namespace,
                run_dir: Path | None, timings: dict[str, float]) -> tuple[dict, Path]:
    """`mllib`: MLlib's estimator on the same table (pipelines/mllib.py)."""
    mark = time.perf_counter()
    result = mllib.fit(spark, config, lambda d, k: model_spec(config, d, k))
    timings["train"] = result["train_seconds"]
    timings["prepare_and_evaluate"] = time.perf_counter() - mark - result["train_seconds"]
    spec, model = result["spec"], result["model"]
    run_dir = open_run(config, args, run_dir)
    model.write().overwrite().save(str(run_dir / "model" / "mllib"))
    finish_model(run_dir, config, spec, mllib.our_weights(model, spec), result["table"], result["version"])
    return {
        "data": {"table": result["table"], "version": result["version"],
                 "train_rows": result["train_rows"], "test_rows": result["test_rows"],
                 "partitions": config.data.partitions},
        "epochs": None,
        "mllib": {"estimator": type(model).__name__.removesuffix("Model") or type(model).__name__,
                  "max_iter": config.mllib.max_iter, "iterations": result["iterations"]},
        **summary_metrics(spec, result["test"]),
        "model": {"kind": spec.kind, "layers": list(spec.layers)},
    }, run_dir


def main(argv: list[str]) -> None:
    started = process_start_time()
    args = parse_args(argv)
    config, run_dir, finished = resolve_run(args)
    if finished:
        print_summary(json.loads((run_dir / "summary.json").read_text()))
        return
    t = config.trainer
    if t.strategy not in AVAILABLE:
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not available in this version; "
                          f"available: {', '.join(AVAILABLE)}")
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    spark = build_session("fedspark-train", config.spark.conf)
    timings["session"] = time.perf_counter() - mark
    runners = {"federated": train_federated, "mllib": train_mllib,
               "model_parallel": train_model_parallel}
    part, run_dir = runners.get(t.strategy, train_data_parallel)(spark, config, args, run_dir, timings)
    summary = {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "strategy": t.strategy,
        "model": part.pop("model"),
        "seed": t.seed,
        "data": part.pop("data"),
        "batch_size": {"federated": config.federated.local_batch_size, "mllib": None}.get(
            t.strategy, t.batch_size),
        **part,
        "train_seconds": round(timings["train"], 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "model_path": str(run_dir / "model"),
    }
    summary["total_seconds"] = round(time.time() - started, 3)
    artifacts.atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    print_summary(summary)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
