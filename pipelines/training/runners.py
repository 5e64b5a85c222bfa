"""The training runners every entry point shares: set up the model and the run, train with the
configured strategy, record and save, and the summary line. `pipelines/train.py`,
`pipelines.ml.estimators` and the benchmarks call these.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pyspark.sql import SparkSession

from pipelines.core.cli import print_summary
from pipelines.core.config import Config, ConfigError, dump_yaml, load_config
from pipelines.core.errors import UserError
from pipelines.core.progress import progress
from pipelines.core.session import build_session
from pipelines.data import lake, preprocess
from pipelines.data.blocks import Blocks, load_blocks
from pipelines.data.direct import BlockCache
from pipelines.data.encoding import Encoding
from pipelines.data.sources import table_encoding
from pipelines.federated import privacy, rounds
from pipelines.federated.clients import Clients, partition_report, prepare_clients
from pipelines.model_parallel import training as model_parallel_training
from pipelines.store import artifacts, rundir
from pipelines.store.rundir import RunDir
from pipelines.store.tracking import Tracker
from pipelines.training import mllib
from pipelines.training.data_parallel import Settings, TrainState, evaluate, optimizer_from, train
from udfs import adapters
from udfs.core.models import Model, ModelSpec
from udfs.core.seeding import Stream, rng
from udfs.data.transform import NONE, Transform
from udfs.training import tasks
from udfs.training.collective import PortRange


def model_spec(config: Config, n_features: int, n_classes: int) -> Model:
    """The configured model for data with `n_features` inputs and `n_classes` classes (0: real
    labels); a model that does not fit the data, or a module that cannot be built, is a UserError."""
    m, table = config.model, config.data.table
    try:
        return adapters.build(adapters.ModelRequest(
            m.kind, n_features, n_classes, tuple(m.hidden),
            tuple(m.input_shape) if m.input_shape is not None else None, torch_request(config),
            adapters.SklearnRequest(m.sklearn.estimator, dict(m.sklearn.params)) if m.sklearn.estimator else None))
    except ValueError as exc:
        raise UserError(f"{exc} (table {table!r}: {n_features} features, "
                        f"{f'{n_classes} classes' if n_classes else 'real-valued labels'})") from None


def builtin_spec(config: Config, n_features: int, n_classes: int) -> ModelSpec:
    """model_spec for the strategies that train only the built-in models (mllib, model_parallel:
    the config refuses a user's model for them before any work)."""
    spec = model_spec(config, n_features, n_classes)
    if not isinstance(spec, ModelSpec):
        raise UserError(f"trainer.strategy={config.trainer.strategy} trains only the built-in models")
    return spec


def torch_request(config: Config) -> adapters.TorchRequest | None:
    """model.torch as the adapter takes it, the user's file (model.torch.file) read here."""
    t = config.model.torch
    if t.module is None:
        return None
    name = text = None
    if t.file is not None:
        path = Path(t.file)
        if not path.is_file():
            raise UserError(f"model.torch.file={t.file}: no such file")
        name, text = path.name, path.read_text()
    return adapters.TorchRequest(t.module, dict(t.kwargs), t.loss, name, text)


def initial_theta(config: Config, spec: Model) -> np.ndarray:
    return spec.init(rng(config.trainer.seed, Stream.INIT), config.model.init, np.dtype(config.trainer.dtype))


def restore(run_dir: RunDir, n_params: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict] | None:
    """(theta, optimizer or server state, metadata) of the run's last checkpoint, if any."""
    found = artifacts.latest_checkpoint(run_dir)
    if found is None:
        return None
    arrays, meta = found
    theta = arrays.pop("theta")
    if theta.shape != (n_params,):
        raise UserError(f"{run_dir}: checkpoint has {theta.shape} parameters, the model {n_params}")
    return theta, {k.removeprefix("state_"): v for k, v in arrays.items()}, meta


def checkpoint_arrays(theta: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"theta": theta, **{f"state_{k}": v for k, v in state.items()}}


@dataclass
class Job:
    """One invocation of train.py: its session, config and arguments, the run it continues (if
    any), and, once a runner opens the run, that run's tracker. `wire_log`, when given, records
    what a model_parallel run's label owner sends to and receives from the cells (model_parallel's
    Wire: tests inspect what crosses between parties)."""

    spark: SparkSession
    config: Config
    args: argparse.Namespace
    resume_dir: RunDir | None
    pinned: lake.Pinned | None
    timings: dict[str, float] = field(default_factory=dict)
    tracker: Tracker | None = None
    history: list[dict] = field(default_factory=list)
    wire_log: list | None = None

    def open_run(self, table: str, version: int, unit: str, total: int) -> Tracker:
        """The run directory (the resumed one, or a new one holding the resolved config) and its
        tracker."""
        run_dir = self.resume_dir
        if run_dir is None:
            label = Path(self.args.config).stem if self.args.config else "fashion_mnist"
            run_dir = artifacts.new_run_dir(self.config.runs.path, self.args.run_name,
                                            f"{label}-{self.config.trainer.strategy}-s{self.config.trainer.seed}")
            artifacts.write(run_dir, "config.yaml", dump_yaml(self.config).encode())
            if self.pinned is not None:
                artifacts.write(run_dir, TABLE_FILE, json.dumps(asdict(self.pinned)).encode())
        self.tracker = Tracker(self.spark, self.config, run_dir, unit, total, table, version)
        return self.tracker


# run file: the table version a run reads and the table's Delta id (lake.Pinned)
TABLE_FILE = "table.json"


def pin_data(spark: SparkSession, config: Config, resume_dir: RunDir | None
             ) -> tuple[Config, lake.Pinned | None]:
    """The config with data.version resolved, and what it is pinned to: for a new run the version
    the config names (the latest when it names none), for a resumed one what the run recorded,
    checked to be the same table with that version's files all still there. A vertical run reads
    its parties' tables, not data.table: nothing is pinned (their versions are not yet)."""
    if config.model_parallel.parties:
        return config, None
    recorded = resume_dir.read(TABLE_FILE) if resume_dir is not None else None
    if recorded is None:
        pinned = lake.pin(spark, config.lake.path, lake.TableRef(config.data.table, config.data.version))
    else:
        pinned = lake.Pinned(**json.loads(recorded))
        lake.check_pinned(spark, config.lake.path, pinned)
    return config.with_version(pinned.version), pinned


def resolve_run(args: argparse.Namespace) -> tuple[Config, RunDir | None, str | None]:
    """The config, the existing run directory to continue (if any), and the run name to lock."""
    if args.resume:
        run_dir = rundir.open_run(args.resume)
        config_file = run_dir.fetch("config.yaml")
        if config_file is None:
            run_dir.close()
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        if args.config or args.sets:
            run_dir.close()
            raise UserError("--resume continues a run with its own config.yaml; drop --config/--set")
        config = load_config(config_file)
        if config.holds_redactions():
            run_dir.close()
            raise UserError(f"--resume {run_dir}: its config held credentials, which are not stored; "
                            "resume it with its --run-name, --resume-if-exists and the same "
                            "--config/--set instead")
        name = artifacts.run_name_of(run_dir) or run_dir.name
        try:
            artifacts.check_run_name(name)   # it becomes a lock file's name
        except UserError as exc:
            run_dir.close()
            raise UserError(f"--resume {run_dir}: its run.json names the run {name!r}, which is not "
                            "a run name: letters, digits, '.', '_' and '-'") from exc
        return config, run_dir, name
    config = load_config(args.config, args.sets)
    return config, None, artifacts.check_run_name(args.run_name) if args.run_name else None


def interrupted_run(config: Config, run_name: str) -> RunDir | None:
    """--resume-if-exists: the newest run of that name if it did not finish (to continue it)."""
    run_dir = artifacts.newest_run(config.runs.path, run_name)
    if run_dir is None:
        return None
    config_file = None if run_dir.exists("summary.json") else run_dir.fetch("config.yaml")
    if config_file is None:
        run_dir.close()
        return None
    stored = load_config(config_file)
    if config.data.version is None:   # the run pinned the version it found at its start
        stored = stored.with_version(None)
    if stored != config.redacted():
        run_dir.close()
        raise ConfigError(f"run {run_dir} was interrupted with a different configuration; resume it "
                          f"with its own config (--resume {run_dir}), or choose another --run-name")
    return run_dir


@dataclass(frozen=True)
class DataUsed:
    """The table version a run read and how many rows it used for what (the summary's `data`).
    `validation_rows`: None for the strategies that hold out no validation share of their own."""

    table: str
    version: int
    train_rows: int
    test_rows: int
    partitions: int
    validation_rows: int | None = None


@dataclass(frozen=True)
class Trained:
    """What a runner returns to `run`: the data it read, the model, its test metrics, its length
    in epochs (None for federated, which counts rounds), and the summary fields only its strategy
    has (federated's clients and rounds, model_parallel's shards, MLlib's iterations), which go
    into the summary line as they are."""

    data: DataUsed
    spec: Model
    test: dict[str, float]
    epochs: int | None
    details: dict[str, Any] = field(default_factory=dict)

    def summary_fields(self) -> dict[str, Any]:
        """The runner's part of the summary line (CONTRACT.md), in its order."""
        return {"model": self.spec.describe(),
                "data": asdict(self.data), "epochs": self.epochs,
                **self.details, **summary_metrics(self.spec, self.test)}


def summary_metrics(spec: Model, test: dict[str, float]) -> dict[str, Any]:
    if spec.is_classifier:
        return {"test_loss": test.get("loss"), "test_accuracy": test.get("accuracy")}
    return {"test_loss": test.get("loss"), "test_rmse": test.get("rmse"), "test_r2": test.get("r2")}


def progress_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_")]
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)


