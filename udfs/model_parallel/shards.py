"""Model parallelism on the executors: the first layer cut into feature blocks, the data into cells.

The first-layer matrix W (d x h) is cut by rows into S feature blocks W_s = W[lo_s:hi_s]; the rows of
the data are cut into R row blocks (row block r holds the shards s of the global row order with
s mod R = r, as data-parallel blocks do). Cell (r, s) is Spark partition r*S + s: it holds X[r, s],
the columns lo_s..hi_s of row block r's rows (dense float32, or CSR for sparse input), on the
executor's local disk, and its replica of (W_s, optimizer state) in the carried state RDD.

A step of global batch b: every cell computes the partial pre-activation P[r, s] = X[b & r, s] W_s
and returns it (batch x h); the driver, which holds the head (b1, the later layers and the loss),
sums the partials per row block, and broadcasts dZ, the gradient of the mean loss with respect to the
summed pre-activation (batch x h). With the next step every cell first computes its contribution
X[b & r, s]^T dZ_r to the gradient of W_s (row-sparse for sparse input); the R contributions for W_s
are summed by a shuffle to all replicas of W_s (nothing moves when R = 1), and each replica takes the
same optimizer step. No task, and not the driver, ever holds more than one W_s.

Rows inside a cell are sorted by (is_test, shard, id), like a data-parallel block, so roles,
validation hold-out and `sync`'s batches come from the same code (udfs.data.blocks, udfs.training.tasks): the same
seed gives the same batches as `sync`, and the same arithmetic.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from pyspark.accumulators import AccumulatorParam

from udfs.core import cache, files, models, worker
from udfs.core.models import ModelSpec
from udfs.core.optimizers import Optimizer
from udfs.core.seeding import Stream, rng
from udfs.data import blocks
from udfs.training import tasks

if TYPE_CHECKING:
    from typing import TypeAlias

    from pyspark import Accumulator, Broadcast

    Sizes: TypeAlias = Accumulator[dict[str, int]]   # MaxSizes: the largest sizes any task saw

HANDLE_SCHEMA = "part int, path string, rows long, test_rows long"
DENSE, SPARSE = "dense", "sparse"
META_FILE = "meta.json"


class CellError(ValueError):
    """A row cannot become part of a cell (named by its id)."""


# --- the grid --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Everything a cell task needs besides its data and its shard: the model, the row layout, the
    column boundaries of the feature blocks and the training settings."""

    spec: ModelSpec
    layout: blocks.Layout
    bounds: tuple[int, ...]      # S + 1 global column boundaries
    row_blocks: int              # R
    dtype: str
    batch_size: int
    optimizer: Optimizer
    init: str

    @property
    def shards(self) -> int:
        return len(self.bounds) - 1

    @property
    def cells(self) -> int:
        return self.row_blocks * self.shards

    def cell(self, part: int) -> tuple[int, int]:
        """(row block, feature block) of Spark partition `part`."""
        return divmod(part, self.shards)

    def columns(self, s: int) -> tuple[int, int]:
        return self.bounds[s], self.bounds[s + 1]


def block_bounds(n_features: int, shards: int) -> tuple[int, ...]:
    """Feature-block boundaries: `shards` contiguous blocks as equal as possible."""
    return tuple(s * n_features // shards for s in range(shards + 1))


# --- cell data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellData:
    """X[r, s] of one cell: dense rows, or CSR (indptr, indices local to the block, values)."""

    kind: str
    width: int
    dense: np.ndarray | None
    indptr: np.ndarray | None
    indices: np.ndarray | None
    values: np.ndarray | None
    id: np.ndarray
    shard: np.ndarray
    test: np.ndarray
    in_memory: bool = True
    budget: int = 0      # the worker's cache budget in bytes (meta cache_bytes)
    derived_per_entry: ClassVar[int] = 8   # roles, batch plans of several epochs, a float64 copy

    @property
    def n(self) -> int:
        return len(self.id)

    @property
    def cached_bytes(self) -> int:
        """What this cell keeps in the worker's memory: nothing when memory-mapped."""
        return cache.nbytes([getattr(self, name) for name in _ARRAYS]) if self.in_memory else 0

    def dense_rows(self) -> np.ndarray:
        """X[r, s] of a dense cell."""
        if self.dense is None:
            raise ValueError(f"a {self.kind} cell has no dense rows")
        return self.dense

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, values) of a sparse cell."""
        if self.indptr is None or self.indices is None or self.values is None:
            raise ValueError(f"a {self.kind} cell has no CSR arrays")
        return self.indptr, self.indices, self.values

    def as_block(self) -> blocks.Block:
        """The row facts udfs.blocks.roles reads (shard, test), in a Block without features."""
        return blocks.Block(np.empty((self.n, 0), np.float32), np.zeros(self.n, np.int32), self.id,
                            self.shard, self.test)


def _list_values(column: pa.ChunkedArray, ids: np.ndarray, name: str,
                 dtype: type[np.generic]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list column, with a null list named by its row id."""
    arr = column.combine_chunks()
    if arr.null_count:
        raise CellError(f"row id {ids[np.asarray(arr.is_null())][0]}: {name} is null")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values.slice(offsets[0], offsets[-1] - offsets[0]), dtype=dtype)
    return offsets - offsets[0], values


