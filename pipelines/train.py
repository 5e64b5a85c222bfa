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

from pipelines import artifacts, lake
from pipelines.cli import main_wrapper, print_summary, process_start_time
from pipelines.config import Config, ConfigError, dump_yaml, load_config
from pipelines.data import Blocks, load_blocks
from pipelines.errors import UserError
from pipelines.session import build_session
from pipelines.strategies import Settings, TrainState, evaluate, train
from udfs import tasks
from udfs.models import ModelSpec, init_params
from udfs.optimizers import Optimizer
from udfs.seeding import Stream, rng

AVAILABLE = ("local", "sync")


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


def model_spec(config: Config, data: Blocks) -> ModelSpec:
    kind = config.model.kind
    if kind != "linear" and data.n_classes == 0:
        raise UserError(f"model.kind={kind} needs integer class labels, but table {data.table!r} "
                        "has real-valued labels; use model.kind=linear")
    if kind == "logistic" and data.n_classes > 2:
        raise UserError(f"model.kind=logistic is binary, but table {data.table!r} has "
                        f"{data.n_classes} classes; use softmax or mlp")
    return ModelSpec.build(kind, data.n_features, max(data.n_classes, 1), config.model.hidden)


def optimizer(config: Config) -> Optimizer:
    o = config.trainer.optimizer
    return Optimizer(o.name, o.lr, o.beta1, o.beta2, o.eps, o.momentum)


def initial_state(config: Config, spec: ModelSpec, opt: Optimizer) -> TrainState:
    theta = init_params(spec, rng(config.trainer.seed, Stream.INIT), config.model.init,
                        np.dtype(config.trainer.dtype))
    return TrainState(theta, opt.init_state(theta))


def restore_state(run_dir: Path, fresh: TrainState) -> TrainState:
    found = artifacts.latest_checkpoint(run_dir)
    if found is None:
        return fresh
    arrays, meta = found
    theta = arrays.pop("theta")
    if theta.shape != fresh.theta.shape:
        raise UserError(f"{run_dir}: checkpoint has {theta.shape} parameters, the model {fresh.theta.shape}")
    return TrainState(theta, {k.removeprefix("opt_"): v for k, v in arrays.items()},
                      meta["epoch"], meta["step"], meta["history"])


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
    sc = spark.sparkContext
    timings["session"] = time.perf_counter() - mark

    mark = time.perf_counter()
    ref = lake.TableRef(config.data.table, config.data.version)
    data = load_blocks(spark, config.lake.path, ref, config.data.partitions, t.seed,
                       config.data.validation_fraction)
    timings["blocks"] = time.perf_counter() - mark
    spec = model_spec(config, data)
    opt = optimizer(config)
    job = tasks.Job(spec, data.layout, t.dtype, t.batch_size, opt)

    if run_dir is None:
        label = Path(args.config).stem if args.config else "fashion_mnist"
        run_dir = artifacts.new_run_dir(config.runs.path, args.run_name,
                                        f"{label}-{t.strategy}-s{t.seed}")
        artifacts.atomic_write(run_dir / "config.yaml", dump_yaml(config).encode())
    state = restore_state(run_dir, initial_state(config, spec, opt))
    if state.epoch:
        print(f"resuming {run_dir} after epoch {state.epoch}", flush=True)

    def on_epoch(s: TrainState, record: dict[str, Any]) -> None:
        print(progress_line(record, t.epochs), flush=True)
        artifacts.append_metrics(run_dir, record)
        if t.checkpoint_every and s.epoch % t.checkpoint_every == 0 and s.epoch < t.epochs:
            arrays = {"theta": s.theta, **{f"opt_{k}": v for k, v in s.opt_state.items()}}
            artifacts.save_checkpoint(run_dir, s.epoch, arrays,
                                      {"epoch": s.epoch, "step": s.step, "history": s.history})

    mark = time.perf_counter()
    settings = Settings(t.strategy, t.epochs, t.average_every, t.aggregation_depth)
    state = train(sc, data, job, settings, state, on_epoch)
    timings["train"] = time.perf_counter() - mark

    mark = time.perf_counter()
    test = evaluate(sc, data, spec, t.dtype, state.theta, ("test",), t.aggregation_depth).get("test", {})
    timings["evaluate"] = time.perf_counter() - mark
    model_dir = artifacts.save_model(run_dir, spec, state.theta, {
        "run_id": run_dir.name, "table": data.table, "version": data.version,
        "n_classes": spec.n_classes, "strategy": t.strategy, "seed": t.seed})
    data.release()
    summary = {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "strategy": t.strategy,
        "model": {"kind": spec.kind, "layers": list(spec.layers)},
        "seed": t.seed,
        "data": {"table": data.table, "version": data.version, "train_rows": data.train_rows,
                 "validation_rows": data.validation_rows, "test_rows": data.test_rows,
                 "partitions": data.partitions},
        "batch_size": t.batch_size,
        "epochs": t.epochs,
        **summary_metrics(spec, test),
        "train_seconds": round(timings["train"], 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "model_path": str(model_dir),
    }
    summary["total_seconds"] = round(time.time() - started, 3)
    artifacts.atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    print_summary(summary)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
