"""The scoring step both the score job and FedsparkModel.transform run: mapInArrow over the rows
(udfs/ml/scoring.py), the weights in one broadcast, read once per Python worker."""
from __future__ import annotations

from functools import partial

import numpy as np
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from udfs.ml.scoring import Scoring, score_batches


def score_rows(spark: SparkSession, scoring: Scoring, theta: np.ndarray, rows: DataFrame
               ) -> tuple[DataFrame, Broadcast]:
    """`rows`' columns `scoring.keep`, then the prediction (double) and, for classifiers, the
    probabilities (array<double>) under `scoring.outputs`' names. Also returns the broadcast that
    holds the weights: destroy it once the result is written."""
    prediction, probability = scoring.outputs
    fields = [rows.schema[name] for name in scoring.keep] + [T.StructField(prediction, T.DoubleType())]
    if scoring.spec.is_classifier:
        fields.append(T.StructField(probability, T.ArrayType(T.DoubleType())))
    weights = spark.sparkContext.broadcast(theta)
    return rows.mapInArrow(partial(score_batches, scoring=scoring, weights=weights),
                           T.StructType(fields)), weights