def assemble_cell(table: pa.Table, kind: str, width: int) -> CellData:
    """One cell from its rows: (id, shard, split, x) dense, or (id, shard, split, idx, val) with
    indices already local to the block; sorted by (is_test, shard, id)."""
    ids = np.asarray(table.column("id"), dtype=np.int64)
    shard = np.asarray(table.column("shard"), dtype=np.int32)
    test = np.asarray(table.column("split")) == "test"
    order = np.lexsort((ids, shard, test))
    if kind == DENSE:
        offsets, values = _list_values(table.column("x"), ids, "features", np.float32)
        lengths = np.diff(offsets)
        if (lengths != width).any():
            i = int(np.flatnonzero(lengths != width)[0])
            raise CellError(f"row id {ids[i]}: features has {lengths[i]} values in this block, "
                            f"expected {width}")
        X = values.reshape(len(ids), width)[order]
        return CellData(kind, width, X, None, None, None, ids[order], shard[order], test[order])
    offsets, idx = _list_values(table.column("idx"), ids, "indices", np.int64)
    offsets_v, val = _list_values(table.column("val"), ids, "values", np.float32)
    if not np.array_equal(offsets, offsets_v):
        i = int(np.flatnonzero(np.diff(offsets) != np.diff(offsets_v))[0])
        raise CellError(f"row id {ids[i]}: indices and values have different lengths")
    lengths = np.diff(offsets)[order]
    take = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order]) if len(order) \
        else np.zeros(0, np.int64)
    indptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return CellData(kind, width, None, indptr, idx[take].astype(np.int32), val[take],
                    ids[order], shard[order], test[order])


_ARRAYS = ("dense", "indptr", "indices", "values", "id", "shard", "test")


def save_cell(cell: CellData, path: str, cache_bytes: int) -> None:
    """The cell's arrays as .npy files and meta.json (kind, width and the worker's cache budget,
    `cache_bytes`), written to a temporary directory renamed into place."""
    with files.replacing_dir(path) as tmp:
        for name in _ARRAYS:
            value = getattr(cell, name)
            if value is not None:
                np.save(os.path.join(tmp, f"{name}.npy"), value, allow_pickle=False)
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump({"kind": cell.kind, "width": cell.width, "cache_bytes": int(cache_bytes)}, fh)


