"""The data-parallel training strategies (driver side): `local` and `sync`.

Both run epoch by epoch over the cached block handles and share the same state, so a checkpoint
taken after any epoch resumes either one to the same result:

* local: each job, every partition runs up to `average_every` local steps (default: its whole
  share of the epoch) from the broadcast weights and optimizer state; the driver averages weights
  and optimizer buffers by sample count. One Spark job per averaging round.
* sync: each global mini-batch is one job: every partition sums the gradient over its rows of the
  batch, `reduce_in_order` adds them up, the driver's optimizer steps. The maths of one machine doing
  mini-batch SGD on the global batch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from pyspark import RDD, SparkContext

from pipelines.core.config import Config
from pipelines.core.progress import progress
from pipelines.data.blocks import Blocks
from udfs.core.models import ModelSpec
from udfs.core.optimizers import Optimizer
from udfs.training import tasks


@dataclass
class TrainState:
    """Everything training needs to continue: weights, optimizer buffers, epochs done, and (sync) the
    driver's optimizer step count."""

    theta: np.ndarray
    opt_state: dict[str, np.ndarray]
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_loss: float = 0.0  # sync: the loss summed over the current epoch's steps so far


@dataclass(frozen=True)
class Settings:
    strategy: str
    epochs: int
    average_every: int | None
    depth: int


EpochHook = Callable[[TrainState, dict], None]
StepHook = Callable[[TrainState], None]


