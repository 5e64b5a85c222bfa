"""Per-partition functions handed to `mapPartitions` over the block handles.

Each takes the partition's handle rows and a small frozen job description, and yields one tuple of
numpy arrays and numbers for the driver to reduce in partition order (`partition_sum`, `regroup`,
`sum_group` below). Weights travel in a Spark broadcast (`.value` is read inside the task), never in
a closure.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from udfs.core import worker
from udfs.core.models import LocalFit, Model
from udfs.core.optimizers import Optimizer
from udfs.core.seeding import Stream, rng
from udfs.data import blocks
from udfs.training import collective

if TYPE_CHECKING:
    from pyspark import Broadcast


def _placed(path: str, layout: blocks.Layout) -> tuple[blocks.Block, blocks.Roles]:
    """The block at `path` and its row roles under `layout`. Features stay float32 in the block (in
    memory or memory-mapped); rows are converted to the training dtype as they are used."""
    block = blocks.load(path)
    return block, blocks.derived(path, ("roles", layout), lambda b: blocks.roles(b, layout))


def handle_of(rows: Iterable[Any]) -> tuple[int, str] | None:
    """(partition, block path) of a partition's single handle row; None for an empty partition."""
    rows = list(rows)
    if not rows:
        return None
    if len(rows) != 1:
        raise RuntimeError(f"expected one block handle per partition, got {len(rows)}")
    return int(rows[0].part), str(rows[0].path)


@dataclass(frozen=True)
class Job:
    """What every training task needs besides the weights."""

    spec: Model
    layout: blocks.Layout
    dtype: str
    batch_size: int
    optimizer: Optimizer


# --- local SGD -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalRound:
    job: Job
    epoch: int
    round: int             # averaging round within the epoch
    every: int | None      # local steps per round; None = the partition's whole epoch


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Global mini-batch steps in an epoch over n_rows: the last batch may be partial."""
    return -(-n_rows // batch_size)


def local_batch_bounds(step: int, n_part: int, n_total: int, batch_size: int) -> tuple[int, int]:
    """Rows [start, stop) of this partition's walk for `step` of an epoch.

    `batch_size` is the global batch, as in `sync` and tf.distribute: a partition holding n_part of
    the n_total training rows takes its share, about batch_size * n_part / n_total rows a step, so
    every partition takes the same number of steps per epoch. With one partition these are the
    plain consecutive batches of batch_size rows."""
    start = step * batch_size * n_part // n_total
    stop = min((step + 1) * batch_size * n_part // n_total, n_part)
    return start, stop


def local_round(rows: Iterable[Any], task: LocalRound,
                weights: Broadcast[tuple[np.ndarray, dict[str, np.ndarray]]]) -> Iterator[tuple]:
    """Run this partition's local mini-batch steps of one averaging round from the broadcast
    (theta, optimizer state). Each epoch the partition walks its training rows in an order drawn
    from (seed, epoch, partition).

    Yields (n, n*theta, {name: n*buffer}, loss_sum, batches), n being this partition's training
    rows, so the driver's sum divided by the total n is the sample-weighted average."""
    worker.prepare()
    handle = handle_of(rows)
    if handle is None:
        return
    part, path = handle
    job = task.job
    block, roles = _placed(path, job.layout)
    train = roles.train  # already in global train-index order: blocks are sorted by (shard, id)
    n = len(train)
    per_epoch = steps_per_epoch(job.layout.n_train, job.batch_size)
    first = task.round * task.every if task.every else 0
    last = min(first + task.every, per_epoch) if task.every else per_epoch
    if n == 0 or first >= last:
        return
    theta0, state0 = weights.value
    theta = theta0.copy()
    state = {k: v.copy() for k, v in state0.items()}
    order = train[rng(job.layout.seed, Stream.LOCAL_EPOCH, task.epoch, part).permutation(n)]
    if isinstance(job.spec, LocalFit):   # partial_fit: one pass over the round's rows
        rows_r = order[local_batch_bounds(first, n, job.layout.n_train, job.batch_size)[0]:
                       local_batch_bounds(last - 1, n, job.layout.n_train, job.batch_size)[1]]
        if len(rows_r) == 0:
            return
        random_state = int(rng(job.layout.seed, Stream.ESTIMATOR, task.epoch, task.round, part).integers(2**31 - 1))
        theta, loss = job.spec.local_fit(theta, blocks.rows_of(block.X, rows_r, job.dtype), block.y[rows_r], 1,
                                         random_state)
        yield n, theta * n, {k: v * n for k, v in state.items()}, loss, 1
        return
    loss_sum, batches = 0.0, 0
    for j in range(first, last):
        start, stop = local_batch_bounds(j, n, job.layout.n_train, job.batch_size)
        if start == stop:
            continue
        rows_b = order[start:stop]
        loss, grad = job.spec.loss_and_grad(theta, blocks.rows_of(block.X, rows_b, job.dtype), block.y[rows_b])
        job.optimizer.step(theta, grad, state, task.epoch * per_epoch + j + 1)
        loss_sum += loss
        batches += 1
    yield n, theta * n, {k: v * n for k, v in state.items()}, loss_sum, batches


