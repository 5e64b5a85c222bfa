"""Per-partition numpy blocks: built once from Arrow on the executor, kept on its local disk and in
the Python worker's memory, so training jobs ship only a tiny handle instead of the data.

Why not cache the arrays in a Spark RDD: Spark's RDD cache keeps pickled bytes and re-ships every
block to the Python worker on every job (about 0.4 s per 94 MB block here), which dominates a job
that computes one gradient. Here the cached RDD holds only a handle row; the task that owns the
partition runs where the handle (and so the block file) lives, and a reused Python worker finds the
arrays already in memory.

Row order and roles. A block holds every row of its partition, sorted by (is_test, shard, id), where
`shard = pmod(xxhash64(id), N_SHARDS)` is computed by Spark and every shard lives in exactly one
partition. The train-split rows therefore have one global order, (shard, id), that does not depend on
the number of partitions: the global index of a row is the count of train-split rows in lower shards
(summed on the driver from every block's per-shard counts) plus its rank inside its shard. From that
index, the run seed alone decides which rows are held out for validation and how `sync` forms its
global mini-batches, so results never depend on how many partitions there are.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from scipy import sparse

from udfs.core import cache, files, worker
from udfs.core.cache import resident_bytes
from udfs.core.seeding import SECRET_BYTES, Stream, rng
from udfs.data.errors import BlockError

if TYPE_CHECKING:
    from udfs.data.transform import Transform

N_SHARDS = 1024

# A block's handle row (describe): its fields' Arrow types, and the Spark schema of mapInArrow's output
HANDLE_TYPES = {"part": pa.int32(), "path": pa.string(), "rows": pa.int64(),
                "test_rows": pa.int64(), "width": pa.int32(), "label_max": pa.float64(),
                "float_label": pa.bool_(), "distinct_labels": pa.int32(),
                "shard_counts": pa.binary(), "feature_bytes": pa.int64(), "sparse": pa.bool_()}
_SPARK_TYPES = {pa.int32(): "int", pa.int64(): "long", pa.string(): "string",
                pa.float64(): "double", pa.bool_(): "boolean", pa.binary(): "binary"}
HANDLE_SCHEMA = ", ".join(f"{name} {_SPARK_TYPES[t]}" for name, t in HANDLE_TYPES.items())
SMALL = ("y", "id", "shard", "test")
SPLITS = ("train", "test")
SECRET_FILE = "secret.key"
META_FILE = "meta.json"     # the application's: block.json plus this application's memory budget
BLOCK_FILE = "block.json"   # the block's own facts (rows, width, sparse, non-zeros)


class BlockMissing(FileNotFoundError):
    """The block's files are not on this executor; the driver rebuilds the blocks (data.Blocks.run)."""


@dataclass(frozen=True)
class Block:
    X: np.ndarray | sparse.csr_matrix   # float32 [n, d]: in memory or memory-mapped
    y: np.ndarray        # int32 (classification) or float64 (regression) [n]
    id: np.ndarray       # int64 [n]
    shard: np.ndarray    # int32 [n]
    test: np.ndarray     # bool [n]
    in_memory: bool = True
    budget: int = 0      # the worker's cache budget in bytes (meta cache_bytes)
    derived_per_entry: ClassVar[int] = 3   # roles and the newest batch plans

    @property
    def feature_bytes(self) -> int:
        return feature_bytes(self.X)

    @property
    def cached_bytes(self) -> int:
        """What this block keeps in the worker's memory: nothing when memory-mapped."""
        return cache.nbytes((self.X, self.y, self.id, self.shard, self.test)) if self.in_memory else 0


def feature_bytes(X: np.ndarray | sparse.csr_matrix) -> int:
    if isinstance(X, np.ndarray):   # dense or memory-mapped (np.memmap); else a CSR matrix
        return X.nbytes
    return X.data.nbytes + X.indices.nbytes + X.indptr.nbytes


def dense_features(arr: pa.Array, ids: np.ndarray, width: int | None) -> np.ndarray:
    """Turn a list<float> Arrow column into a 2-D float32 array without a per-row Python loop."""
    if arr.null_count:
        bad = ids[np.asarray(arr.is_null())][0]
        raise BlockError(f"row id {bad}: features is null")
    offsets = np.asarray(arr.offsets)
    lengths = np.diff(offsets)
    width = int(lengths[0]) if width is None and len(lengths) else width
    if len(lengths) and (lengths != width).any():
        i = int(np.flatnonzero(lengths != width)[0])
        raise BlockError(f"row id {ids[i]}: features has {lengths[i]} values, expected {width}")
    values = np.asarray(arr.values.slice(offsets[0], offsets[-1] - offsets[0]), dtype=np.float32)
    return values.reshape(len(lengths), width or 0)


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(arr.offsets)
    return np.diff(offsets), np.asarray(arr.values.slice(offsets[0], offsets[-1] - offsets[0]))


