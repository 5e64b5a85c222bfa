"""Federated clients: one Spark partition holds one client's rows, and these functions are all that
runs on them. Only the update vector, the sample count and a few scalar metrics leave the task.

A client keeps a local hold-out (`holdout_fraction` of its rows, drawn from (seed, client)) that
never trains and serves federated evaluation: how well the global model does for each client.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from udfs.core import worker
from udfs.core.models import LocalFit, Model
from udfs.core.optimizers import Optimizer
from udfs.core.seeding import Stream, rng
from udfs.data import blocks
from udfs.federated.attacks import Attack
from udfs.federated.noise import Release, client_noise
from udfs.training.tasks import handle_of, metric_sums

if TYPE_CHECKING:
    from pyspark import Broadcast


@dataclass(frozen=True)
class RoundReport:
    """What the driver may keep of a client's round: its row count and scalars."""

    client: int
    n: int
    train_loss: float
    seconds: float           # of local training


@dataclass(frozen=True)
class ClientReport(RoundReport):
    """A client task's answer without secure aggregation: only its update leaves with the scalars
    (`within_clip` under adaptive clipping, else None)."""

    update: np.ndarray
    within_clip: bool | None = None


@dataclass(frozen=True)
class Dropped:
    """A client that could not take part in the round, and why (its own failure, not the rows)."""

    client: int
    reason: str


@dataclass(frozen=True)
class ClientSplit:
    """How every client splits its rows: `holdout_fraction` held out, drawn from (seed, client)."""

    seed: int
    holdout_fraction: float


def client_rows(path: str, client: int, split: ClientSplit) -> tuple[np.ndarray, np.ndarray]:
    """Block positions of the client's training rows and of its hold-out rows."""
    def compute(block: blocks.Block) -> tuple[np.ndarray, np.ndarray]:
        n = len(block.id)
        n_hold = int(round(split.holdout_fraction * n)) if n > 1 else 0
        order = rng(split.seed, Stream.HOLDOUT, client).permutation(n)
        return np.sort(order[n_hold:]), np.sort(order[:n_hold])

    return blocks.derived(path, ("clients", split), compute)


@dataclass(frozen=True)
class ClientRound:
    spec: Model
    dtype: str
    split: ClientSplit
    round: int
    local_epochs: int
    batch_size: int | None   # None: the whole local data set in one batch (FedSGD)
    optimizer: Optimizer
    mu: float                # FedProx proximal weight; 0 = FedAvg
    release: Release = Release()
    attack: Attack = Attack("none", 0.0, frozenset())
    run_id: str = ""         # binds a client's local-DP noise to the run (udfs/federated/noise.py)


def train_client(task: ClientRound, client: int, theta0: np.ndarray, X: np.ndarray,
           y: np.ndarray) -> tuple[np.ndarray, float, int]:
    """E local epochs of mini-batch training from theta0; returns (theta, mean loss, steps).

    The whole of a client's numpy work: the benchmark times it in one process to measure what a
    Spark round adds on top."""
    if isinstance(task.spec, LocalFit):   # partial_fit: E passes of the estimator's own
        random_state = int(rng(task.split.seed, Stream.ESTIMATOR, task.round, client).integers(2**31 - 1))
        theta, loss = task.spec.local_fit(theta0, X, y, task.local_epochs, random_state)
        return theta, loss, task.local_epochs
    theta = theta0.copy()
    state = task.optimizer.init_state(theta)
    n = len(y)
    batch = task.batch_size or n
    loss_sum, step = 0.0, 0
    for epoch in range(task.local_epochs):
        # the same stream `local` uses for a partition's epoch: one client trained for R rounds of
        # one epoch walks its rows exactly as `local` does over R epochs
        index = (task.round - 1) * task.local_epochs + epoch
        order = rng(task.split.seed, Stream.LOCAL_EPOCH, index, client).permutation(n)
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            loss, grad = task.spec.loss_and_grad(theta, X[rows], y[rows])
            if task.mu:
                grad += task.mu * (theta - theta0)
            step += 1
            task.optimizer.step(theta, grad, state, step)
            loss_sum += loss
    return theta, loss_sum / max(step, 1), step


def local_update(path: str, client: int, task: ClientRound, theta0: np.ndarray) -> ClientReport:
    """Train the client at `path` from theta0 and release its update as `task.release` says
    (clipped, noised). A simulated attacker tampers with its update before the release: it goes
    through the same client library, so clipping bounds what it can do. Raises when training fails."""
    block = blocks.load(path)
    train, _ = client_rows(path, client, task.split)
    X = block.X[train].astype(task.dtype, copy=False)
    y = task.attack.labels(client, block.y[train], task.spec.n_classes)
    started = time.perf_counter()
    theta, loss, _ = train_client(task, client, theta0, X, y)
    seconds = time.perf_counter() - started
    update = theta - theta0
    if not (np.isfinite(update).all() and math.isfinite(loss)):
        raise FloatingPointError("the local update is not finite")
    seed = task.split.seed
    update = task.attack.tamper(client, update, seed, task.round)
    noise = client_noise(blocks.secret(path), task.run_id, task.round, client) \
        if task.release.noise_std else None
    update, within_clip = task.release.apply(update, noise)
    return ClientReport(client, int(len(train)), float(loss), seconds, update, within_clip)


def client_of(rows: Iterable[Any]) -> tuple[int, str] | None:
    """Prepare this Python worker, then (client, block path) of the partition's client, or None for
    an empty partition: how every client task starts."""
    worker.prepare()
    return handle_of(rows)


def dropped(client: int, exc: Exception) -> Dropped:
    """What a client whose own work failed reports instead, so the round can go on without it."""
    return Dropped(client, f"{type(exc).__name__}: {str(exc)[:200]}")


def client_update(rows: Iterable[Any], task: ClientRound,
                  weights: Broadcast[np.ndarray]) -> Iterator[ClientReport | Dropped]:
    """Train this partition's client from the broadcast global weights; yields its local_update
    record, or a `dropped` record when the client's own training fails (bad rows, a numeric
    error)."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        report = local_update(path, client, task, weights.value)
    except blocks.BlockMissing:
        raise   # the executor lost the block, not the client: the driver rebuilds and reruns
    except Exception as exc:  # noqa: BLE001 - a client's failure must not fail the round
        yield dropped(client, exc)
        return
    yield report


def clients_evaluate(rows: Iterable[Any], spec: Model, dtype: str, split: ClientSplit,
                     weights: Broadcast[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """The global model on the hold-out of every client whose handle is in this partition:
    (client, [n, loss_sum, correct, ...]) for each client with a hold-out.

    The driver coalesces the clients' handles into a few partitions (one per task slot) for this:
    evaluating a client's few hold-out rows costs far less than a Spark task, so one task per
    client would spend nearly all of the evaluation in task overhead. The clients are still
    evaluated one after another, each on its own block, and only their sums leave the task."""
    worker.prepare()
    theta = weights.value
    for row in rows:
        client, path = int(row.part), str(row.path)
        block = blocks.load(path)
        _, hold = client_rows(path, client, split)
        if len(hold):
            X = block.X[hold].astype(dtype, copy=False)
            yield client, metric_sums(spec, theta, X, block.y[hold])
