"""`trainer.strategy: model_parallel` (driver side): the first layer sharded by feature blocks.

The data is cut both ways (udfs/model_parallel/shards.py): R = `data.partitions` row blocks times S feature blocks
(`model_parallel.shards`, or one block per party in vertical mode, pipelines/model_parallel/vertical.py), one Spark
partition per cell, built once on the executors like data-parallel blocks. The first layer lives
only in the carried state RDD, one replica of W_s per cell; each step is one Spark job over it
(with one shuffle of gradient contributions between a shard's replicas when R > 1). The new state
RDD is cached, the old one dropped, and every LINEAGE_EVERY steps the state is checkpointed so its
lineage stays short.

The driver is the label owner: it holds the labels (in the cells' row order), the head (b1, the
later layers, the loss) and the head's optimizer. From the cells it receives partial
pre-activations (batch x h) and it sends back dZ (batch x h); in vertical mode these are all that
crosses between the feature parties and the label party. The batches are `sync`'s (same seed, same
rows, same order), so the result equals `sync` up to floating-point summation order.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import RDD, SparkContext, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core import py4j
from pipelines.core.config import Config
from pipelines.core.errors import UserError
from pipelines.data import lake
from pipelines.data.blocks import LABEL_TYPES, place, worker_cache_bytes
from pipelines.model_parallel import vertical
from pipelines.store import artifacts
from pipelines.store.rundir import RunDir
from pipelines.training.data_parallel import metrics_from_sums, optimizer_from
from udfs.core.models import ModelSpec
from udfs.core.optimizers import Optimizer
from udfs.data import blocks
from udfs.model_parallel import shards
from udfs.model_parallel.shards import Forward, Grid, Update
from udfs.training import tasks

LINEAGE_EVERY = 50          # steps between reliable checkpoints of the carried state RDD
SPLITS = ("train", "test")


# --- the data: cells on the executors, labels on the driver ----------------------------------------

@dataclass(frozen=True)
class LabelBlock:
    """Row block r's labels on the driver, in the order of its cells' rows."""

    roles: blocks.Roles
    y: np.ndarray


@dataclass
class Cells:
    handles: RDD                     # one handle row per cell, cached
    layout: blocks.Layout
    labels: list[LabelBlock]         # per row block
    bounds: tuple[int, ...]
    kind: str
    n_classes: int
    table: str
    version: int
    test_rows: int
    vertical: dict[str, Any] | None = None

    @property
    def row_blocks(self) -> int:
        return len(self.labels)

    @property
    def n_features(self) -> int:
        return self.bounds[-1]

    def release(self) -> None:
        self.handles.mapPartitions(shards.remove_cell).count()
        self.handles.unpersist()


def _keyed(df: DataFrame) -> DataFrame:
    """id as long and its shard (the global row order of udfs/data/blocks.py)."""
    return (df.withColumn("id", F.col("id").cast("long"))
            .withColumn("shard", F.pmod(F.xxhash64("id"), F.lit(blocks.N_SHARDS)).cast("int")))


def _kind(df: DataFrame, where: str) -> str:
    """dense (`features` array<float>) or sparse (`features` struct<size, indices, values> as
    pipelines/generate.py writes it, or `indices` array<int> + `values` array<float> columns)."""
    if "features" in df.columns:
        return shards.SPARSE if isinstance(df.schema["features"].dataType, T.StructType) else shards.DENSE
    if {"indices", "values"} <= set(df.columns):
        return shards.SPARSE
    raise UserError(f"{where} has neither a `features` column (dense) nor `indices` and `values` "
                    f"columns (sparse); its columns are {df.columns}")


def _feature_columns(df: DataFrame, kind: str) -> list:
    if kind == shards.DENSE:
        return [F.col("features").cast("array<float>").alias("x")]
    prefix = "features." if "features" in df.columns else ""
    return [F.col(f"{prefix}indices").cast("array<int>").alias("idx"),
            F.col(f"{prefix}values").cast("array<float>").alias("val")]


def _check_labels(df: DataFrame, where: str) -> None:
    fields = {f.name: f.dataType for f in df.schema.fields}
    for column in ("id", "label", "split"):
        if column not in fields:
            raise UserError(f"{where} has no column {column!r}; its columns are {list(fields)}")
    if not isinstance(fields["label"], LABEL_TYPES):
        raise UserError(f"{where}: column 'label' is {fields['label'].simpleString()}, "
                        "expected int or double")


def _width(rows: DataFrame, kind: str, where: str) -> int:
    """Features per row: the (single) length of the dense arrays, or 1 + the largest sparse index."""
    if kind == shards.DENSE:
        row = rows.agg(F.min(F.size("x")), F.max(F.size("x"))).first()
        assert row is not None  # a global aggregate has exactly one row
        lo, hi = row
        if lo != hi:
            raise UserError(f"{where}: features arrays have lengths from {lo} to {hi}; every row "
                            "needs the same number")
        return int(hi or 0)
    row = rows.agg(F.min(F.array_min("idx")), F.max(F.array_max("idx"))).first()
    assert row is not None  # a global aggregate has exactly one row
    lo, hi = row
    if lo is not None and lo < 0:
        raise UserError(f"{where}: indices must be >= 0, found {lo}")
    return int(hi) + 1 if hi is not None else 0


def _sliced(rows: DataFrame, kind: str, bounds: tuple[int, ...]) -> DataFrame:
    """Every row once per feature block s, with only that block's columns (indices local to it)."""
    S = len(bounds) - 1
    lo = F.element_at(F.array(*[F.lit(b) for b in bounds[:-1]]), F.col("s") + 1)
    hi = F.element_at(F.array(*[F.lit(b) for b in bounds[1:]]), F.col("s") + 1)
    rows = rows.withColumn("s", F.explode(F.sequence(F.lit(0), F.lit(S - 1))))
    if kind == shards.DENSE:
        return rows.withColumn("x", F.slice("x", lo + 1, hi - lo))
    kept = F.filter(F.arrays_zip("idx", "val"), lambda e: (e["idx"] >= lo) & (e["idx"] < hi))
    return (rows.withColumn("_kept", kept)
            .withColumn("idx", F.transform("_kept", lambda e: e["idx"] - lo))
            .withColumn("val", F.transform("_kept", lambda e: e["val"])).drop("_kept"))