def sparse_features(arr: pa.StructArray, ids: np.ndarray, width: int | None
            ) -> tuple[int | None, np.ndarray, np.ndarray, np.ndarray]:
    """(declared size, nonzeros per row, column indices, values) of a struct<size, indices, values>
    column, checked row by row without a Python loop: every error names the row id. The size is
    `width` as given (None when not known yet) for a column without rows."""
    if arr.null_count:
        raise BlockError(f"row id {ids[np.asarray(arr.is_null())][0]}: features is null")
    size, indices, values = (arr.field(n) for n in ("size", "indices", "values"))
    for name, child in (("size", size), ("indices", indices), ("values", values)):
        if child.null_count:
            raise BlockError(f"row id {ids[np.asarray(child.is_null())][0]}: features.{name} is null")
    sizes = np.asarray(size, dtype=np.int64)
    width = int(sizes[0]) if width is None and len(sizes) else width
    if len(sizes) and (sizes != width).any():
        i = int(np.flatnonzero(sizes != width)[0])
        raise BlockError(f"row id {ids[i]}: features.size is {sizes[i]}, expected {width}")
    counts, cols = _list_parts(indices)
    value_counts, vals = _list_parts(values)
    if (counts != value_counts).any():
        i = int(np.flatnonzero(counts != value_counts)[0])
        raise BlockError(f"row id {ids[i]}: features has {counts[i]} indices but "
                         f"{value_counts[i]} values")
    bad = (cols < 0) | (cols >= width)
    if bad.any():
        assert width is not None   # a bad index means rows, and the first row's size set width
        j = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(np.cumsum(counts), j, side="right"))
        raise BlockError(f"row id {ids[row]}: features index {int(cols[j])} is outside the declared "
                         f"dimension {width} (indices must be in 0..{width - 1})")
    return width, counts, cols.astype(np.int32), vals.astype(np.float32)


def block_dir(root: str, key: str, part: int) -> str:
    return os.path.join(root, "fedspark-blocks", key, f"part-{part:05d}")


def own_store_root(block_path: str) -> str:
    """The block store of one load when the persistent cache is off (udfs/data/store.py): beside
    its blocks, in this application's directory, and removed with them."""
    return os.path.join(os.path.dirname(block_path), ".store")


class _Writer:
    """Streams a partition's Arrow batches into a block directory: the features go straight to
    files on the executor's local disk (X.bin, or the CSR parts X_indices.bin, X_data.bin), so a
    partition larger than the Python worker's memory builds in one pass; the per-row columns
    (label, id, shard, split: 17 bytes a row) are kept until the end and saved as .npy. The
    features are stored as `transform` makes them (udfs/data/transform.py)."""

    def __init__(self, tmp: str, transform: Transform | None = None):
        self.tmp = tmp
        self.transform = transform
        self.raw_width: int | None = None   # features per row as read, before the transform
        self.width: int | None = None
        self.is_sparse: bool | None = None
        self.small: dict[str, list[np.ndarray]] = {name: [] for name in SMALL}
        self.counts: list[np.ndarray] = []
        self.files: dict[str, Any] = {}

    def _file(self, name: str) -> Any:
        if name not in self.files:
            self.files[name] = open(os.path.join(self.tmp, name), "wb")
        return self.files[name]

    def add(self, batch: pa.RecordBatch) -> None:
        ids = np.asarray(batch.column("id"), dtype=np.int64)
        features = batch.column("features")
        if self.is_sparse is None:
            self.is_sparse = pa.types.is_struct(features.type)
        small = row_columns(ids, batch.column("label"), batch.column("shard"), batch.column("split"))
        if not self.is_sparse:
            X = dense_features(features, ids, self.raw_width)
            self.raw_width = X.shape[1]
            self.add_dense(X if self.transform is None else self.transform.apply(X, ids), small)
            return
        self.width, counts, cols, vals = sparse_features(features, ids, self.width)
        if self.transform is not None:
            vals = self.transform.apply_sparse(counts, cols, vals, ids, self.width or 0)
        self.counts.append(counts)
        self._file("X_indices.bin").write(cols.tobytes())
        self._file("X_data.bin").write(vals.tobytes())
        self._add_rows(small)

    def add_dense(self, X: np.ndarray, small: dict[str, np.ndarray]) -> None:
        """Rows whose features are already a float32 matrix (checked by dense_features)."""
        self.is_sparse = False
        self.width = X.shape[1]
        self._file("X.bin").write(np.ascontiguousarray(X).data)
        self._add_rows(small)

    def _add_rows(self, small: dict[str, np.ndarray]) -> None:
        for name in SMALL:
            self.small[name].append(small[name])

    def finish(self) -> None:
        """Close the feature files, save the per-row arrays and block.json."""
        for fh in self.files.values():
            fh.close()
        small = {name: np.concatenate(parts) for name, parts in self.small.items()}
        _check_order(small)
        for name, arr in small.items():
            np.save(os.path.join(self.tmp, f"{name}.npy"), arr, allow_pickle=False)
        facts: dict[str, Any] = {"rows": len(small["id"]), "width": self.width or 0,
                                 "sparse": bool(self.is_sparse)}
        if self.is_sparse:
            indptr = np.concatenate(([0], np.cumsum(np.concatenate(self.counts))))
            if indptr[-1] >= 2 ** 31:
                raise BlockError(f"a partition holds {indptr[-1]} non-zeros, more than 2^31-1: "
                                 "use more data.partitions")
            np.save(os.path.join(self.tmp, "X_indptr.npy"), indptr.astype(np.int32),
                    allow_pickle=False)
            facts["nnz"] = int(indptr[-1])
        with open(os.path.join(self.tmp, BLOCK_FILE), "w") as fh:
            json.dump(facts, fh)


