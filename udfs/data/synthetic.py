"""Synthetic training rows, generated on the executors (pipelines/generate.py drives it).

Rows come in fixed chunks of ids; chunk c is drawn from rng(seed, Stream.GENERATE, c) alone, so the
table's contents depend on (rows, features, density, task, classes, noise, seed), never on the
number of partitions or on which executor runs a chunk. The true model (`Truth`) is drawn on the
driver from rng(seed, Stream.TRUTH) and reaches the tasks by broadcast.

Labels from the true model's output z = x W + b:
    regression       y = z + noise * N(0, 1)
    binary           y = 1[z + noise * Logistic(0, 1) > 0]      (noise=1: y ~ Bernoulli(sigmoid(z)))
    K > 2 classes    y = argmax(z + noise * Gumbel(0, 1))        (noise=1: y ~ softmax(z))
Features are N(0, 1); with density < 1 each row holds about density * d non-zeros at distinct
random indices, stored sparse as struct<size, indices, values> (the layout of Spark's SparseVector).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from scipy import sparse

from udfs.core import worker
from udfs.core.seeding import Stream, rng

if TYPE_CHECKING:
    from pyspark import Broadcast

SIGNAL = 4.0        # standard deviation of the true model's output z
BIAS_SCALE = 0.5
TEST_FRACTION = 0.2
MAX_CHUNK_ROWS = 65_536
CHUNK_VALUES = 1 << 22   # about 16 MB of float32 features per Arrow batch


@dataclass(frozen=True)
class Spec:
    rows: int
    features: int
    classes: int          # 0 = regression
    density: float
    noise: float
    seed: int
    partitions: int

    @property
    def sparse(self) -> bool:
        return self.density < 1.0

    @property
    def nnz(self) -> int:
        """Draws of indices per row (a row keeps the distinct ones) or the dense width."""
        return max(1, int(round(self.density * self.features))) if self.sparse else self.features

    @property
    def outputs(self) -> int:
        return self.classes if self.classes > 2 else 1

    @property
    def chunk_rows(self) -> int:
        return int(np.clip(CHUNK_VALUES // self.nnz, 1, MAX_CHUNK_ROWS))

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_range(self, part: int) -> range:
        """The chunks partition `part` writes: a contiguous share, so ids stay in order."""
        return range(part * self.chunks // self.partitions, (part + 1) * self.chunks // self.partitions)


@dataclass(frozen=True)
class Truth:
    W: np.ndarray   # float64 [d, outputs]
    b: np.ndarray   # float64 [outputs]


def truth(spec: Spec) -> Truth:
    """The true model: z has standard deviation about SIGNAL whatever d and the density."""
    r = rng(spec.seed, Stream.TRUTH)
    W = r.standard_normal((spec.features, spec.outputs)) * (SIGNAL / np.sqrt(spec.nnz))
    return Truth(W, BIAS_SCALE * r.standard_normal(spec.outputs))


def _sparse_rows(r: np.random.Generator, n: int, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts (row offsets, column indices, values) of n rows with distinct sorted indices."""
    idx = np.sort(r.integers(0, spec.features, size=(n, spec.nnz), dtype=np.int64), axis=1)
    keep = np.ones(idx.shape, dtype=bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    counts = keep.sum(axis=1)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
    indices = idx[keep].astype(np.int32)
    values = r.standard_normal(len(indices), dtype=np.float32)
    return offsets, indices, values


def _labels(r: np.random.Generator, z: np.ndarray, spec: Spec) -> pa.Array:
    if spec.classes == 0:
        return pa.array(z[:, 0] + spec.noise * r.standard_normal(len(z)))
    if spec.classes == 2:
        return pa.array((z[:, 0] + spec.noise * r.logistic(size=len(z)) > 0).astype(np.int32))
    return pa.array((z + spec.noise * r.gumbel(size=z.shape)).argmax(axis=1).astype(np.int32))


def chunk(spec: Spec, model: Truth, c: int) -> pa.RecordBatch:
    """Rows [c * chunk_rows, ...) of the table as one Arrow batch in the training-table schema."""
    r = rng(spec.seed, Stream.GENERATE, c)
    start = c * spec.chunk_rows
    n = min(spec.chunk_rows, spec.rows - start)
    ids = np.arange(start, start + n, dtype=np.int64)
    if spec.sparse:
        offsets, indices, values = _sparse_rows(r, n, spec)
        z = sparse.csr_matrix((values.astype(np.float64), indices, offsets),
                              shape=(n, spec.features)) @ model.W
        features = pa.StructArray.from_arrays(
            [pa.array(np.full(n, spec.features, dtype=np.int32)),
             pa.ListArray.from_arrays(pa.array(offsets), pa.array(indices)),
             pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))],
            names=["size", "indices", "values"])
    else:
        X = r.standard_normal((n, spec.features), dtype=np.float32)
        z = X @ model.W
        offsets = np.arange(0, (n + 1) * spec.features, spec.features, dtype=np.int32)
        features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(X.ravel()))
    z += model.b
    split = np.where(r.random(n) < TEST_FRACTION, "test", "train")
    return pa.RecordBatch.from_arrays([pa.array(ids), features, _labels(r, z, spec), pa.array(split)],
                                      names=["id", "features", "label", "split"])