def settings_of(config: Config) -> Settings:
    t = config.trainer
    return Settings(t.strategy, t.epochs, t.average_every, t.aggregation_depth,
                    t.checkpoint_every or None, PortRange.parse(t.sync_ports))


def data_parallel_start(config: Config, data: Blocks) -> tuple[Model, tasks.Job, TrainState]:
    """`local` and `sync` on `data`: the model, what every task needs, and the initial state."""
    t = config.trainer
    spec = model_spec(config, data.n_features, data.n_classes)
    opt = optimizer_from(config)
    theta = initial_theta(config, spec)
    return spec, tasks.Job(spec, data.layout, t.dtype, t.batch_size, opt), TrainState(theta, opt.init_state(theta))


def federated_start(config: Config, clients: Clients) -> tuple[Model, rounds.FedState]:
    """`federated` over `clients`: the settings that depend on the clients checked, the model, and
    the initial server state."""
    rounds.check_setup(config, clients.count)
    spec = model_spec(config, clients.n_features, clients.n_classes)
    return spec, rounds.initial_state(config, initial_theta(config, spec), clients.count)


def train_data_parallel(job: Job) -> Trained:
    """`local` and `sync`: the summary's strategy-specific part."""
    spark, config, t = job.spark, job.config, job.config.trainer
    mark = time.perf_counter()
    ref = lake.TableRef(config.data.table, config.data.version)
    transform = fitted_transform(job)
    with progress(spark.sparkContext, f"building blocks from {ref.name}"):
        data = load_blocks(spark, config.lake.path, ref, config.data.partitions, t.seed,
                           config.data.validation_fraction, cache_gb=config.data.worker_cache_gb,
                           block_cache=BlockCache.of(config.data), transform=transform)
    job.timings["blocks"] = time.perf_counter() - mark
    spec, task, state = data_parallel_start(config, data)
    tracker = job.open_run(data.table, data.version, "epoch", t.epochs)
    restored = restore(tracker.run_dir, spec.n_params)
    if restored:
        theta, opt_state, meta = restored
        state = TrainState(theta, opt_state, meta["epoch"], meta["step"], meta["history"],
                           meta.get("epoch_loss", 0.0))
        tracker.resumed(state.history, f"epoch {state.epoch}" + (
            f", step {state.step}" if meta.get("unit") == "step" else ""))

    def save(s: TrainState, unit: str, number: int) -> None:
        tracker.checkpoint(s.history, f"{unit}-{number:04d}", checkpoint_arrays(s.theta, s.opt_state),
                           {"unit": unit, "epoch": s.epoch, "step": s.step, "history": s.history,
                            "epoch_loss": s.epoch_loss})

    every = t.checkpoint_every
    sync = t.strategy == "sync"

    def on_epoch(s: TrainState, record: dict[str, Any]) -> None:
        tracker.log(record, progress_line(record, t.epochs))
        if every and not sync and s.epoch % every == 0 and s.epoch < t.epochs:
            save(s, "epoch", s.epoch)

    def on_step(s: TrainState) -> None:  # sync counts checkpoint_every in optimizer steps
        if s.step % every == 0:
            save(s, "step", s.step)

    mark = time.perf_counter()
    state = train(spark.sparkContext, data, task, settings_of(config), state, on_epoch,
                  on_step if sync and every else None, f"run {tracker.run_id}")
    job.timings["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    test = evaluate(spark.sparkContext, data, spec, t.dtype, state.theta, ("test",),
                    t.aggregation_depth).get("test", {})
    job.timings["evaluate"] = time.perf_counter() - mark
    data.release()
    finish_model(tracker.run_dir, config, spec, state.theta, data.table, data.version, transform=transform,
                 encoding=table_encoding(spark, config.lake.path, data.table))
    job.history = state.history
    return Trained(DataUsed(data.table, data.version, data.train_rows, data.test_rows, data.partitions,
                            data.validation_rows), spec, test, t.epochs,
                   {"stage_retries": state.stage_retries} if sync else {})


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