def reduce_in_order(rdd: RDD, depth: int) -> Any:
    """The sum (udfs.tasks.add) of everything the tasks of `rdd` yield, added in partition order
    through a tree of `depth` levels (Spark's treeAggregate shape: fan-in ceil(P^(1/depth)), a level
    only while it pays), so the same job gives bit-identical sums however its tasks finish."""
    partials = rdd.mapPartitionsWithIndex(tasks.partition_sum)
    n = rdd.getNumPartitions()
    fan = max(math.ceil(n ** (1.0 / max(depth, 1))), 2)
    while depth > 1 and n > fan + n / fan:
        n = -(-n // fan)
        partials = partials.map(partial(tasks.regroup, fan=fan)).groupByKey(n).map(tasks.sum_group)
    return tasks.sum_group((0, partials.collect()))[1]


def summed(handles: RDD, fn: Callable[..., Any], depth: int) -> Any:
    """`fn` over every partition of the block handles, its results added in partition order."""
    return reduce_in_order(handles.mapPartitions(fn), depth)


def optimizer_from(config: Config) -> Optimizer:
    """The optimizer `trainer.optimizer` names: the driver's in `sync`, each partition's in
    `local`, each client's in `federated`."""
    o = config.trainer.optimizer
    return Optimizer(o.name, o.lr, o.beta1, o.beta2, o.eps, o.momentum)


def evaluate(sc: SparkContext, data: Blocks, spec: ModelSpec, dtype: str, theta: np.ndarray,
             which: tuple[str, ...], depth: int = 2) -> dict[str, dict[str, float]]:
    """Loss and accuracy (or RMSE and R^2) of theta on the named roles, computed on the executors."""
    bc = sc.broadcast(theta)
    try:
        sums = data.run(partial(summed, fn=partial(tasks.evaluate, spec=spec, layout=data.layout,
                                                   dtype=dtype, which=which, weights=bc), depth=depth))
    finally:
        bc.destroy()
    return {role: metrics_from_sums(spec, sums[role]) for role in which} if sums else {}


def metrics_from_sums(spec: ModelSpec, sums: np.ndarray) -> dict[str, float]:
    n, loss, correct, sse, y_sum, y2_sum = (float(x) for x in sums)
    if n == 0:
        return {"rows": 0}
    if spec.is_classifier:
        return {"rows": int(n), "loss": loss / n, "accuracy": correct / n}
    ss_tot = y2_sum - y_sum * y_sum / n
    return {"rows": int(n), "loss": sse / n, "rmse": float(np.sqrt(sse / n)),
            "r2": 1.0 - sse / ss_tot if ss_tot > 0 else 0.0}


def _local_epoch(sc: SparkContext, data: Blocks, job: tasks.Job, settings: Settings,
                 state: TrainState, on_step: StepHook | None = None) -> float:
    """One epoch of local SGD in ceil(steps / average_every) averaging rounds (one when
    average_every is unset); returns the mean training loss over the epoch's local batches."""
    steps = tasks.steps_per_epoch(data.layout.n_train, job.batch_size)
    every = settings.average_every or steps
    loss_sum, batches = 0.0, 0
    for round_ in range(-(-steps // every)):
        bc = sc.broadcast((state.theta, state.opt_state))
        try:
            task = tasks.LocalRound(job, state.epoch, round_, settings.average_every)
            total = data.run(partial(summed, fn=partial(tasks.local_round, task=task, weights=bc),
                                     depth=settings.depth))
        finally:
            bc.destroy()
        n, theta_sum, state_sums, round_loss, round_batches = total
        state.theta = (theta_sum / n).astype(state.theta.dtype)
        state.opt_state = {k: (v / n).astype(state.theta.dtype) for k, v in state_sums.items()}
        loss_sum += round_loss
        batches += round_batches
    return loss_sum / max(batches, 1)


def _sync_epoch(sc: SparkContext, data: Blocks, job: tasks.Job, settings: Settings,
                state: TrainState, on_step: StepHook | None = None) -> float:
    """The rest of the current epoch of synchronous mini-batch SGD (all of it, unless a checkpoint
    taken after a step is being resumed); returns the mean of the epoch's batch losses. `on_step`
    runs after every optimizer step."""
    steps = tasks.steps_per_epoch(data.layout.n_train, job.batch_size)
    for batch in range(state.step - state.epoch * steps, steps):
        bc = sc.broadcast(state.theta)
        try:
            grad_sum, batch_loss, count = data.run(partial(summed, fn=partial(
                tasks.sync_gradient, job=job, epoch=state.epoch, batch=batch, weights=bc), depth=settings.depth))
        finally:
            bc.destroy(blocking=False)
        state.step += 1
        job.optimizer.step(state.theta, (grad_sum / count).astype(state.theta.dtype),
                           state.opt_state, state.step)
        state.epoch_loss += batch_loss / count
        if on_step is not None:
            on_step(state)
    loss, state.epoch_loss = state.epoch_loss / steps, 0.0
    return loss


EPOCH_RUNNERS = {"local": _local_epoch, "sync": _sync_epoch}


def train(sc: SparkContext, data: Blocks, job: tasks.Job, settings: Settings, state: TrainState,
          on_epoch: EpochHook, on_step: StepHook | None = None, tag: str = "") -> TrainState:
    """Run the remaining epochs; after each, validate on the executors and call `on_epoch` (and,
    in `sync`, `on_step` after every step). A long epoch reports its progress, tagged `tag`."""
    run_epoch = EPOCH_RUNNERS[settings.strategy]
    steps = tasks.steps_per_epoch(data.layout.n_train, job.batch_size)
    jobs = steps if settings.strategy == "sync" else -(-steps // (settings.average_every or steps))
    while state.epoch < settings.epochs:
        started = time.perf_counter()
        with progress(sc, f"training epoch {state.epoch + 1}/{settings.epochs}", tag,
                      expected_tasks=jobs * data.partitions, closing_line=False):
            train_loss = run_epoch(sc, data, job, settings, state, on_step)
        state.epoch += 1
        record = {"epoch": state.epoch, "train_loss": train_loss}
        if data.validation_rows:
            val = evaluate(sc, data, job.spec, job.dtype, state.theta, ("validation",),
                           settings.depth)["validation"]
            record.update({f"val_{k}": v for k, v in val.items() if k != "rows"})
        record["seconds"] = time.perf_counter() - started
        state.history.append(record)
        on_epoch(state, record)
    return state
