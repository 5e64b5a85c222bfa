"""Synthetic wide sparse classification rows, generated on the executors (the model-parallel
benchmark's table; a stopgap until a general generator exists).

Row i of class y holds `informative` features drawn from class y's own vocabulary (the feature
indices j with j mod K = y) and `noise` features drawn from all d, every value 1.0, so a linear model
can learn the classes and every feature block carries signal. Row 0 also holds feature d-1, so the
table's width (1 + the largest index) is d. 10% of the rows are test rows.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from udfs.core.seeding import Stream, rng

SCHEMA = "id long, indices array<int>, values array<float>, label int, split string"


def generate(batches: Iterator[pa.RecordBatch], features: int, classes: int, informative: int,
             noise: int, seed: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow over spark.range: the rows with those ids, each drawn from (seed, id)."""
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