def train_federated(job: Job) -> Trained:
    """`federated`: the summary's strategy-specific part."""
    spark, config = job.spark, job.config
    t, fed = config.trainer, config.federated
    mark = time.perf_counter()
    transform = fitted_transform(job)
    with progress(spark.sparkContext, f"building client blocks from {config.data.table}"):
        clients, test = prepare_clients(spark, config, transform)
    job.timings["blocks"] = time.perf_counter() - mark
    print(partition_report(clients), flush=True)
    spec, state = federated_start(config, clients)
    tracker = job.open_run(clients.table, clients.version, "round", fed.rounds)
    tracker.names = dict(enumerate(clients.names))
    restored = restore(tracker.run_dir, spec.n_params)
    if restored:
        theta, server_state, meta = restored
        state = rounds.FedState(theta, server_state, meta["round"], meta["history"],
                                   meta["dropped"])
        tracker.resumed(state.history, f"round {state.round}")

    def on_round(s: rounds.FedState, record: dict[str, Any]) -> None:
        tracker.log(record, round_line(record, fed.rounds))
        if t.checkpoint_every and s.round % t.checkpoint_every == 0 and s.round < fed.rounds:
            tracker.checkpoint(s.history, f"round-{s.round:04d}",
                               checkpoint_arrays(s.theta, s.server_state),
                               {"round": s.round, "history": s.history, "dropped": s.dropped})

    mark = time.perf_counter()
    secret = artifacts.noise_secret(tracker.run_dir) if privacy.needs_secret(config) else None
    state = rounds.fit(spark.sparkContext, config, clients, test, spec, state, on_round,
                       run_id=tracker.run_id, noise_secret=secret)
    job.timings["train"] = time.perf_counter() - mark
    if state.stopped:
        tracker.event(f"stopped after round {state.round}: {state.stopped}")
    last = state.history[-1] if state.history else {}
    test_metrics = {k.removeprefix("test_"): v for k, v in last.items() if k.startswith("test_")}
    clients.release()
    if test is not None:
        test.release()
    finish_model(tracker.run_dir, config, spec, state.theta, clients.table, clients.version,
                 transform=transform, encoding=table_encoding(spark, config.lake.path, clients.table))
    job.history = state.history
    return Trained(DataUsed(clients.table, clients.version, int(clients.sizes.sum()),
                            test.test_rows if test is not None else 0, clients.count),
                   spec, test_metrics, None, rounds.summary_fields(config, clients, state))


