"""scikit-learn estimators (`model.kind: sklearn`) trained by `federated` and `local` through
their own partial_fit, against partial_fit called in the test.

A client trains round r from the global weights: a fresh estimator with random_state drawn from
numpy.random.default_rng([seed, 14, r, client]).integers(2**31 - 1) (README, Determinism), its
coef_ and intercept_ set to the global weights, and partial_fit once per local epoch on the client's
training rows in block order: (shard, id) with shard = pmod(xxhash64(id), 1024), Spark's hash."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F
from sklearn.linear_model import SGDClassifier

from pipelines import train
from pipelines.core.cli import main_wrapper
from pipelines.store.artifacts import load_model
from tests.conftest import train_and_load, write_table
from udfs.adapters.sklearn_estimator import SklearnModel

N, D, K = 180, 5, 3
PARAMS = "{alpha: 0.001, learning_rate: optimal}"


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    lake = tmp_path_factory.mktemp("sklake")
    rng = np.random.default_rng(8)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X[:, :K] + 0.4 * rng.normal(size=(N, K))).argmax(axis=1)
    ids = rng.choice(10_000, size=N, replace=False).astype(np.int64)
    split = np.where(np.arange(N) % 6 == 0, "test", "train")
    write_table(spark, lake, "sk", X, y, split, ids=ids)
    ordered = (spark.read.format("delta").load(str(lake / "sk")).where("split = 'train'")
               .withColumn("shard", F.expr("pmod(xxhash64(id), 1024)")).orderBy("shard", "id").collect())
    test_rows = split == "test"
    return (lake, np.array([r.features for r in ordered], dtype=np.float64), np.array([r.label for r in ordered]),
            X[test_rows].astype(np.float64), y[test_rows])


def run(lake, tmp_path, capsys, *sets):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path / 'runs'}", "--set", "data.table=sk",
            "--set", "trainer.dtype=float64", "--set", "model.kind=sklearn",
            "--set", "model.sklearn.estimator=SGDClassifier", "--set", f"model.sklearn.params={PARAMS}"]
    return train_and_load(capsys, argv, sets)


def test_fedavg_of_one_sgd_classifier_client_equals_partial_fit_called_the_same_way(table, tmp_path, capsys):
    lake, X, y, X_test, y_test = table
    seed, rounds, epochs = 3, 3, 2
    summary, theta = run(lake, tmp_path, capsys, "trainer.strategy=federated", f"trainer.seed={seed}",
                         "federated.clients=1", "federated.fraction=1.0", "federated.min_clients=1",
                         "federated.holdout_fraction=0.0", f"federated.rounds={rounds}",
                         f"federated.local_epochs={epochs}")
    coef, intercept = np.zeros((K, D)), np.zeros(K)
    for r in range(1, rounds + 1):
        ref = SGDClassifier(alpha=0.001, learning_rate="optimal",
                            random_state=int(np.random.default_rng([seed, 14, r, 0]).integers(2**31 - 1)))
        ref.coef_, ref.intercept_ = coef.copy(), intercept.copy()
        for _ in range(epochs):
            ref.partial_fit(X, y, classes=np.arange(K))
        coef, intercept = ref.coef_, ref.intercept_
    np.testing.assert_allclose(theta, np.concatenate([coef.ravel(), intercept]), rtol=0, atol=1e-10)
    assert abs(summary["test_accuracy"] - (ref.predict(X_test) == y_test).mean()) <= 1e-9

    model, saved, _ = load_model(summary["model_path"])
    assert isinstance(model, SklearnModel)
    estimator = model.estimator_with(saved)   # the fitted estimator, from weights.npz alone
    assert isinstance(estimator, SGDClassifier)
    np.testing.assert_array_equal(estimator.predict(X_test), ref.predict(X_test))


def test_local_averages_partial_fit_estimators_and_learns(table, tmp_path, capsys):
    summary, _ = run(table[0], tmp_path, capsys, "trainer.strategy=local", "data.partitions=2",
                     "trainer.epochs=3", "data.validation_fraction=0.0")
    assert summary["model"]["estimator"] == "SGDClassifier"
    assert summary["test_accuracy"] > 0.6


@pytest.mark.parametrize(("sets", "needle"), [
    (["trainer.strategy=sync"], "has no gradient to reduce"),
    (["trainer.strategy=federated", "federated.mu=0.1"], "FedProx adds its proximal term"),
    (["trainer.strategy=local", "model.sklearn.params={no_such_param: 1}"], "model.sklearn.params"),
    (["trainer.strategy=local", "model.sklearn.params={alpha: -1}"], "model.sklearn.params"),
])
def test_what_a_partial_fit_estimator_cannot_do_is_exit_2(tmp_path, capsys, sets, needle):
    """Refused by the config, before any Spark work."""
    argv = ["--set", f"lake.path={tmp_path}", "--set", f"runs.path={tmp_path}", "--set", "data.table=sk",
            "--set", "model.kind=sklearn", "--set", "model.sklearn.estimator=SGDClassifier"]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    assert main_wrapper(train.main, argv) == 2
    assert needle in capsys.readouterr().err
