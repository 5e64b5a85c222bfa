"""The data-parallel training strategies (driver side): `local` and `sync`.

Both run epoch by epoch over the cached block handles and share the same state, so a checkpoint
taken after any epoch resumes either one to the same result:

* local: each job, every partition runs up to `average_every` local steps (default: its whole
  share of the epoch) from the broadcast weights and optimizer state; the driver averages weights
  and optimizer buffers by sample count. One Spark job per averaging round.
* sync: barrier stages of up to an epoch of steps (fewer when checkpoint_every says so). Every task
  keeps its blocks and, for each global mini-batch, sums the gradient over its rows of the batch;
  the tasks all-reduce the sums over their own TCP ring (udfs/training/collective.py) and all apply
  the same optimizer step. The maths of one machine doing mini-batch SGD on the global batch, with
  one Spark job per stage instead of one per step.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from pyspark import RDD, SparkContext

from pipelines.core.config import Config
from pipelines.core.errors import UserError
from pipelines.core.progress import progress
from pipelines.data.blocks import Blocks
from pipelines.training import rendezvous
from udfs.core.models import Model
from udfs.core.optimizers import Optimizer
from udfs.training import tasks
from udfs.training.collective import PortRange

MAX_STAGE_ATTEMPTS = 3
SLOT_WAIT_S = 60.0


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
    stage_retries: int = 0   # sync: barrier stages run again after a lost task


@dataclass(frozen=True)
class Settings:
    strategy: str
    epochs: int
    average_every: int | None
    depth: int
    stage_steps: int | None = None   # sync: optimizer steps per barrier stage (None: an epoch)
    ports: PortRange = PortRange()   # sync: where its tasks listen for the all-reduce


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


def evaluate(sc: SparkContext, data: Blocks, spec: Model, dtype: str, theta: np.ndarray,
             which: tuple[str, ...], depth: int = 2) -> dict[str, dict[str, float]]:
    """Loss and accuracy (or RMSE and R^2) of theta on the named roles, computed on the executors."""
    bc = sc.broadcast(theta)
    try:
        sums = data.run(partial(summed, fn=partial(tasks.evaluate, spec=spec, layout=data.layout,
                                                   dtype=dtype, which=which, weights=bc), depth=depth))
    finally:
        bc.destroy()
    return {role: metrics_from_sums(spec, sums[role]) for role in which} if sums else {}


def metrics_from_sums(spec: Model, sums: np.ndarray) -> dict[str, float]:
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


def barrier_slots(sc: SparkContext) -> int:
    """Tasks the application can run at once: what a barrier stage may ask for. Spark's own count
    (the one its barrier check uses), waiting a little for a cluster's executors to register."""
    conf = sc.getConf()
    if conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        raise UserError("trainer.strategy=sync runs barrier stages, which Spark refuses under dynamic "
                        "allocation: set spark.dynamicAllocation.enabled=false (spark.conf in the "
                        "job config or spark-submit --conf)")
    jsc = sc._jsc.sc()
    deadline = time.monotonic() + SLOT_WAIT_S
    while True:
        slots = int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
        if slots > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if slots < 1:
        raise UserError(f"trainer.strategy=sync found no executor with a free task slot after "
                        f"{SLOT_WAIT_S:.0f} s (master {sc.master}): start workers, or check "
                        "spark.executor.cores and spark.task.cpus")
    return slots


def run_barrier(handles: RDD, fn: Callable[..., Any], tasks_n: int) -> Any:
    """`fn` over the block handles as one barrier stage of at most `tasks_n` tasks; what task 0
    yields.

    A barrier stage must start all its tasks at once, so partitions that outnumber the slots are
    grouped (coalesce keeps a group on the executor that holds its blocks). Spark refuses a barrier
    stage whose chain changes the number of partitions, so the grouped handles are cut from their
    lineage first (localCheckpoint: a few rows, kept where they were grouped)."""
    grouped = None
    if handles.getNumPartitions() > tasks_n:
        grouped = handles.coalesce(tasks_n)
        grouped.localCheckpoint()
        grouped.count()
    try:
        out = (grouped or handles).barrier().mapPartitions(fn).collect()
    finally:
        if grouped is not None:
            grouped.unpersist()
    if len(out) != 1:
        raise RuntimeError(f"a sync stage returned {len(out)} results, expected 1 (from task 0)")
    return out[0]


def sync_steps(sc: SparkContext, data: Blocks, job: tasks.Job,
               start: tuple[np.ndarray, dict[str, np.ndarray]], first: int, last: int,
               ports: PortRange, slots: int) -> tuple[np.ndarray, dict[str, np.ndarray], list[float], int]:
    """Optimizer steps first..last-1 (of one epoch) from `start` = (theta, optimizer state) as one
    barrier stage: the new theta and state, each step's mean batch loss, and how many times the
    stage was run again.

    A stage that fails (a task or its worker lost) is run again from the same broadcast state, up to
    MAX_STAGE_ATTEMPTS times in all (data.Blocks.run): its steps are a pure function of that state,
    so the weights are the ones an uninterrupted stage gives. Each attempt has a fresh secret."""
    meet = rendezvous.for_driver(sc, ports)
    bc = sc.broadcast(start)

    def attempt(handles: RDD) -> tuple[np.ndarray, dict[str, np.ndarray], list[float]]:
        stage = tasks.SyncStage(job, first, last, os.urandom(32), ports, meet.address)
        with meet.meeting(stage.secret):
            return run_barrier(handles, partial(tasks.sync_stage, stage=stage, weights=bc), slots)

    reruns = data.reruns
    try:
        theta, opt_state, losses = data.run(attempt, reruns=MAX_STAGE_ATTEMPTS - 1)
    finally:
        bc.destroy(blocking=False)
    return theta, opt_state, losses, data.reruns - reruns


def _sync_epoch(sc: SparkContext, data: Blocks, job: tasks.Job, settings: Settings,
                state: TrainState, on_step: StepHook | None = None) -> float:
    """The rest of the current epoch of synchronous mini-batch SGD (all of it, unless a checkpoint
    taken after a step is being resumed) as barrier stages of `settings.stage_steps` steps (the whole
    epoch when unset); returns the mean of the epoch's batch losses. `on_step` runs after every
    stage, when the state is the driver's again."""
    steps = tasks.steps_per_epoch(data.layout.n_train, job.batch_size)
    end = (state.epoch + 1) * steps
    slots = barrier_slots(sc)
    while state.step < end:
        every = settings.stage_steps or steps
        stop = min(end, (state.step // every + 1) * every)
        state.theta, state.opt_state, losses, retries = sync_steps(
            sc, data, job, (state.theta, state.opt_state), state.step, stop, settings.ports, slots)
        state.step = stop
        state.epoch_loss += sum(losses)
        state.stage_retries += retries
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
    jobs = 1 if settings.strategy == "sync" else -(-steps // (settings.average_every or steps))
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