def fitted_transform(job: Job) -> Transform:
    """The run's feature transform (pipelines/data/preprocess.py), timed as `stats` when it needs
    the table's statistics."""
    if not job.config.data.transforms:
        return NONE
    mark = time.perf_counter()
    with progress(job.spark.sparkContext, f"feature statistics of {job.config.data.table}"):
        transform = preprocess.for_run(job.spark, job.config)
    job.timings["stats"] = time.perf_counter() - mark
    return transform


def finish_model(run_dir: RunDir, config: Config, spec: Model, theta: np.ndarray | None, table: str,
                 version: int, chunks: Any = None, transform: Transform = NONE,
                 encoding: Encoding | None = None) -> None:
    """model/weights.npz + spec.json; spec.json alone when there are no weights of ours (MLlib's
    MLP, saved by MLlib under model/mllib). `chunks`: the weights in consecutive pieces instead
    of `theta` (model_parallel, never whole on the driver). spec.json records the feature
    transform, which evaluate.py, score.py and FedsparkModel apply to the rows they read, and the
    table's categorical encoding (its vocabulary, pipelines/data/encoding.py), if it has one."""
    meta = {"run_id": run_dir.name, "table": table, "version": version, "n_classes": spec.n_classes,
            "strategy": config.trainer.strategy, "seed": config.trainer.seed,
            "transform": transform.to_dict(),
            **({"encoding": encoding.to_dict()} if encoding is not None else {})}
    if chunks is not None:
        artifacts.save_model_chunks(run_dir, spec, config.trainer.dtype, chunks, meta)
    else:
        artifacts.save_model(run_dir, spec, theta, meta)


