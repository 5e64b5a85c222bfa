"""Models saved by an earlier layout of the code still load and predict the same: a fitted
pyspark.ml PipelineModel (its stages record the class path `pipelines.estimators.FedsparkModel`) and
a run's `model/` directory, both written before pipelines/ and udfs/ became packages of packages
(tests/fixtures, with the inputs and the predictions made then)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pyspark.ml import PipelineModel

from pipelines.store.artifacts import load_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _inputs() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "inputs.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_a_pipeline_model_saved_before_the_move_predicts_the_same(spark):
    saved = _inputs()
    columns = [f"x{i}" for i in range(saved["X"].shape[1])]
    frame = spark.createDataFrame([(*map(float, x), int(label)) for x, label in
                                   zip(saved["X"], saved["y"], strict=False)], [*columns, "label"]).coalesce(1)
    model = PipelineModel.load(str(FIXTURES / "pipeline_model"))
    assert type(model.stages[-1]).__name__ == "FedsparkModel"
    predicted = np.array([r["prediction"] for r in model.transform(frame).collect()])
    np.testing.assert_array_equal(predicted, saved["pipeline_prediction"])
    assert (predicted == saved["y"]).mean() > 0.7          # a trained model, not a constant


def test_a_run_model_saved_before_the_move_predicts_the_same():
    saved = _inputs()
    spec, theta, _ = load_model(FIXTURES / "run_model")
    predicted = spec.predict(theta, saved["X"].astype(np.float64))
    np.testing.assert_array_equal(predicted, saved["run_prediction"])
    assert (predicted == saved["y"]).mean() > 0.7