# --- synchronous mini-batch SGD ------------------------------------------------------------------

def _sync_epoch_plan(path: str, job: Job, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """This partition's train rows grouped by the global batch they fall in this epoch: the rows in
    batch order and the start of each batch (searchsorted bounds)."""
    return blocks.derived(path, ("sync", job.layout, job.batch_size, epoch),
                          lambda _: _batch_plan(path, job, epoch))


def _batch_plan(path: str, job: Job, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    _, roles = _placed(path, job.layout)
    return batch_plan(roles, job.layout, job.batch_size, epoch)


def batch_plan(roles: blocks.Roles, layout: blocks.Layout, batch_size: int,
               epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's train rows grouped by the global batch of `epoch` they fall in (in block order,
    which is global train-index order, inside a batch), and the start of each batch: `sync`'s
    batches, which `model_parallel` forms the same way."""
    n = layout.n_train
    if batch_size >= n:   # full batch: every train row, in block order
        return roles.train, np.array([0, len(roles.train)])
    position = np.empty(n, dtype=np.int64)
    position[rng(layout.seed, Stream.SYNC_EPOCH, epoch).permutation(n)] = np.arange(n)
    batch = position[roles.train_index] // batch_size
    order = np.argsort(batch, kind="stable")   # within a batch, rows stay in block order
    bounds = np.searchsorted(batch[order], np.arange(steps_per_epoch(n, batch_size) + 1))
    return roles.train[order], bounds


@dataclass(frozen=True)
class SyncStage:
    """One barrier stage of `sync`: optimizer steps [first, last) of one epoch, from the broadcast
    (theta, optimizer state). `secret` admits the stage's tasks to each other's ring (fresh for
    every stage, from the driver); `ports` are where they may listen; `rendezvous` is the driver's
    (host, port) where they learn each other's addresses."""

    job: Job
    first: int
    last: int
    secret: bytes
    ports: collective.PortRange
    rendezvous: tuple[str, int]


def _block_plans(paths: list[str], job: Job, epoch: int) -> list[tuple[blocks.Block, np.ndarray, np.ndarray]]:
    """(block, its train rows in batch order, batch starts) for each block this task owns."""
    return [(_placed(path, job.layout)[0], *_sync_epoch_plan(path, job, epoch)) for path in paths]


def sync_stage(rows: Iterable[Any], stage: SyncStage,
               weights: Broadcast[tuple[np.ndarray, dict[str, np.ndarray]]],
               chunk: int = 65_536) -> Iterator[tuple]:
    """Barrier task: step through global batches first..last-1 on this task's blocks. Each step sums
    the gradient and loss over the task's rows of the batch, all-reduces [gradient, loss, rows] over
    the ring of the stage's tasks, and applies the same optimizer step as every other task: the
    maths of one machine doing mini-batch SGD on the global batch, with no Spark job per step.

    Task 0 yields (theta, optimizer state, [mean batch loss per step]); the others nothing."""
    from pyspark import BarrierTaskContext

    worker.prepare()
    context = BarrierTaskContext.get()
    paths = [str(row.path) for row in rows]   # several blocks when partitions outnumber slots
    job = stage.job
    per_epoch = steps_per_epoch(job.layout.n_train, job.batch_size)
    epoch = stage.first // per_epoch
    plans = _block_plans(paths, job, epoch)   # before joining: a missing block fails fast
    theta0, state0 = weights.value
    theta = theta0.copy()
    state = {k: v.copy() for k, v in state0.items()}
    buf = np.empty(len(theta) + 2, dtype=theta.dtype)   # [gradient sum, loss sum, rows]
    losses = []
    ring = collective.join(context, stage.secret, stage.ports, stage.rendezvous)
    try:
        for step in range(stage.first, stage.last):
            batch = step - epoch * per_epoch
            buf[:] = 0
            for block, in_batch, bounds in plans:
                chosen = in_batch[bounds[batch]:bounds[batch + 1]]
                for start in range(0, len(chosen), chunk):
                    rows_c = chosen[start:start + chunk]
                    loss, grad = job.spec.loss_and_grad(theta, blocks.rows_of(block.X, rows_c, job.dtype),
                                                        block.y[rows_c])
                    buf[:-2] += grad * len(rows_c)
                    buf[-2] += loss * len(rows_c)
                buf[-1] += len(chosen)
            ring.allreduce(buf)
            count = buf[-1]
            job.optimizer.step(theta, (buf[:-2] / count).astype(theta.dtype), state, step + 1)
            losses.append(float(buf[-2] / count))
    finally:
        ring.close()
    if context.partitionId() == 0:
        yield theta, state, losses


# --- evaluation ----------------------------------------------------------------------------------

def evaluate(rows: Iterable[Any], spec: Model, layout: blocks.Layout, dtype: str,
             which: tuple[str, ...], weights: Broadcast[np.ndarray], chunk: int = 8192) -> Iterator[dict]:
    """Sums from which the driver computes loss and accuracy (or RMSE and R^2) per role.

    Yields {role: array[n, loss_sum, correct, sse, y_sum, y2_sum]}."""
    worker.prepare()
    handle = handle_of(rows)
    if handle is None:
        return
    _, path = handle
    block, roles = _placed(path, layout)
    theta = weights.value
    out = {}
    for role in which:
        idx = getattr(roles, role)
        sums = np.zeros(6)
        for start in range(0, len(idx), chunk):
            rows_c = idx[start:start + chunk]
            sums += metric_sums(spec, theta, blocks.rows_of(block.X, rows_c, dtype), block.y[rows_c])
        out[role] = sums
    yield out


def metric_sums(spec: Model, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n, loss_sum, correct, sse, y_sum, y2_sum] over the rows of X."""
    return output_sums(spec, spec.decision(theta, X), y)


def output_sums(spec: Model, out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """metric_sums from the model's output `out` (decision) on rows with labels y."""
    loss = spec.output_loss(out, y)
    if spec.is_classifier:
        correct = float((spec.labels(out) == y).sum())
        return np.array([len(y), loss, correct, 0.0, 0.0, 0.0])
    return np.array([len(y), loss, 0.0, loss, y.sum(), (y * y).sum()])


def add(a: Any, b: Any) -> Any:
    """The combiner for every task here: the element-wise sum of nested tuples, dicts,
    arrays and numbers, with None (an empty partition) as the empty sum."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {k: add(a[k], b[k]) for k in a}
    if isinstance(a, tuple):
        return tuple(add(x, y) for x, y in zip(a, b, strict=False))
    return a + b


# --- reduction in partition order ------------------------------------------------------------------
# Float addition is not associative, so a sum is reproducible only if its terms are always added in
# the same order. treeAggregate merges partial sums in shuffle-fetch order; these functions key every
# partial by its partition and add in index order, so a run repeated on one machine is bit-identical.

def partition_sum(index: int, items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """mapPartitionsWithIndex: (partition, the sum of what its task yielded)."""
    total = None
    for item in items:
        total = add(total, item)
    yield index, total


def regroup(item: tuple[int, Any], fan: int) -> tuple[int, tuple[int, Any]]:
    """A partial sum keyed for the next level of the tree: `fan` consecutive indices per group."""
    return item[0] // fan, item


def sum_group(group: tuple[int, Iterable[tuple[int, Any]]]) -> tuple[int, Any]:
    """The partial sums of one group, added in index order."""
    key, items = group
    total = None
    for _, value in sorted(items, key=lambda kv: kv[0]):
        total = add(total, value)
    return key, total