def write(tmp: str, batches: Iterable[pa.RecordBatch], transform: Transform | None = None) -> bool:
    """The block of these rows (sorted by split, shard, id), features transformed, into the
    directory `tmp`; False, and nothing written, when there are none."""
    writer = _Writer(tmp, transform)
    for batch in batches:
        if batch.num_rows:
            writer.add(batch)
    if writer.width is None:
        return False
    writer.finish()
    return True


def write_dense(tmp: str, X: np.ndarray, small: dict[str, np.ndarray]) -> bool:
    """The block of these rows (features a checked float32 matrix, per-row columns SMALL, sorted
    by split, shard, id) into the directory `tmp`; False, and nothing written, when there are none."""
    if not len(X):
        return False
    writer = _Writer(tmp)
    writer.add_dense(X, small)
    writer.finish()
    return True


def data_files(path: str) -> list[str]:
    """The block's own files: what the block store keeps (no meta.json, no secret)."""
    with open(os.path.join(path, BLOCK_FILE)) as fh:
        is_sparse = json.load(fh)["sparse"]
    features = ["X_indptr.npy", "X_indices.bin", "X_data.bin"] if is_sparse else ["X.bin"]
    return [*features, *(f"{name}.npy" for name in SMALL), BLOCK_FILE]


def seal(tmp: str, cache_bytes: int) -> None:
    """Make the block directory `tmp` this application's: its meta.json (the block's facts and
    what one Python worker may keep in memory, see load) and a fresh secret."""
    with open(os.path.join(tmp, BLOCK_FILE)) as fh:
        meta = {**json.load(fh), "cache_bytes": int(cache_bytes)}
    with open(os.path.join(tmp, META_FILE), "w") as fh:
        json.dump(meta, fh)
    _write_secret(os.path.join(tmp, SECRET_FILE))


def describe(part: int, path: str) -> dict[str, Any]:
    """The handle row of the block at `path` (HANDLE_SCHEMA): where it is, its size and labels,
    and its train-split rows per shard. Plain values: a task that only takes a cached block never
    needs Arrow's pandas-backed conversions."""
    with open(os.path.join(path, BLOCK_FILE)) as fh:
        facts = json.load(fh)
    y, shard, test = (np.load(os.path.join(path, f"{n}.npy"), allow_pickle=False)
                      for n in ("y", "shard", "test"))
    counts = np.bincount(shard[~test], minlength=N_SHARDS).astype(np.int64)
    return {"part": part, "path": path, "rows": facts["rows"], "test_rows": int(test.sum()),
            "width": facts["width"], "label_max": float(y.max()),
            "float_label": y.dtype.kind == "f", "distinct_labels": len(np.unique(y)),
            "shard_counts": counts.tobytes(), "feature_bytes": _stored_feature_bytes(path, facts),
            "sparse": facts["sparse"]}