def _single_table(spark: SparkSession, config: Config) -> dict[str, Any]:
    ref = lake.TableRef(config.data.table, config.data.version)
    df, version = lake.read(spark, config.lake.path, ref)
    where = f"table {ref.name!r}"
    _check_labels(df, where)
    kind = _kind(df, where)
    rows = _keyed(df).filter(F.col("split").isin(*SPLITS))
    features = rows.select("id", "shard", "split", *_feature_columns(rows, kind))
    n_features = _width(features, kind, where)
    if "features" in df.columns and kind == shards.SPARSE:   # the struct says its width
        row = rows.agg(F.max("features.size")).first()
        assert row is not None  # a global aggregate has exactly one row
        n_features = max(n_features, row[0] or 0)
    S = config.model_parallel.shards
    if S > n_features:
        raise UserError(f"model_parallel.shards={S} is more than the {n_features} features of {where}; "
                        f"use at most {n_features}")
    bounds = shards.block_bounds(n_features, S)
    return {"cells": _sliced(features, kind, bounds), "labels": rows, "kind": kind, "bounds": bounds,
            "table": ref.name, "version": version, "vertical": None}


def _parties(spark: SparkSession, config: Config, parties: vertical.Parties) -> dict[str, Any]:
    frames, versions = vertical.read(spark, config.lake.path, parties)
    ids, left_out, aligned = vertical.align(frames)
    label = parties.label
    labels = (_keyed(frames[label.name].select("id", "label", "split")).join(ids, "id")
              .filter(F.col("split").isin(*SPLITS)))
    order = labels.select("id", "shard", "split")
    kinds = {p.name: _kind(frames[p.name], f"party {p.name!r} (table {p.table!r})")
             for p in parties.features}
    if len(set(kinds.values())) > 1:
        raise UserError(f"the feature parties mix dense and sparse tables: {kinds}")
    kind = next(iter(kinds.values()))
    cells = None
    for s, party in enumerate(parties.features):
        frame = frames[party.name]
        part = (frame.select(F.col("id").cast("long").alias("id"), *_feature_columns(frame, kind))
                .join(order, "id").withColumn("s", F.lit(s)))
        cells = part if cells is None else cells.unionByName(part)
    return {"cells": cells, "labels": labels, "kind": kind, "bounds": parties.bounds,
            "table": label.table, "version": versions[label.name],
            "vertical": {"parties": {p.name: {"table": p.table, "version": versions[p.name],
                                              "columns": list(p.columns) if p.columns else None}
                                     for p in parties.all},
                         "label_party": label.name, "aligned_rows": aligned,
                         "left_out_rows": left_out}}