def generate_partitions(batches: Iterator[pa.RecordBatch], spec: Spec, model: Broadcast[Truth]
                        ) -> Iterator[pa.RecordBatch]:
    """mapInArrow function over spark.range(partitions): each input row names a partition, whose
    chunks this task draws. `model` is the broadcast Truth."""
    worker.prepare()
    for batch in batches:
        for part in batch.column(0).to_numpy():
            for c in spec.chunk_range(int(part)):
                yield chunk(spec, model.value, c)


def schema(spec: Spec) -> str:
    """The Spark DDL of a generated table."""
    features = ("struct<size:int,indices:array<int>,values:array<float>>" if spec.sparse
                else "array<float>")
    return f"id long, features {features}, label {'double' if spec.classes == 0 else 'int'}, split string"


# --- the wide sparse benchmark table ---------------------------------------------------------

VOCABULARY_SCHEMA = "id long, indices array<int>, values array<float>, label int, split string"


def vocabulary_rows(batches: Iterator[pa.RecordBatch], features: int, classes: int, informative: int,
             noise: int, seed: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow over spark.range: wide sparse classification rows with those ids (the
    model-parallel benchmark's table), drawn from (seed, first id of the batch).

    Row i of class y holds `informative` features drawn from class y's own vocabulary (the feature
    indices j with j mod K = y) and `noise` features drawn from all d, every value 1.0, so a linear
    model can learn the classes and every feature block carries signal. Row 0 also holds feature
    d-1, so the table's width (1 + the largest index) is d. 10% of the rows are test rows. Columns
    are `indices` and `values` (VOCABULARY_SCHEMA), the layout model_parallel reads besides the
    struct `features` of generate_partitions."""
    for batch in batches:
        ids = batch.column("id").to_numpy()
        if not len(ids):
            continue
        gen = rng(seed, Stream.SPARSE_ROWS, int(ids[0]))
        n = len(ids)
        y = gen.integers(0, classes, n)
        per_class = features // classes
        signal = gen.integers(0, per_class, (n, informative)) * classes + y[:, None]
        cols = np.concatenate([signal, gen.integers(0, features, (n, noise))], axis=1)
        cols.sort(axis=1)
        rows = [np.unique(c) for c in cols]
        if ids[0] == 0:
            rows[0] = np.union1d(rows[0], [features - 1])
        lengths = np.array([len(r) for r in rows])
        offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
        flat = np.concatenate(rows).astype(np.int32)
        yield pa.RecordBatch.from_pydict({
            "id": pa.array(ids.astype(np.int64)),
            "indices": pa.ListArray.from_arrays(offsets, pa.array(flat)),
            "values": pa.ListArray.from_arrays(offsets, pa.array(np.ones(len(flat), np.float32))),
            "label": pa.array(y.astype(np.int32)),
            "split": pa.array(np.where(gen.random(n) < 0.1, "test", "train")),
        })