def build_cells(batches: Iterator[pa.RecordBatch], key: str, kind: str,
                widths: tuple[int, ...], cache_bytes: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow function: store this partition's cell on the executor's local disk and return
    one handle row (partition, path, rows, test rows). `widths[s]` is feature block s's width;
    `cache_bytes` is what one Python worker may keep in memory (udfs/core/cache.py)."""
    from pyspark import SparkFiles, TaskContext

    worker.prepare()
    context = TaskContext.get()
    if context is None:
        raise RuntimeError("build_cells runs only inside a Spark task (mapInArrow)")
    part = context.partitionId()
    nonempty = [b for b in batches if b.num_rows]
    if not nonempty:
        return
    cell = assemble_cell(pa.Table.from_batches(nonempty), kind, widths[part % len(widths)])
    path = blocks.block_dir(SparkFiles.getRootDirectory(), key, part)
    save_cell(cell, path, cache_bytes)
    yield pa.RecordBatch.from_pydict({
        "part": pa.array([part], pa.int32()), "path": pa.array([path]),
        "rows": pa.array([cell.n], pa.int64()), "test_rows": pa.array([int(cell.test.sum())], pa.int64()),
    })


def _open(path: str, may_copy: bool) -> CellData:
    """The cell at `path`: in memory if the worker's cache has room for it, else memory-mapped."""
    with open(os.path.join(path, META_FILE)) as fh:
        meta = json.load(fh)
    stored = {name: os.path.join(path, f"{name}.npy") for name in _ARRAYS}
    stored = {name: file for name, file in stored.items() if os.path.exists(file)}
    in_memory = may_copy and cache.has_room(sum(os.path.getsize(f) for f in stored.values()),
                                            meta["cache_bytes"])
    arrays = {name: np.load(file, mmap_mode=None if in_memory else "r", allow_pickle=False)
              for name, file in stored.items()}
    # the CSR parts or the dense rows, by the cell's kind; id, shard and test always
    return CellData(meta["kind"], int(meta["width"]), arrays.get("dense"), arrays.get("indptr"),
                    arrays.get("indices"), arrays.get("values"), arrays["id"], arrays["shard"],
                    arrays["test"], in_memory=in_memory, budget=meta["cache_bytes"])


class CellMissing(FileNotFoundError):
    """The cell's files are not on this executor (lost with it, or removed): the driver stops the
    run, which --resume continues (pipelines/model_parallel/training.py, cells_kept)."""


def _missing(path: str) -> CellMissing:
    return CellMissing(f"cell {path} is not on this executor (raise spark.locality.wait)")


# The worker's cache (udfs/core/cache.py) holds cells and values derived from them (roles, batch
# plans, a float64 copy), under one budget shared with data-parallel blocks.
_CELLS = cache.Kind(_open, _missing)


def load_cell(path: str) -> CellData:
    return _CELLS.load(path)


def derived(path: str, key: Any, compute: Callable[[CellData], Any]) -> Any:
    return _CELLS.derived(path, key, compute)


def remove_cell(rows: Iterable[Any]) -> Iterator[int]:
    """mapPartitions function: delete this partition's cell files and forget the dataset here."""
    for row in rows:
        cache.release(row.path)
        shutil.rmtree(row.path, ignore_errors=True)
        yield 1


# --- products with a block of rows -----------------------------------------------------------------

def _csr_rows(cell: CellData, rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position in `rows`, local column, value) of every stored entry of the selected rows."""
    indptr, indices, values = cell.csr()
    starts, stops = indptr[rows], indptr[rows + 1]
    lengths = stops - starts
    at = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) \
        + np.arange(lengths.sum())
    return (np.repeat(np.arange(len(rows)), lengths), indices[at].astype(np.int64),
            values[at].astype(dtype))


def _dense(path: str, dtype: str) -> np.ndarray:
    cell = load_cell(path)
    if dtype == "float32":
        return cell.dense_rows()
    return derived(path, dtype, lambda c: c.dense_rows().astype(dtype))


def forward(path: str, rows: np.ndarray, W: np.ndarray) -> np.ndarray:
    """P = X[rows] W_s, the cell's partial pre-activations of the selected rows."""
    cell = load_cell(path)
    if cell.kind == DENSE:
        return _dense(path, W.dtype.name)[rows] @ W
    at, cols, vals = _csr_rows(cell, rows, W.dtype.name)
    out = np.zeros((len(rows), W.shape[1]), dtype=W.dtype)
    np.add.at(out, at, vals[:, None] * W[cols])
    return out


def backward(path: str, rows: np.ndarray, dZ: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """X[rows]^T dZ, the cell's contribution to the gradient of W_s: (None, dense rows) for dense
    data, (feature rows touched, their gradient rows) for sparse data."""
    cell = load_cell(path)
    if cell.kind == DENSE:
        return None, _dense(path, dZ.dtype.name)[rows].T @ dZ
    at, cols, vals = _csr_rows(cell, rows, dZ.dtype.name)
    touched, inverse = np.unique(cols, return_inverse=True)
    grad = np.zeros((len(touched), dZ.shape[1]), dtype=dZ.dtype)
    np.add.at(grad, inverse, vals[:, None] * dZ[at])
    return touched, grad


# --- row selection ---------------------------------------------------------------------------------

def roles(path: str, layout: blocks.Layout) -> blocks.Roles:
    return derived(path, ("roles", layout), lambda c: blocks.roles(c.as_block(), layout))


def batch_rows(path: str, grid: Grid, epoch: int, batch: int) -> np.ndarray:
    """This cell's rows of global batch `batch` of `epoch`, in global train-index order: the rows
    every cell of its row block, and the driver's labels, list in the same order."""
    rows, bounds = derived(path, ("plan", grid.layout, grid.batch_size, epoch),
                           lambda _: tasks.batch_plan(roles(path, grid.layout), grid.layout,
                                                      grid.batch_size, epoch))
    return rows[bounds[batch]:bounds[batch + 1]]


# --- initial parameters ----------------------------------------------------------------------------

def init_rows(spec: ModelSpec, seed: int, init: str, dtype: str, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of the first-layer matrix, exactly as udfs.core.models.init_params draws them
    for the whole model."""
    d, h = spec.layers[0], spec.layers[1]
    return models.initialiser(init)(rng(seed, Stream.INIT), d, h, lo, hi).astype(dtype)


def rest_spec(spec: ModelSpec) -> ModelSpec | None:
    """The layers after the first (an MLP's), None for one-layer models."""
    return ModelSpec("mlp", spec.layers[1:]) if len(spec.layers) > 2 else None


def head_size(spec: ModelSpec) -> int:
    return spec.n_params - spec.layers[0] * spec.layers[1]


def init_head(spec: ModelSpec, seed: int, init: str, dtype: str) -> np.ndarray:
    """The head: b1, then the later layers' parameters (the tail of the model's flat vector),
    drawn as udfs.core.models.init_params draws them: after the first layer's draws."""
    head = np.zeros(head_size(spec), dtype=dtype)
    rest = rest_spec(spec)
    if rest is not None:
        gen = rng(seed, Stream.INIT)
        models.skip(gen, spec.layers[0] * spec.layers[1])
        head[spec.layers[1]:] = models.init_params(rest, gen, init, dtype)
    return head


# --- the head (label owner) ------------------------------------------------------------------------

def _head_forward(spec: ModelSpec, head: np.ndarray, Z: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Inputs of the later layers and the model output, from the summed partials Z."""
    h = spec.layers[1]
    out = Z + head[:h]
    rest = rest_spec(spec)
    inputs: list[np.ndarray] = []
    if rest is not None:
        for w, b in models.unpack(rest, head[h:]):
            np.maximum(out, 0, out=out)
            inputs.append(out)
            out = out @ w
            out += b
    return inputs, out


def head_output(spec: ModelSpec, head: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """The model output (logits, or the prediction) from the summed partials Z."""
    return _head_forward(spec, head, Z)[1]


def head_step(spec: ModelSpec, head: np.ndarray, Z: np.ndarray,
              y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss over the batch, its gradient with respect to the head, and dZ, its gradient with
    respect to the summed first-layer partials (what goes back to the feature blocks)."""
    inputs, out = _head_forward(spec, head, Z)
    grad = np.empty_like(head)
    h = spec.layers[1]
    rest = rest_spec(spec)
    weights, grads = [], []
    if rest is not None:
        weights = [w for w, _ in models.unpack(rest, head[h:])]
        grads = list(models.unpack(rest, grad[h:]))
    loss, dZ = models.backward(spec, out, y, head.dtype, weights, grads, inputs, through_first=True)
    assert dZ is not None   # through_first: backward returns the gradient of the partials
    grad[:h] = dZ.sum(axis=0)
    return loss, grad, dZ


# --- the carried state -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CellState:
    """One record of the carried state RDD: a cell, its replica of W_s with optimizer buffers, and
    the partial pre-activations of the cell's last forward pass (or None)."""

    part: int
    path: str
    W: np.ndarray
    opt: dict[str, np.ndarray]
    out: np.ndarray | None = None


@dataclass(frozen=True)
class Forward:
    """Which rows a step's forward pass covers: a training batch, or every row of a role."""

    role: str                   # "batch" | "validation" | "test"
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class Update:
    """The optimizer step a task applies first: the batch it is for, the optimizer step count and the
    broadcast {row block: dZ rows} from the head."""

    epoch: int
    batch: int
    t: int
    dZ: Broadcast[dict[int, np.ndarray]]   # {row block: dZ rows}


class MaxSizes(AccumulatorParam):
    """Accumulator of the largest values any task saw, per name: parameters a task held, array bytes
    it received (broadcast, shuffled gradient) and returned to the driver."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = max(a.get(k, 0), v)
        return a


def _rows_of(path: str, grid: Grid, fwd: Forward) -> np.ndarray:
    if fwd.role == "batch":
        return batch_rows(path, grid, fwd.epoch, fwd.batch)
    return getattr(roles(path, grid.layout), fwd.role)


def _outputs(path: str, W: np.ndarray, grid: Grid, fwd: Forward | None,
             sizes: Sizes) -> np.ndarray | None:
    if fwd is None:
        return None
    out = forward(path, _rows_of(path, grid, fwd), W)
    sizes.add({"params": W.size, "bytes_out": out.nbytes})
    return out


def start(rows: Iterable[Any], grid: Grid, fwd: Forward | None, sizes: Sizes,
          restored: dict[int, Broadcast[tuple[np.ndarray, dict[str, np.ndarray]]]] | None = None
          ) -> Iterator[CellState]:
    """mapPartitions over the cell handles: the cell's replica of W_s, drawn here from the run seed
    (or read from its own shard's broadcast when resuming, {s: Broadcast of (W_s, buffers)}, so a
    task reads no other shard), and its first forward."""
    worker.prepare()
    handle = tasks.handle_of(rows)
    if handle is None:
        return
    part, path = handle
    _, s = grid.cell(part)
    lo, hi = grid.columns(s)
    if restored is not None:
        W, buffers = restored[s].value
        W, opt = W.copy(), {k: v.copy() for k, v in buffers.items()}
    else:
        W = init_rows(grid.spec, grid.layout.seed, grid.init, grid.dtype, lo, hi)
        opt = grid.optimizer.init_state(W)
    yield CellState(part, path, W, opt, _outputs(path, W, grid, fwd, sizes))


def contribution(state: CellState, grid: Grid, update: Update) -> tuple[np.ndarray | None, np.ndarray]:
    """This cell's part of the gradient of W_s for the update's batch."""
    r, _ = grid.cell(state.part)
    dZ = update.dZ.value.get(r)
    if dZ is None:
        return np.zeros(0, np.int64), np.zeros((0, state.W.shape[1]), dtype=state.W.dtype)
    return backward(state.path, batch_rows(state.path, grid, update.epoch, update.batch), dZ)


def send(state: CellState, grid: Grid, update: Update, sizes: Sizes) -> Iterator[tuple[int, tuple]]:
    """flatMap for R > 1: this cell's contribution, keyed for every replica of its W_s."""
    worker.prepare()
    part_grad = contribution(state, grid, update)
    sizes.add({"bytes_in": cache.nbytes(update.dZ.value), "bytes_out": cache.nbytes(part_grad)})
    source, s = grid.cell(state.part)
    for r in range(grid.row_blocks):
        yield r * grid.shards + s, (source, part_grad)


def gather(items: Iterable[tuple[int, tuple]]) -> Iterator[list]:
    """mapPartitions after the shuffle: the contributions this replica received, sorted by the row
    block that sent them (the shuffle delivers them in fetch order, and the sum must not depend on
    it), one list per partition so the result zips with the state RDD."""
    yield [grad for _, (_, grad) in sorted(items, key=lambda item: item[1][0])]


def _apply(state: CellState, parts: list[tuple[np.ndarray | None, np.ndarray]], grid: Grid,
           update: Update) -> tuple[np.ndarray, dict]:
    """The optimizer step on this replica, in place: a task's state record is its own copy, freshly
    unpickled from the parent RDD's cache, and becomes the new record."""
    W, opt = state.W, state.opt
    grad = np.zeros_like(W)
    for touched, rows in parts:
        if touched is None:
            grad += rows
        else:
            grad[touched] += rows
    grid.optimizer.step(W.reshape(-1), grad.reshape(-1), {k: v.reshape(-1) for k, v in opt.items()},
                        update.t)
    return W, opt


def step(state: CellState, grid: Grid, update: Update | None, fwd: Forward | None, sizes: Sizes,
         received: list | None = None) -> CellState:
    """map over the state RDD: apply the update (with the contributions received from the other
    row blocks, or, when R = 1, this cell's own), then run the forward pass."""
    worker.prepare()
    W, opt = state.W, state.opt
    if update is not None:
        if received is None:
            received = [contribution(state, grid, update)]
            sizes.add({"bytes_in": cache.nbytes(update.dZ.value)})
        else:
            sizes.add({"bytes_in": cache.nbytes(received)})
        W, opt = _apply(state, received, grid, update)
    return replace(state, W=W, opt=opt, out=_outputs(state.path, W, grid, fwd, sizes))


def step_received(pair: tuple[CellState, list], grid: Grid, update: Update | None,
                  fwd: Forward | None, sizes: Sizes) -> CellState:
    """map over state.zip(gathered contributions), for R > 1."""
    state, received = pair
    return step(state, grid, update, fwd, sizes, received)


def output(state: CellState) -> tuple[int, np.ndarray | None]:
    """What a cell returns to the driver after a step: its partition and partial pre-activations
    (None after a step without a forward pass)."""
    return state.part, state.out


def shard_of(states: Iterable[CellState], names: tuple[str, ...]) -> Iterator[list[np.ndarray]]:
    """runJob function: the partition's W_s (as a flat vector) and optimizer buffers by name."""
    for state in states:
        yield [state.W.reshape(-1)] + [state.opt[n].reshape(-1) for n in names]