def label_blocks(table: pa.Table, row_blocks: int, seed: int,
                 validation_fraction: float) -> tuple[list[LabelBlock], blocks.Layout]:
    """The labels per row block in the cells' row order, and the global layout, from (id, shard,
    split, label) of every row."""
    ids = table.column("id").to_numpy()
    shard = table.column("shard").to_numpy().astype(np.int32)
    test = table.column("split").to_numpy(zero_copy_only=False) == "test"
    label = table.column("label")
    y = label.to_numpy().astype(np.float64 if pa.types.is_floating(label.type) else np.int32)
    counts = np.bincount(shard[~test], minlength=blocks.N_SHARDS)
    layout = blocks.Layout(tuple(int(x) for x in np.concatenate(([0], np.cumsum(counts)))), seed,
                           validation_fraction)
    out = []
    for r in range(row_blocks):
        m = np.flatnonzero(shard % row_blocks == r)
        m = m[np.lexsort((ids[m], shard[m], test[m]))]
        block = blocks.Block(np.empty((len(m), 0), np.float32), y[m], ids[m], shard[m], test[m])
        out.append(LabelBlock(blocks.roles(block, layout), y[m]))
    return out, layout


def _build(spark: SparkSession, rows: DataFrame, kind: str, bounds: tuple[int, ...], R: int,
           name: str, cache_gb: float) -> RDD:
    """Place each (row, block) in cell (shard mod R) * S + s and build the cells there; a worker
    keeps them in memory within its share of data.worker_cache_gb, as it does blocks."""
    S = len(bounds) - 1
    widths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=False))
    target = F.pmod(F.col("shard"), F.lit(R)) * S + F.col("s")
    key = f"{name}-{uuid.uuid4().hex[:12]}"
    handles = (place(spark, rows, R * S, target).drop("s")
               .mapInArrow(partial(shards.build_cells, key=key, kind=kind, widths=widths,
                                   cache_bytes=worker_cache_bytes(spark.sparkContext, cache_gb)),
                           shards.HANDLE_SCHEMA).rdd.cache())
    try:
        described = handles.collect()
    except Exception as exc:  # noqa: BLE001 - surface a bad row as a user error
        reason = py4j.task_message(exc, shards.CellError.__name__)
        if reason is not None:
            raise UserError(f"table {name}: {reason}") from None
        raise
    missing = sorted(set(range(R * S)) - {h.part for h in described})
    if missing:
        handles.unpersist()
        r, _ = divmod(missing[0], S)
        raise UserError(f"table {name}: row block {r} of data.partitions={R} has no rows; use fewer "
                        "partitions")
    return handles


def prepare(spark: SparkSession, config: Config) -> Cells:
    """Checks (exit 2 before any training), then the cells on the executors and labels here."""
    parties = vertical.parse(config.model_parallel)
    source = _parties(spark, config, parties) if parties else _single_table(spark, config)
    R = config.data.partitions
    labels, layout = label_blocks(source["labels"].select("id", "shard", "split", "label").toArrow(),
                                  R, config.trainer.seed, config.data.validation_fraction)
    if layout.n_train < 1:
        raise UserError(f"table {source['table']} has no training rows left after holding out "
                        f"validation_fraction={config.data.validation_fraction}")
    y = np.concatenate([b.y for b in labels])
    n_classes = 0 if y.dtype.kind == "f" else int(y.max()) + 1
    handles = _build(spark, source["cells"], source["kind"], source["bounds"], R,
                     f"{source['table']}@{source['version']}", config.data.worker_cache_gb)
    return Cells(handles, layout, labels, source["bounds"], source["kind"], n_classes, source["table"],
                 source["version"], int(sum(len(b.roles.test) for b in labels)), source["vertical"])


