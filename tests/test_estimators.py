"""fedspark's trainers as pyspark.ml stages: inside a Pipeline with MLlib's feature stages, saved
and loaded, tuned by CrossValidator and TrainValidationSplit with MLlib's evaluators, and bad input
named scikit-learn-style."""
from __future__ import annotations

from typing import cast

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit
from pyspark.sql import functions as F

from pipelines.ml.estimators import FedsparkEstimator, FedsparkModel
from tests.conftest import blobs

COLUMNS = [f"x{i}" for i in range(6)]


def accuracy_of(scored):
    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(scored)


def accuracy_evaluator():
    return MulticlassClassificationEvaluator(metricName="accuracy")


@pytest.fixture(scope="module")
def frame(spark):
    X, y, _ = blobs(3000, 6, 3, seed=4, spread=1.5)
    rows = [(*map(float, x), int(label)) for x, label in zip(X, y, strict=False)]
    return spark.createDataFrame(rows, [*COLUMNS, "label"]).repartition(3).cache()


def _pipeline(**params):
    settings = {"featuresCol": "scaled", "modelKind": "softmax", "epochs": 3, "batchSize": 32,
                "learningRate": 0.05, "validationFraction": 0.0, **params}
    est = FedsparkEstimator(**settings)
    return Pipeline(stages=[VectorAssembler(inputCols=COLUMNS, outputCol="raw"),
                            StandardScaler(inputCol="raw", outputCol="scaled"), est]), est


def test_a_pipeline_fits_transforms_saves_and_loads_in_a_new_session(spark, frame, tmp_path):
    pipeline, _ = _pipeline()
    model = pipeline.fit(frame)
    scored = model.transform(frame)
    assert {"prediction", "probability"} <= set(scored.columns)
    accuracy = accuracy_of(scored)
    assert accuracy > 0.75
    first = scored.select("probability").first()["probability"]
    assert len(first) == 3 and sum(first) == pytest.approx(1.0)
    model.write().save(str(tmp_path / "pipeline"))
    other = spark.newSession()
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    assert isinstance(loaded.stages[-1], FedsparkModel)
    again = loaded.transform(other.createDataFrame(frame.toPandas()))
    before = np.array([r["prediction"] for r in scored.orderBy(*COLUMNS).collect()])
    after = np.array([r["prediction"] for r in again.orderBy(*COLUMNS).collect()])
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(loaded.stages[-1].theta, model.stages[-1].theta)


@pytest.mark.parametrize("strategy,extra", [("sync", {}),
                                            ("federated", {"clients": 4, "fraction": 1.0, "rounds": 3,
                                                           "localEpochs": 1, "localBatchSize": 16})])
def test_sync_and_federated_estimators_train(frame, strategy, extra):
    pipeline, _ = _pipeline(strategy=strategy, **extra)
    assert accuracy_of(pipeline.fit(frame).transform(frame)) > 0.75


def test_train_validation_split_picks_the_better_rate_and_its_metric_is_reproducible(frame):
    pipeline, est = _pipeline()
    grid = ParamGridBuilder().addGrid(est.learningRate, [1e-6, 0.05]).build()
    tvs = TrainValidationSplit(estimator=pipeline, estimatorParamMaps=grid, evaluator=accuracy_evaluator(),
                               trainRatio=0.75, seed=7).fit(frame)
    assert cast(PipelineModel, tvs.bestModel).stages[-1].getOrDefault("learningRate") == 0.05
    assert tvs.validationMetrics[1] > tvs.validationMetrics[0] + 0.2
    # TrainValidationSplit's own split: a rand(seed) column, train below the ratio
    marked = frame.select("*", F.rand(7).alias("r"))
    train, validation = marked.filter(F.col("r") < 0.75), marked.filter(F.col("r") >= 0.75)
    for rate, metric in zip((1e-6, 0.05), tvs.validationMetrics, strict=False):
        alone, _ = _pipeline(learningRate=rate)
        assert accuracy_of(alone.fit(train).transform(validation)) == pytest.approx(metric, abs=1e-9)


def test_cross_validator_over_our_params(frame):
    pipeline, est = _pipeline()
    grid = ParamGridBuilder().addGrid(est.learningRate, [1e-6, 0.05]).build()
    cv = CrossValidator(estimator=pipeline, estimatorParamMaps=grid, evaluator=accuracy_evaluator(), numFolds=2,
                        seed=3).fit(frame)
    assert cv.avgMetrics[1] > cv.avgMetrics[0] + 0.2
    assert cast(PipelineModel, cv.bestModel).stages[-1].getOrDefault("learningRate") == 0.05
    # CrossValidator's own folds: a rand(seed) column cut into numFolds equal ranges
    marked = frame.select("*", F.rand(3).alias("r"))
    for rate, metric in zip((1e-6, 0.05), cv.avgMetrics, strict=False):
        folds = []
        for i in range(2):
            held = (F.col("r") >= i / 2) & (F.col("r") < (i + 1) / 2)
            alone, _ = _pipeline(learningRate=rate)
            folds.append(accuracy_of(alone.fit(marked.filter(~held)).transform(marked.filter(held))))
        assert np.mean(folds) == pytest.approx(metric, abs=1e-9)


def test_bad_input_names_the_column_or_param(spark):
    est = FedsparkEstimator(epochs=1, validationFraction=0.0)
    mixed = spark.createDataFrame([([1.0, 2.0], 0), ([1.0], 1)] * 4, ["features", "label"])
    with pytest.raises(ValueError, match="features column 'features'.*has 1 values, expected 2"):
        est.fit(mixed)
    strings = spark.createDataFrame([([1.0, 2.0], "cat")] * 4, ["features", "label"])
    with pytest.raises(ValueError, match="label column 'label' is string"):
        est.fit(strings)
    empty = spark.createDataFrame([], "features array<double>, label int")
    with pytest.raises(ValueError, match="no rows"):
        est.fit(empty)
    with pytest.raises(ValueError,
                       match=r"Param learningRate=-1.0 is not allowed \(trainer.optimizer.lr\): .*greater than 0"):
        FedsparkEstimator(learningRate=-1.0).fit(mixed)
    with pytest.raises(ValueError, match="Param strategy"):
        FedsparkEstimator(strategy="mllib").fit(mixed)
