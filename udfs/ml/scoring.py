"""Scoring on the executors (a mapInArrow function): a model's predictions for a whole Arrow batch at
once, one matrix product per layer. The weights arrive in a Spark broadcast, read once per Python
worker.

Why mapInArrow and not a pandas UDF: a pandas UDF receives a list<float> column as a Series holding
one numpy array per row, and stacking those Python objects cost more than the model itself (the
scoring job ran at a tenth of a numpy predict's rows per second, docs/BENCHMARKS.md). Here the
column's Arrow buffers become one matrix per batch through their offsets (dense) or one CSR matrix
(sparse struct<size, indices, values>), with the same row checks the blocks use, and the results go
back as Arrow arrays built from flat numpy buffers: no Python object per row either way.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from scipy import sparse

from udfs.core import worker
from udfs.core.models import Model
from udfs.data.blocks import BlockError, dense_features, sparse_features
from udfs.data.transform import NONE, Transform

if TYPE_CHECKING:
    from pyspark import Broadcast


@dataclass(frozen=True)
class Scoring:
    spec: Model
    column: str                 # the features column of the batches: array<float> or sparse struct
    shown_as: str               # the features column's name in errors (the user's, if converted)
    keep: tuple[str, ...]       # columns passed through to the output, in this order
    key: str | None             # the integer column that names a bad row in errors (None: none has)
    outputs: tuple[str, str] = ("prediction", "probability")   # names of the columns added
    transform: Transform = NONE   # the model's feature transform (its spec.json's)

    @property
    def width(self) -> int:
        """Features per row the input must have: the transform's raw width, else the model's."""
        return self.transform.width or self.spec.n_features


def feature_matrix(batch: pa.RecordBatch, scoring: Scoring, first_row: int
                   ) -> np.ndarray | sparse.csr_matrix:
    """The batch's features as one float32 matrix (CSR for a sparse column), transformed as the
    model was trained. A null, a row of another width or a missing value without imputation is a
    ValueError naming the column and the row: by its key, or without a key by its position in the
    partition (`first_row` is the batch's first)."""
    features = batch.column(scoring.column)
    width = scoring.width
    if scoring.key is None:
        ids = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
        where = f"features column {scoring.shown_as!r} (row ids count rows from 0 within a partition)"
    else:
        ids = np.asarray(batch.column(scoring.key), dtype=np.int64)
        where = f"features column {scoring.shown_as!r}"
    try:
        if pa.types.is_struct(features.type):
            _, counts, cols, vals = sparse_features(features, ids, width)
            vals = scoring.transform.apply_sparse(counts, cols, vals, ids, width)
            indptr = np.concatenate(([0], np.cumsum(counts)))
            return sparse.csr_matrix((vals, cols, indptr), shape=(batch.num_rows, width))
        return scoring.transform.apply(dense_features(features, ids, width), ids)
    except BlockError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _list_column(matrix: np.ndarray) -> pa.ListArray:
    """A 2-D array as an Arrow list column over its flat buffer (no Python object per row)."""
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).ravel()))


def score_batch(batch: pa.RecordBatch, scoring: Scoring, theta: np.ndarray, first_row: int
                ) -> pa.RecordBatch:
    """The kept columns, then prediction (the class label as a double, or the predicted value) and,
    for classifiers, the class probabilities (array<double>)."""
    spec = scoring.spec
    X = feature_matrix(batch, scoring, first_row).astype(theta.dtype, copy=False)
    out = spec.decision(theta, X)
    arrays = [batch.column(name) for name in scoring.keep]
    arrays.append(pa.array(spec.labels(out).astype(np.float64)))
    if spec.is_classifier:
        arrays.append(_list_column(spec.probabilities(out).astype(np.float64, copy=False)))
    names = [*scoring.keep, *scoring.outputs[:len(arrays) - len(scoring.keep)]]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def score_batches(batches: Iterator[pa.RecordBatch], scoring: Scoring, weights: Broadcast[np.ndarray]
                  ) -> Iterator[pa.RecordBatch]:
    """mapInArrow function: every batch of the partition, scored (score_batch)."""
    worker.prepare()
    theta = weights.value
    seen = 0
    for batch in batches:
        yield score_batch(batch, scoring, theta, seen)
        seen += batch.num_rows
