"""trainer.strategy=mllib: Spark MLlib's own estimators on the same Delta table, config and run
directory as our strategies, so a user compares like with like.

    softmax   LogisticRegression(family=multinomial)
    logistic  LogisticRegression(family=binomial)
    linear    LinearRegression
    mlp       MultilayerPerceptronClassifier(layers=[d, *model.hidden, K]); its hidden units are
              sigmoids, not our ReLUs, so it is MLlib's MLP, not ours trained by MLlib

MLlib trains on the train split less `data.validation_fraction` of it, held out by a seeded hash
of the id (the same share as our strategies hold out, not the same rows); the test split is the
same. The fitted model is saved with MLlib's writer under model/mllib; the linear models are also
written as our weights.npz + spec.json, so evaluate.py and scoring use them like any other run.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from pyspark.ml import Estimator, Model
from pyspark.ml.classification import (
    LogisticRegression,
    LogisticRegressionModel,
    MultilayerPerceptronClassificationModel,
    MultilayerPerceptronClassifier,
)
from pyspark.ml.evaluation import MulticlassClassificationEvaluator, RegressionEvaluator
from pyspark.ml.functions import array_to_vector
from pyspark.ml.regression import LinearRegression, LinearRegressionModel
from pyspark.ml.util import HasTrainingSummary, MLWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.config import Config
from pipelines.core.errors import UserError
from pipelines.data import lake
from pipelines.data.blocks import check_schema
from udfs.core.models import ModelSpec

HOLDOUT_BUCKETS = 1_000_000


def estimator(config: Config, spec: ModelSpec) -> Estimator:
    m, seed = config.mllib, config.trainer.seed
    if spec.kind in ("softmax", "logistic"):
        family = "multinomial" if spec.kind == "softmax" else "binomial"
        return LogisticRegression(family=family, maxIter=m.max_iter, tol=m.tol, regParam=m.reg_param,
                                  elasticNetParam=m.elastic_net)
    if spec.kind == "linear":
        return LinearRegression(maxIter=m.max_iter, tol=m.tol, regParam=m.reg_param,
                                elasticNetParam=m.elastic_net)
    return MultilayerPerceptronClassifier(layers=list(spec.layers), maxIter=m.max_iter, tol=m.tol,
                                          blockSize=m.block_size, seed=seed, solver="l-bfgs")


def rows(spark: SparkSession, config: Config) -> tuple[DataFrame, str, int, bool]:
    """(id, features as an ML vector, label as double, split, held_out) of the pinned table, its
    name and version, and whether its labels are real-valued (regression)."""
    ref = lake.TableRef(config.data.table, config.data.version)
    df, version = lake.read(spark, config.lake.path, ref)
    check_schema(df, ref.name)
    float_label = isinstance(df.schema["label"].dataType, (T.FloatType, T.DoubleType))
    bucket = F.pmod(F.xxhash64(F.col("id"), F.lit(config.trainer.seed)), F.lit(HOLDOUT_BUCKETS))
    out = df.select(
        F.col("id"),
        array_to_vector(F.col("features")).alias("features"),
        F.col("label").cast("double").alias("label"),
        F.col("split"),
        (bucket < int(round(config.data.validation_fraction * HOLDOUT_BUCKETS))).alias("held_out"),
    )
    return out, ref.name, version, float_label


def shape(train: DataFrame, name: str, float_label: bool) -> tuple[int, int, int]:
    """(rows, features, classes; 0 classes for regression) of the training rows."""
    stats = train.agg(F.count(F.lit(1)).alias("n"), F.max("label").alias("max")).first()
    if stats is None or not stats["n"]:
        raise UserError(f"table {name!r} has no training rows")
    first = train.select("features").first()
    if first is None:
        raise UserError(f"table {name!r} has no training rows")
    width = first["features"].size
    return int(stats["n"]), width, 0 if float_label else int(stats["max"]) + 1


def test_metrics(model: Model, test: DataFrame, spec: ModelSpec) -> dict[str, float]:
    """Test-split metrics named as our strategies name them: mean log loss and accuracy, or MSE,
    RMSE and R^2."""
    scored = model.transform(test).cache()
    try:
        if spec.is_classifier:
            mc = MulticlassClassificationEvaluator(labelCol="label")
            # pyspark's MulticlassClassificationEvaluatorMetricType stub omits "logLoss", a metric
            # the evaluator has supported since Spark 3.0
            return {"loss": mc.setMetricName("logLoss").evaluate(scored),  # type: ignore[arg-type]
                    "accuracy": mc.setMetricName("accuracy").evaluate(scored)}
        ev = RegressionEvaluator(labelCol="label")
        return {"loss": ev.setMetricName("mse").evaluate(scored),
                "rmse": ev.setMetricName("rmse").evaluate(scored),
                "r2": ev.setMetricName("r2").evaluate(scored)}
    finally:
        scored.unpersist()


def our_weights(model: Model, spec: ModelSpec) -> np.ndarray | None:
    """The fitted linear model as our flat parameter vector (W as in x out, then b), or None for
    MLlib's MLP, whose sigmoid hidden units our models do not have."""
    if spec.kind == "softmax":
        multinomial = cast(LogisticRegressionModel, model)
        W = multinomial.coefficientMatrix.toArray().T
        b = multinomial.interceptVector.toArray()
    elif spec.kind in ("logistic", "linear"):
        single = cast("LogisticRegressionModel | LinearRegressionModel", model)
        W, b = single.coefficients.toArray()[:, None], np.array([single.intercept])
    else:
        return None
    return np.concatenate([W.ravel(), b]).astype(np.float64)


@dataclass(frozen=True)
class Fitted:
    """What an MLlib fit gives the run: the model, our spec of it, the table version it read, its
    row counts, the optimizer's own wall time and iterations, and its test metrics."""

    model: Model
    spec: ModelSpec
    table: str
    version: int
    train_rows: int
    test_rows: int
    train_seconds: float
    test: dict[str, float]
    iterations: int | None

    def save(self, path: str) -> None:
        """The fitted model with MLlib's own writer (every MLlib model here is MLWritable)."""
        cast(MLWritable, self.model).write().overwrite().save(path)


def fit(spark: SparkSession, config: Config, spec_for: Callable[[int, int], ModelSpec]) -> Fitted:
    """Fit on the train split less the hold-out and test; `spec_for(n_features, n_classes)` builds
    the model spec (the runners' model_spec, with its checks)."""
    data, name, version, float_label = rows(spark, config)
    train = data.filter((F.col("split") == "train") & ~F.col("held_out")).select("features", "label")
    test = data.filter(F.col("split") == "test").select("features", "label")
    train = train.cache()
    try:
        n_train, width, n_classes = shape(train, name, float_label)
        spec = spec_for(width, n_classes)
        started = time.perf_counter()
        model = estimator(config, spec).fit(train)
        seconds = time.perf_counter() - started
    finally:
        train.unpersist()
    return Fitted(model, spec, name, version, n_train, test.count(), seconds, test_metrics(model, test, spec),
                  _iterations(model))


def _iterations(model: Model) -> int | None:
    """Iterations the optimizer ran (MLlib's training summary; MLPC exposes it as a method)."""
    if not isinstance(model, HasTrainingSummary) or not model.hasSummary:
        return None
    if isinstance(model, MultilayerPerceptronClassificationModel):
        summary = model.summary()
    else:
        summary = model.summary
    return int(summary.totalIterations)