def row_columns(ids: np.ndarray, label: pa.Array, shard: pa.Array | np.ndarray,
                split: pa.Array) -> dict[str, np.ndarray]:
    """The per-row columns of a block (SMALL) from Arrow columns: label as int32 or float64."""
    return {"y": np.asarray(label, dtype=np.float64 if pa.types.is_floating(label.type) else np.int32),
            "id": ids, "shard": np.asarray(shard, dtype=np.int32),
            "test": np.asarray(split.to_numpy(zero_copy_only=False) == "test")}


def _check_order(small: dict[str, np.ndarray]) -> None:
    """Rows must arrive sorted by (is_test, shard, id): Spark sorts them (data.build)."""
    t, s, i = small["test"].astype(np.int8), small["shard"], small["id"]
    up = (t[1:] > t[:-1]) | ((t[1:] == t[:-1]) & ((s[1:] > s[:-1]) | ((s[1:] == s[:-1]) & (i[1:] >= i[:-1]))))
    if not up.all():
        raise RuntimeError("block rows are not sorted by (split, shard, id): the build must sort "
                           "them within partitions")


def _write_secret(path: str) -> None:
    """The partition's own secret for secure aggregation: OS entropy, never derived from the run
    seed, readable only by this user and only ever read by this partition's tasks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(SECRET_BYTES))


def private_file(path: str, name: str) -> str:
    """A file of the block's client beside its secret (secure aggregation's per-run keys and
    answers); BlockMissing when the block is gone."""
    if not os.path.isdir(path):
        raise _missing(path)
    return os.path.join(path, name)


def secret(path: str) -> bytes:
    """The secret of the block at `path` (see _write_secret); BlockMissing when the block is gone."""
    try:
        with open(os.path.join(path, SECRET_FILE), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise _missing(path) from None


def build_partition(batches: Iterator[pa.RecordBatch], key: str, cache_bytes: int,
                    transform: Transform | None = None) -> Iterator[pa.RecordBatch]:
    """mapInArrow function: stream this partition's rows (sorted by split, shard, id) into a block
    on the executor's local disk, atomically (a retried task may race a dead one), features as
    `transform` makes them, and return one handle row (describe). `cache_bytes` is what one Python
    worker may keep in memory (see load)."""
    worker.prepare()
    part = task_partition()
    path = block_dir(local_root(), key, part)
    with files.replacing_dir(path) as tmp:   # an empty partition leaves it empty: no block
        if not write(tmp, batches, transform):
            return
        seal(tmp, cache_bytes)
    yield pa.RecordBatch.from_pydict({k: pa.array([v], HANDLE_TYPES[k])
                                      for k, v in describe(part, path).items()})


def task_partition() -> int:
    """The partition of the Spark task running this code."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        raise RuntimeError("block building runs only inside a Spark task")
    return context.partitionId()


def local_root() -> str:
    """This application's directory on the executor's local disk (SparkFiles' root)."""
    from pyspark import SparkFiles

    return SparkFiles.getRootDirectory()


def _stored_feature_bytes(path: str, meta: dict[str, Any]) -> int:
    names = ("X_indptr.npy", "X_indices.bin", "X_data.bin") if meta["sparse"] else ("X.bin",)
    return sum(os.path.getsize(os.path.join(path, n)) for n in names)


# The worker's cache (udfs/core/cache.py) holds blocks and values derived from them, under one
# budget shared with model-parallel cells; its derived values by block path are _DERIVED here.
_DERIVED = cache.DERIVED


def _read(path: str, name: str, dtype: type, shape: tuple[int, ...], in_memory: bool) -> np.ndarray:
    file = os.path.join(path, name)
    if in_memory:
        return np.fromfile(file, dtype=dtype).reshape(shape)
    if not np.prod(shape):
        return np.zeros(shape, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=shape)


def _load_npy(path: str, name: str, in_memory: bool) -> np.ndarray:
    return np.load(os.path.join(path, name), mmap_mode=None if in_memory else "r", allow_pickle=False)


def _stored_bytes(path: str, meta: dict[str, Any]) -> int:
    """What the block takes in memory when held there: its features and per-row columns."""
    return _stored_feature_bytes(path, meta) + sum(
        os.path.getsize(os.path.join(path, f"{name}.npy")) for name in SMALL)


