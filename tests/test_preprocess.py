"""Preprocessing fitted from the federated statistics (data.preprocess, data.impute): the same
features scikit-learn's imputer and scaler make from the pooled rows, and federated training on
standardized wine and breast-cancer data within one wrong test row of scikit-learn's
StandardScaler + LogisticRegression; evaluate.py and score.py on the saved model give the
accuracy the training job reported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from pipelines import evaluate, ingest, score
from pipelines.core.cli import main_wrapper
from pipelines.core.config import config_from_dict
from pipelines.data import lake, preprocess
from pipelines.data import stats as feature_stats
from tests.conftest import train_and_load, write_table


def test_the_fitted_transform_is_scikit_learns_imputer_and_scaler(spark, tmp_path):
    rng = np.random.default_rng(8)
    X = np.stack([500 + 20 * rng.normal(size=400), rng.exponential(3.0, 400),
                  np.full(400, 2.5)], axis=1).astype(np.float32)   # the last has zero variance
    X[rng.random(400) < 0.1, 1] = np.nan
    write_table(spark, tmp_path, "gaps", X, rng.integers(0, 2, 400))
    config = config_from_dict({"lake": {"path": str(tmp_path)}, "data": {
        "table": "gaps", "version": 0, "preprocess": "standardize", "impute": "mean",
        "missing_indicator": True, "block_cache_gb": 0.0}, "trainer": {"strategy": "local"}})
    fitted = preprocess.for_run(spark, config)
    # the statistics were stored for the version the run is pinned to, and fit every transform
    stats = feature_stats.read(spark, str(tmp_path), "gaps", 0)
    assert stats is not None
    pooled = X.astype(np.float64)
    for preprocess_, impute in (("standardize", "mean"), ("minmax", "zero"), ("standardize", "zero"),
                                ("none", "mean")):
        data = config.data.model_copy(update={"preprocess": preprocess_, "impute": impute})
        transform = preprocess.fit(stats, data)
        if (preprocess_, impute) == ("standardize", "mean"):
            assert transform == fitted
        steps = [SimpleImputer(strategy="mean" if impute == "mean" else "constant", fill_value=0.0)]
        if preprocess_ != "none":
            steps.append(StandardScaler() if preprocess_ == "standardize" else MinMaxScaler())
        expected = make_pipeline(*steps).fit_transform(pooled)
        got = transform.apply(X, np.arange(400))
        assert got.shape == (400, 4)   # one indicator column: feature 1 had missing values
        np.testing.assert_allclose(got[:, :3], expected, rtol=0, atol=1e-5, err_msg=preprocess_ + impute)
        np.testing.assert_array_equal(got[:, 3], np.isnan(X[:, 1]))


def test_a_missing_value_without_imputation_stops_the_run_naming_the_feature(spark, tmp_path):
    from pipelines.core.errors import UserError

    X = np.ones((50, 3), dtype=np.float32)
    X[7, 2] = np.nan
    write_table(spark, tmp_path, "holes", X, np.zeros(50, dtype=np.int64))
    config = config_from_dict({"lake": {"path": str(tmp_path)}, "data": {
        "table": "holes", "version": 0, "preprocess": "standardize", "block_cache_gb": 0.0},
        "trainer": {"strategy": "local"}})
    with pytest.raises(UserError, match="feature 2 has 1 missing value"):
        preprocess.for_run(spark, config)


def _csv(path: Path, X: np.ndarray, y: np.ndarray, split: np.ndarray) -> None:
    """The data as a CSV a user would have (label, f0.., split), and three bad rows."""
    d = X.shape[1]
    lines = [",".join(["label", *(f"f{j}" for j in range(d)), "split"])]
    lines += [",".join([str(int(label)), *(repr(float(v)) for v in row), s])
              for row, label, s in zip(X, y, split, strict=True)]
    lines.insert(5, ",".join(["1", "abc", *["0"] * (d - 1), "train"]))
    lines.insert(9, ",".join(["7", *["0"] * d, "train"]))
    lines.insert(20, ",".join(["0", *["0"] * (d - 1)]))
    path.write_text("\n".join(lines) + "\n")


def _sklearn_wrong(X: np.ndarray, y: np.ndarray, split: np.ndarray) -> int:
    train = split == "train"
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(X[train], y[train])
    return int((model.predict(X[~train]) != y[~train]).sum())


def _ingested(capsys, tmp_path: Path, name: str, X: np.ndarray, y: np.ndarray, classes: int
              ) -> tuple[Path, np.ndarray]:
    split = np.where(np.isin(np.arange(len(y)), train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)[1]), "test", "train")
    source, lake_dir = tmp_path / f"{name}.csv", tmp_path / "lake"
    _csv(source, X, y, split)
    capsys.readouterr()
    assert main_wrapper(ingest.main, ["--source", f"csv:{source}", "--table", name, "--classes",
                                      str(classes), "--set", f"lake.path={lake_dir}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["rows"], summary["rejected"]) == (len(y), 3)
    return lake_dir, split


def _federated(lake_dir: Path, table: str, kind: str, rounds: int) -> list[str]:
    return ["--set", f"lake.path={lake_dir}", "--set", f"runs.path={lake_dir.parent / 'runs'}",
            "--set", f"data.table={table}", "--set", "data.preprocess=standardize",
            "--set", "data.block_cache_gb=0", "--set", f"model.kind={kind}",
            "--set", "trainer.strategy=federated", "--set", "trainer.optimizer.name=sgd",
            "--set", "trainer.optimizer.lr=0.1", "--set", "trainer.dtype=float64",
            "--set", "federated.clients=5", "--set", "federated.partitioner=dirichlet",
            "--set", "federated.fraction=1.0", "--set", "federated.holdout_fraction=0.0",
            "--set", f"federated.rounds={rounds}", "--set", "federated.local_epochs=2",
            "--set", "federated.local_batch_size=10", "--set", f"federated.eval_every={rounds}"]


def test_standardized_federated_wine_is_as_good_as_scikit_learn_and_evaluate_and_score_agree(
        spark, tmp_path, capsys):
    data = load_wine()
    X, y = data.data, data.target
    lake_dir, split = _ingested(capsys, tmp_path, "wine", X, y, 3)
    summary, _ = train_and_load(capsys, _federated(lake_dir, "wine", "softmax", 8))
    tested = int((split == "test").sum())
    assert summary["data"]["test_rows"] == tested == 36
    wrong = round((1 - summary["test_accuracy"]) * tested)
    assert wrong <= _sklearn_wrong(X, y, split) + 1
    # the saved model carries the transform: evaluate and score see the training job's features
    assert main_wrapper(evaluate.main, ["--model", summary["run_dir"]]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert main_wrapper(score.main, ["--model", summary["run_dir"], "--input", "wine", "--output",
                                     "wine_scores", "--set", f"lake.path={lake_dir}"]) == 0
    capsys.readouterr()
    scores = spark.read.format("delta").load(str(lake_dir / "wine_scores"))
    table, _ = lake.read(spark, str(lake_dir), lake.TableRef("wine"))
    test = scores.join(table.filter("split = 'test'"), "id").select("prediction", "label").toPandas()
    assert len(test) == tested
    assert float((test.prediction == test.label).mean()) == pytest.approx(summary["test_accuracy"])


def test_standardized_federated_breast_cancer_logistic_is_as_good_as_scikit_learn(spark, tmp_path, capsys):
    data = load_breast_cancer()
    X, y = data.data, data.target
    lake_dir, split = _ingested(capsys, tmp_path, "cancer", X, y, 2)
    summary, _ = train_and_load(capsys, _federated(lake_dir, "cancer", "logistic", 20))
    tested = int((split == "test").sum())
    wrong = round((1 - summary["test_accuracy"]) * tested)
    assert wrong <= _sklearn_wrong(X, y, split) + 1
