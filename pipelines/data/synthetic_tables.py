"""Synthetic tables on the driver side: the true model, its table, and the generated rows written
as a Delta table (the rows are drawn on the executors, udfs/data/synthetic.py;
`pipelines/generate.py` is the entry point).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession

from pipelines.data import lake, sources
from udfs.data import synthetic

TRUTH_SUFFIX = "_truth"


def truth_table(model: synthetic.Truth) -> pa.Table:
    outputs = model.W.shape[1]
    return pa.table({
        "output": pa.array(np.arange(outputs, dtype=np.int32)),
        "weights": pa.array([model.W[:, k] for k in range(outputs)], pa.list_(pa.float64())),
        "bias": pa.array(model.b),
    })


def read_truth(spark: SparkSession, lake_path: str, table: str) -> synthetic.Truth:
    """The true model stored beside a generated table."""
    df, _ = lake.read(spark, lake_path, lake.TableRef(table + TRUTH_SUFFIX))
    rows = sorted(df.collect(), key=lambda r: r.output)
    return synthetic.Truth(np.stack([np.asarray(r.weights) for r in rows], axis=1),
                          np.array([r.bias for r in rows]))


def generate_table(spark: SparkSession, lake_path: str, table: str, spec: synthetic.Spec) -> dict:
    path = lake.table_path(lake_path, table)
    truth_path = lake.table_path(lake_path, table + TRUTH_SUFFIX)
    options = {"generate": dataclasses.asdict(spec)}
    for existing in (path, truth_path):
        if lake.exists(spark, existing):
            previous = sources.last_ingest(spark, existing)   # refuses a table we did not write
            if existing == path and previous.get("options") == options:
                return {"table": table, "version": lake.latest_version(spark, path),
                        "skipped": True, "rows": spec.rows}
    model = synthetic.truth(spec)
    bc = spark.sparkContext.broadcast(model)
    try:
        rows = (spark.range(0, spec.partitions, 1, spec.partitions)
                .mapInArrow(partial(synthetic.generate_partitions, spec=spec, model=bc),
                            synthetic.schema(spec)))
        meta = {"checksum": None, "options": options, "source": "generate", "rows": spec.rows,
                "rejected": 0}
        with lake.arrow_frame(spark, truth_table(model)) as truth:
            sources.write(truth, truth_path, meta)
        sources.write(rows, path, meta)
    finally:
        bc.destroy()
    return {"table": table, "version": lake.latest_version(spark, path), "skipped": False,
            "rows": spec.rows, "truth": table + TRUTH_SUFFIX}