# --- the carried state ------------------------------------------------------------------------------

@dataclass
class Wire:
    """Everything the driver (the label owner) sends to the cells and receives from them goes
    through here; `log`, when set, records it (tests inspect what crosses between parties)."""

    sc: SparkContext
    log: list | None = None

    def send(self, value: Any) -> Any:
        if self.log is not None:
            self.log.append(("sent", value))
        return self.sc.broadcast(value)

    def receive(self, rdd: RDD) -> list:
        got = rdd.collect()
        if self.log is not None:
            self.log.extend(("received", item) for item in got)
        return got


class Carrier:
    """The state RDD carried from step to step: cached while it is the current one, checkpointed every
    LINEAGE_EVERY steps. The dZ broadcasts since the last checkpoint are kept (a lost partition is
    recomputed from the checkpoint through them) and destroyed once a newer checkpoint is written."""

    def __init__(self, sc: SparkContext, grid: Grid, handles: RDD, wire: Wire, checkpoint_dir: str,
                 restored: dict[int, Any] | None = None) -> None:
        self.sc, self.grid, self.wire = sc, grid, wire
        self.sizes = sc.accumulator({}, shards.MaxSizes())
        if sc._jsc.sc().getCheckpointDir().isEmpty():
            sc.setCheckpointDir(checkpoint_dir)
        self.pending: list = list(restored.values()) if restored else []
        self.steps = 0
        self.checkpoint_file: str | None = None
        self.rdd = self._keep(handles.mapPartitions(partial(
            shards.start, grid=grid, fwd=None, sizes=self.sizes, restored=restored)))
        self.rdd.count()

    def _keep(self, rdd: RDD) -> RDD:
        return rdd.persist(StorageLevel.MEMORY_AND_DISK)

    def advance(self, update: Update | None, fwd: Forward | None) -> dict[int, np.ndarray]:
        """Apply `update` on every replica, then the forward pass `fwd`: {partition: partials}."""
        g = self.grid
        if update is not None:
            self.pending.append(update.dZ)
        if update is None or g.row_blocks == 1:
            new = self.rdd.map(partial(shards.step, grid=g, update=update, fwd=fwd, sizes=self.sizes))
        else:
            received = (self.rdd.flatMap(partial(shards.send, grid=g, update=update, sizes=self.sizes))
                        .partitionBy(g.cells, int).mapPartitions(shards.gather))
            new = self.rdd.zip(received).map(partial(shards.step_received, grid=g, update=update,
                                                     fwd=fwd, sizes=self.sizes))
        new = self._keep(new)
        self.steps += 1
        truncate = self.steps % LINEAGE_EVERY == 0
        if truncate:
            new.checkpoint()
        outs = dict(self.wire.receive(new.map(shards.output)))
        self.rdd.unpersist()
        self.rdd = new
        if truncate:  # the checkpoint was written by the job: what came before is not needed again
            current = [update.dZ] if update is not None else []   # `new` itself still refers to it
            for bc in self.pending:
                if bc not in current:
                    bc.destroy(blocking=False)
            self.pending = current
            self._drop_checkpoint()
            self.checkpoint_file = new.getCheckpointFile()
        return outs

    def _drop_checkpoint(self) -> None:
        """Delete the previous checkpoint's files (Spark keeps them unless told to clean them)."""
        if self.checkpoint_file:
            jvm = self.sc._jvm
            if jvm is None:
                raise RuntimeError("the SparkContext has no JVM gateway (it was stopped); cannot "
                                   f"delete the checkpoint {self.checkpoint_file}")
            path = jvm.org.apache.hadoop.fs.Path(self.checkpoint_file)
            path.getFileSystem(self.sc._jsc.hadoopConfiguration()).delete(path, True)
            self.checkpoint_file = None

    def shard(self, s: int, names: tuple[str, ...] = ()) -> list[np.ndarray]:
        """W_s (flat) and the named optimizer buffers, from the replica in row block 0."""
        return self.sc.runJob(self.rdd, partial(shards.shard_of, names=names), [s])[0]

    def release(self) -> None:
        self.rdd.unpersist()
        for bc in self.pending:
            bc.destroy(blocking=False)
        self._drop_checkpoint()