def train_model_parallel(job: Job) -> Trained:
    """`model_parallel`: the first layer sharded by feature blocks (pipelines/model_parallel/training.py)."""
    spark, config = job.spark, job.config
    t, mp = config.trainer, model_parallel_training
    mark = time.perf_counter()
    with progress(spark.sparkContext, "building model-parallel cells"):
        cells = mp.prepare(spark, config)
    job.timings["blocks"] = time.perf_counter() - mark
    spec = builtin_spec(config, cells.n_features, cells.n_classes)
    grid = mp.grid_for(config, cells, spec)
    tracker = job.open_run(cells.table, cells.version, "epoch", t.epochs)
    names = tuple(grid.optimizer.init_state(np.zeros(1)))
    head = mp.initial_head(config, spec, grid)
    restored = mp.restore(spark.sparkContext, tracker.run_dir, spec, grid, names)
    start_cells: dict[int, Any] | None = None
    if restored:
        start_cells, head = restored
        tracker.resumed(head.history, f"epoch {head.epoch}")
    mark = time.perf_counter()
    carrier = mp.Carrier(spark.sparkContext, grid, cells.handles, mp.Wire(spark.sparkContext, job.wire_log),
                         tracker.run_dir.child("rdd-checkpoints"), start_cells or None)

    def on_epoch(s: mp.HeadState, record: dict[str, Any]) -> None:
        tracker.log(record, progress_line(record, t.epochs))
        if t.checkpoint_every and s.epoch % t.checkpoint_every == 0 and s.epoch < t.epochs:
            tracker.flush(s.history)
            artifacts.save_checkpoint_chunks(
                tracker.run_dir, f"epoch-{s.epoch:04d}", mp.save_chunks(carrier, spec, s.head, names, s.opt),
                {"epoch": s.epoch, "step": s.step, "history": s.history})

    with mp.cells_kept(tracker.run_dir.uri):
        head = mp.train_epochs(carrier, cells, spec, grid.optimizer, head, t.epochs, on_epoch)
        job.timings["train"] = time.perf_counter() - mark
        mark = time.perf_counter()
        test = mp.evaluate_role(carrier, cells, spec, head.head, "test") if cells.test_rows else {}
        job.timings["evaluate"] = time.perf_counter() - mark
        finish_model(tracker.run_dir, config, spec, None, cells.table, cells.version,
                     chunks=mp.save_chunks(carrier, spec, head.head)["theta"][2])
    summary = mp.summary_fields(carrier, cells)
    carrier.release()
    cells.release()
    job.history = head.history
    return Trained(DataUsed(cells.table, cells.version, cells.layout.n_train, cells.test_rows, cells.row_blocks,
                            cells.layout.n_validation), spec, test, t.epochs, summary)