def _open(path: str, may_copy: bool = True) -> Block:
    with open(os.path.join(path, META_FILE)) as fh:
        meta = json.load(fh)
    n, d, budget = meta["rows"], meta["width"], meta["cache_bytes"]
    in_memory = may_copy and cache.has_room(_stored_bytes(path, meta), budget)
    if meta["sparse"]:
        indptr = _load_npy(path, "X_indptr.npy", in_memory)
        nnz = meta["nnz"]
        X = sparse.csr_matrix((_read(path, "X_data.bin", np.float32, (nnz,), in_memory),
                               _read(path, "X_indices.bin", np.int32, (nnz,), in_memory), indptr),
                              shape=(n, d), copy=False)
    else:
        X = _read(path, "X.bin", np.float32, (n, d), in_memory)
    y, ids, shard, test = (_load_npy(path, f"{name}.npy", in_memory) for name in SMALL)
    return Block(X, y, ids, shard, test, in_memory=in_memory, budget=budget)


def _missing(path: str) -> BlockMissing:
    return BlockMissing(
        f"block {path} is not on this executor (the task ran away from the executor "
        "that built it, or the executor's files were removed)")


_BLOCKS = cache.Kind(_open, _missing)


def load(path: str) -> Block:
    """The block at `path`, opened once per worker (see udfs/core/cache.py)."""
    return _BLOCKS.load(path)


def derived(path: str, key: Any, compute: Callable[[Block], Any]) -> Any:
    """`compute(block)` for the block at `path`, kept by the worker's cache while it has room."""
    return _BLOCKS.derived(path, key, compute)


def rows_of(X: np.ndarray | sparse.csr_matrix, rows: np.ndarray, dtype: str
            ) -> np.ndarray | sparse.csr_matrix:
    """X[rows] in `dtype`; a run of consecutive rows is sliced (no copy of float32 features)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        part = X[int(rows[0]):int(rows[-1]) + 1]
    else:
        part = X[rows]
    return part.astype(dtype, copy=False)


def remove_partition(rows: Iterable[Any]) -> Iterator[int]:
    """mapPartitions function: delete this partition's block files (and the load's own store, if
    it has one) and forget the dataset here."""
    for row in rows:
        cache.release(row.path)
        shutil.rmtree(row.path, ignore_errors=True)
        shutil.rmtree(own_store_root(row.path), ignore_errors=True)
        yield 1


@dataclass(frozen=True)
class Layout:
    """Global facts every task needs to place its rows: the offset of each shard in the global
    (shard, id) order of train-split rows, and how the run splits them."""

    shard_offsets: tuple[int, ...]   # N_SHARDS + 1 cumulative counts
    seed: int
    validation_fraction: float

    @property
    def n_train_split(self) -> int:
        return self.shard_offsets[-1]

    @property
    def n_validation(self) -> int:
        return int(round(self.validation_fraction * self.n_train_split))

    @property
    def n_train(self) -> int:
        return self.n_train_split - self.n_validation


@dataclass(frozen=True)
class Roles:
    """Where a block's rows go: train rows (block positions, ordered by global train index, and
    that index), validation rows and test rows."""

    train: np.ndarray
    train_index: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def global_index(block: Block, offsets: np.ndarray) -> np.ndarray:
    """Global (shard, id)-order index of each train-split row of the block, in block order."""
    shards = block.shard[~block.test]
    first_in_block = np.searchsorted(shards, shards, side="left")
    return offsets[shards] + (np.arange(len(shards)) - first_in_block)


@lru_cache(maxsize=4)
def validation_mask(n_train_split: int, n_validation: int, seed: int) -> np.ndarray:
    """Which global indices are validation rows: exactly n_validation of them, drawn by the seed."""
    ranks = rng(seed, Stream.VALIDATION).permutation(n_train_split)
    return ranks < n_validation


def roles(block: Block, layout: Layout) -> Roles:
    offsets = np.asarray(layout.shard_offsets, dtype=np.int64)
    g = global_index(block, offsets)
    split_rows = np.flatnonzero(~block.test)
    held_out = validation_mask(layout.n_train_split, layout.n_validation, layout.seed)
    is_val = held_out[g]
    # rank among the training rows: global index minus validation rows before it
    val_before = np.concatenate(([0], np.cumsum(held_out)))
    train_index = g[~is_val] - val_before[g[~is_val]]
    return Roles(split_rows[~is_val], train_index, split_rows[is_val], np.flatnonzero(block.test))


def residency(rows: Iterable[Any]) -> Iterator[dict]:
    """mapPartitions function: how this partition's block is held by the worker that runs the task
    (in memory or memory-mapped, and the bytes that worker's cache keeps); for tests and benchmarks."""
    for row in rows:
        block = load(row.path)
        yield {"part": int(row.part), "in_memory": block.in_memory,
               "feature_bytes": block.feature_bytes, "worker_resident_bytes": resident_bytes(),
               "worker_pid": os.getpid(), "sparse": bool(sparse.issparse(block.X))}