class CellLost(RuntimeError):
    """A cell went missing in the middle of a model-parallel run."""


@contextmanager
def cells_kept(run: str) -> Iterator[None]:
    """Stop the run with a message saying how to continue when a cell goes missing. A cell cannot be
    rebuilt in place: its shard's weights and optimizer state live in the carrier's partition beside
    it, and a rebuilt cell may land on another executor than that state; the last checkpoint holds
    both, so --resume builds the cells again and continues from it, to the same model."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - py4j wraps the task's CellMissing
        if not py4j.raised(exc, shards.CellMissing.__name__):
            raise
        detail = py4j.task_message(exc, shards.CellMissing.__name__) or str(exc).splitlines()[0]
    else:
        return
    raise CellLost(f"a model-parallel cell went missing (an executor was lost or its files removed): "
                   f"{detail}. The run stopped after its last checkpoint: --resume {run} continues it")


# --- training ---------------------------------------------------------------------------------------

@dataclass
class HeadState:
    """The label owner's part: head parameters, their optimizer buffers, progress."""

    head: np.ndarray
    opt: dict[str, np.ndarray]
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)


def gather_rows(cells: Cells, grid: Grid, outs: dict[int, np.ndarray],
                rows_of: Callable[[int, LabelBlock], np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Summed partials Z of the selected rows of every row block, their labels, and rows per block."""
    S = grid.shards
    Z, y, counts = [], [], []
    for r, lb in enumerate(cells.labels):
        z = outs[r * S]
        for s in range(1, S):
            z = z + outs[r * S + s]
        rows = rows_of(r, lb)
        if z.shape[0] != len(rows):
            raise RuntimeError(f"row block {r}: {z.shape[0]} partial rows, {len(rows)} labels")
        Z.append(z)
        y.append(lb.y[rows])
        counts.append(len(rows))
    return np.concatenate(Z), np.concatenate(y), counts


def _plan(cells: Cells, grid: Grid, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tasks.batch_plan(lb.roles, cells.layout, grid.batch_size, epoch) for lb in cells.labels]


def evaluate_role(carrier: Carrier, cells: Cells, spec: ModelSpec, head: np.ndarray,
                  role: str) -> dict[str, float]:
    """Loss and accuracy (or RMSE and R^2) on every row of a role, from the cells' partials."""
    outs = carrier.advance(None, Forward(role))
    Z, y, _ = gather_rows(cells, carrier.grid, outs, lambda _, lb: getattr(lb.roles, role))
    return metrics_from_sums(spec, tasks.output_sums(spec, shards.head_output(spec, head, Z), y))


def train_epochs(carrier: Carrier, cells: Cells, spec: ModelSpec, opt: Optimizer, state: HeadState,
                 epochs: int, on_epoch: Callable[[HeadState, dict], None]) -> HeadState:
    grid, wire = carrier.grid, carrier.wire
    steps = tasks.steps_per_epoch(cells.layout.n_train, grid.batch_size)
    while state.epoch < epochs:
        started = time.perf_counter()
        plan = _plan(cells, grid, state.epoch)
        outs = carrier.advance(None, Forward("batch", state.epoch, 0))
        loss_sum = 0.0
        for b in range(steps):
            Z, y, counts = gather_rows(cells, grid, outs, partial(_batch_rows, plan=plan, batch=b))
            loss, g_head, dZ = shards.head_step(spec, state.head, Z, y)
            state.step += 1
            opt.step(state.head, g_head, state.opt, state.step)
            loss_sum += loss
            split = np.split(dZ, np.cumsum(counts)[:-1])
            bc = wire.send({r: part for r, part in enumerate(split) if len(part)})
            nxt = Forward("batch", state.epoch, b + 1) if b + 1 < steps else None
            outs = carrier.advance(Update(state.epoch, b, state.step, bc), nxt)
        state.epoch += 1
        record = {"epoch": state.epoch, "train_loss": loss_sum / steps}
        if cells.layout.n_validation:
            val = evaluate_role(carrier, cells, spec, state.head, "validation")
            record.update({f"val_{k}": v for k, v in val.items() if k != "rows"})
        record["seconds"] = time.perf_counter() - started
        state.history.append(record)
        on_epoch(state, record)
    return state


def _batch_rows(r: int, lb: LabelBlock, plan: list[tuple[np.ndarray, np.ndarray]],
                batch: int) -> np.ndarray:
    rows, bounds = plan[r]
    return rows[bounds[batch]:bounds[batch + 1]]


def initial_head(config: Config, spec: ModelSpec, grid: Grid) -> HeadState:
    """The head as udfs.models.init_params would draw it for the whole model, fresh buffers."""
    head = shards.init_head(spec, config.trainer.seed, config.model.init, config.trainer.dtype)
    return HeadState(head, grid.optimizer.init_state(head))


def grid_for(config: Config, cells: Cells, spec: ModelSpec) -> Grid:
    t = config.trainer
    return Grid(spec, cells.layout, cells.bounds, cells.row_blocks, t.dtype, t.batch_size,
                optimizer_from(config), config.model.init)


def save_chunks(carrier: Carrier, spec: ModelSpec, head: np.ndarray, names: tuple[str, ...] = (),
                head_state: dict[str, np.ndarray] | None = None) -> dict[str, tuple]:
    """The members of an .npz holding the whole flat vector (and optimizer buffers), fetched one
    shard at a time: pieces for artifacts.stream_npz."""
    S = carrier.grid.shards

    def pieces(i: int, tail: np.ndarray):
        for s in range(S):
            yield carrier.shard(s, names)[i]
        yield tail

    members = {"theta": (head.dtype.name, spec.n_params, pieces(0, head))}
    if names:
        if head_state is None:
            raise ValueError(f"save_chunks: optimizer buffers {names} need the head's (head_state)")
        for i, name in enumerate(names, start=1):
            members[f"state_{name}"] = (head.dtype.name, spec.n_params, pieces(i, head_state[name]))
    return members


def summary_fields(carrier: Carrier, cells: Cells) -> dict[str, Any]:
    sizes = carrier.sizes.value
    out = {"shards": carrier.grid.shards, "row_blocks": cells.row_blocks,
           "max_param_block": int(sizes.get("params", 0)),
           "max_task_bytes": {"received": int(sizes.get("bytes_in", 0)),
                              "returned": int(sizes.get("bytes_out", 0))},
           "input": cells.kind, "n_features": cells.n_features}
    if cells.vertical:
        out["vertical"] = cells.vertical
    return out


def restore(sc: SparkContext, run_dir: RunDir, spec: ModelSpec, grid: Grid,
            names: tuple[str, ...]) -> tuple[dict[int, Any], HeadState] | None:
    """The last checkpoint of a run, read one shard at a time: a broadcast per shard for its cells
    to start from ({s: (W_s, buffers)}), and the head's state."""
    found = artifacts.latest_checkpoint_file(run_dir)
    if found is None:
        return None
    path, meta = found
    h, d = spec.layers[1], spec.layers[0]

    def part(name: str, lo: int, hi: int) -> np.ndarray:
        return artifacts.read_npz_slice(path, name, lo, hi)

    restored = {}
    for s in range(grid.shards):
        lo, hi = grid.columns(s)
        restored[s] = sc.broadcast((part("theta", lo * h, hi * h).reshape(hi - lo, h),
                                    {n: part(f"state_{n}", lo * h, hi * h).reshape(hi - lo, h)
                                     for n in names}))
    head = HeadState(part("theta", d * h, spec.n_params),
                     {n: part(f"state_{n}", d * h, spec.n_params) for n in names},
                     meta["epoch"], meta["step"], meta["history"])
    return restored, head
