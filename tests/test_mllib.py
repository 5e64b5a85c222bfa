"""trainer.strategy=mllib: MLlib's estimators from our config and table, with our run directory and
summary line; scikit-learn as the oracle for the linear models."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import evaluate
from pipelines.core.cli import main_wrapper
from tests.conftest import blobs
from tests.test_train_job import ALWAYS, run_train


@pytest.fixture()
def lake(blobs_lake):
    return blobs_lake

MLLIB = ["trainer.strategy=mllib", "data.validation_fraction=0.0"]


def test_softmax_matches_scikit_learn_and_evaluate_reads_its_weights(lake, tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    X, y, split = blobs(10_000, 10, 4, seed=11)
    train_rows, test_rows = split == "train", split == "test"
    expected = LogisticRegression(C=np.inf, max_iter=5000).fit(X[train_rows], y[train_rows]) \
        .score(X[test_rows], y[test_rows])
    summary, _ = run_train(lake, tmp_path / "runs", capsys, *MLLIB, "data.table=blobs",
                           "model.kind=softmax")
    assert ALWAYS <= set(summary) and summary["strategy"] == "mllib"
    assert summary["mllib"]["estimator"] == "LogisticRegression" and summary["mllib"]["iterations"] > 1
    assert summary["data"]["train_rows"] == int(train_rows.sum())
    assert abs(summary["test_accuracy"] - expected) <= 0.003, (summary["test_accuracy"], expected)
    # our weights.npz holds MLlib's coefficients: evaluate.py recomputes the same accuracy
    assert main_wrapper(evaluate.main, ["--model", summary["run_dir"]]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)


def test_linear_regression_reports_rmse_and_r2_like_ours(lake, tmp_path, capsys):
    summary, _ = run_train(lake, tmp_path / "runs", capsys, *MLLIB, "data.table=reg",
                           "model.kind=linear")
    assert "test_accuracy" not in summary
    assert summary["test_rmse"] == pytest.approx(0.1, abs=0.03) and summary["test_r2"] > 0.99
    assert summary["test_loss"] == pytest.approx(summary["test_rmse"] ** 2, rel=1e-9)


def test_mlp_is_saved_by_mllib_and_evaluate_says_how_to_load_it(lake, tmp_path, capsys):
    summary, _ = run_train(lake, tmp_path / "runs", capsys, *MLLIB, "data.table=blobs",
                           "model.kind=mlp", "model.hidden=[8]", "mllib.max_iter=30")
    assert summary["mllib"]["estimator"] == "MultilayerPerceptronClassification"
    assert summary["model"]["layers"] == [10, 8, 4] and summary["test_accuracy"] > 0.5
    model_dir = f"{summary['run_dir']}/model"
    from pyspark.ml.classification import MultilayerPerceptronClassificationModel

    assert MultilayerPerceptronClassificationModel.load(f"{model_dir}/mllib").getLayers() == [10, 8, 4]
    assert main_wrapper(evaluate.main, ["--model", summary["run_dir"]]) == 2
    assert "load it with pyspark.ml" in capsys.readouterr().err
