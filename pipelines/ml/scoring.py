"""The scoring column both the score job and FedsparkModel.transform add: a pandas UDF over Arrow
batches (udfs/ml/scoring.py) with the weights in one broadcast, read once per Python worker."""
from __future__ import annotations

import numpy as np
from pyspark import Broadcast
from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F

from udfs.core.models import ModelSpec
from udfs.ml.scoring import Scoring, scorer


def score_column(spark: SparkSession, spec: ModelSpec, theta: np.ndarray, features: Column,
                 column_name: str) -> tuple[Column, Broadcast]:
    """A struct column (prediction double[, probability array<double>]) and the broadcast that
    holds the weights: destroy it once the result is written."""
    kind = "struct<prediction double, probability array<double>>" if spec.is_classifier \
        else "struct<prediction double>"
    weights = spark.sparkContext.broadcast(theta)
    # pyspark's stubs only type pandas_udf with an explicit functionType; the type-hint form used
    # here (Spark >= 3.0's, the UDF kind read from scorer's Series -> DataFrame hints) has no overload
    udf = F.pandas_udf(scorer(Scoring(spec, column_name), weights), kind)  # type: ignore[call-overload]
    return udf(features), weights