def train_mllib(job: Job) -> Trained:
    """`mllib`: MLlib's estimator on the same table (pipelines/training/mllib.py)."""
    spark, config = job.spark, job.config
    mark = time.perf_counter()
    fitted = mllib.fit(spark, config, partial(builtin_spec, config))
    job.timings["train"] = fitted.train_seconds
    job.timings["prepare_and_evaluate"] = time.perf_counter() - mark - fitted.train_seconds
    spec, model = fitted.spec, fitted.model
    tracker = job.open_run(fitted.table, fitted.version, "epoch", 0)
    fitted.save(tracker.run_dir.child("model/mllib"))
    finish_model(tracker.run_dir, config, spec, mllib.our_weights(model, spec), fitted.table, fitted.version)
    estimator = type(model).__name__.removesuffix("Model") or type(model).__name__
    return Trained(DataUsed(fitted.table, fitted.version, fitted.train_rows, fitted.test_rows,
                            config.data.partitions), spec, fitted.test, None,
                   {"mllib": {"estimator": estimator, "max_iter": config.mllib.max_iter,
                              "iterations": fitted.iterations}})


RUNNERS: dict[str, Callable[[Job], Trained]] = {
    "local": train_data_parallel, "sync": train_data_parallel, "federated": train_federated,
    "mllib": train_mllib, "model_parallel": train_model_parallel,
}


def run(config: Config, args: argparse.Namespace, resume_dir: RunDir | None, started: float,
        wire_log: list | None = None) -> None:
    """Train, record and save one run; the summary line is the last thing printed. `wire_log`: see
    Job."""
    t = config.trainer
    mark = time.perf_counter()
    spark = build_session("fedspark-train", config.spark.conf, config.spark.delta_packages)
    timings = {"session": time.perf_counter() - mark}
    config, pinned = pin_data(spark, config, resume_dir)
    job = Job(spark, config, args, resume_dir, pinned, timings, wire_log=wire_log)
    try:
        trained = RUNNERS[t.strategy](job)
        tracker = job.tracker
        if tracker is None:
            raise RuntimeError(f"the {t.strategy!r} runner returned without opening a run")
        run_dir = tracker.run_dir
        summary = {
            "run_id": run_dir.name,
            "run_name": artifacts.run_name_of(run_dir),
            "run_dir": run_dir.uri,
            "strategy": t.strategy,
            "seed": t.seed,
            "batch_size": {"federated": config.federated.local_batch_size, "mllib": None}.get(
                t.strategy, t.batch_size),
            **trained.summary_fields(),
            "train_seconds": round(job.timings["train"], 3),
            "timings": {k: round(v, 3) for k, v in job.timings.items()},
            "model_path": run_dir.child("model"),
        }
        summary["total_seconds"] = round(time.time() - started, 3)
        tracker.completed(summary, job.history, "test_accuracy" in summary)
    except BaseException as exc:
        if job.tracker is not None:
            job.tracker.failed(exc)
        opened = job.tracker.run_dir if job.tracker is not None else resume_dir
        if opened is not None:
            opened.close()  # a remote run's staging copy: what was finished is published
        raise
    artifacts.write(run_dir, "summary.json", json.dumps(summary, indent=2).encode())
    run_dir.close()
    print_summary(summary)


